"""``data.manifest``: a mixture in one file. Its sources become ``data.datasets`` and ``data.train_name``; its keys are
those of ``data.datasets.<name>`` (unknown ones refused with the config's did-you-mean message), its paths relative
to the file; and ``python -m zvl_ds.config`` prints the resolved mixture."""
import dataclasses
import os
import re

import pytest
import yaml
from tests.helpers.data_fixtures import make_config, write_dataset

from zvl_ds.config import ConfigError, DatasetSource, load_config
from zvl_ds.config.__main__ import main as config_main
from zvl_ds.config.load import MANIFEST_PATH_KEYS
from zvl_ds.data import build_train_loader, load_tokenizer

MANIFEST = """\
# three sources, each found a different way; paths are relative to this file
web:
  shards: web/train-{000000..000003}.tar   # a brace pattern
  weight: 0.25
cc:
  folder: cc                                # a shard writer's folder, read by split
  size: 20
coco:
  shards: coco                              # a folder of tars
  weight: 4
"""
# string keys of data.datasets.<name> that are not paths: a new key must be put in one list or the other
NOT_PATHS = {"image_column", "caption_column"}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Shards of three sources next to their manifest, in a folder the tests' working folder is not."""
    folder = tmp_path_factory.mktemp("mixture")
    for name, sizes in (("web", [12, 12, 12, 12]), ("cc", [10, 10]), ("coco", [6])):
        write_dataset(str(folder), name, "train", sizes)
    (folder / "mix.yaml").write_text(MANIFEST)
    return folder


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """A working folder other than the manifest's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def manifest_config(manifest, *overrides):
    return load_config(None, [f"data.manifest={manifest}", "data.data_path=/nonexistent", "model.arch=tiny",
                              *overrides])


def test_manifest_sources_become_the_training_datasets_with_paths_relative_to_it(mixture, elsewhere):
    cfg = manifest_config(os.path.relpath(mixture / "mix.yaml"), "data.train_name=[other]")
    assert cfg.data.train_name == ["web", "cc", "coco"]  # the file's order; the config's train_name is replaced
    sources = cfg.data.datasets
    assert sources["web"] == DatasetSource(shards=str(mixture / "web/train-{000000..000003}.tar"), weight=0.25)
    assert sources["cc"] == DatasetSource(folder=str(mixture / "cc"), size=20)
    assert sources["coco"] == DatasetSource(shards=str(mixture / "coco"), weight=4.0)
    printed = elsewhere / "resolved.yaml"
    printed.write_text(cfg.to_yaml())
    assert load_config(str(printed)) == cfg  # the printed config (manifest and resolved sources) loads as it was


def test_the_config_wins_over_the_manifest_key_by_key(mixture, elsewhere):
    cfg = manifest_config(mixture / "mix.yaml", "data.datasets.coco.weight=2", "data.datasets.extra.shards=x.tar")
    assert cfg.data.datasets["coco"] == DatasetSource(shards=str(mixture / "coco"), weight=2.0)
    assert cfg.data.datasets["web"].weight == 0.25 and "extra" in cfg.data.datasets
    assert cfg.data.train_name == ["web", "cc", "coco"]


def test_the_manifest_and_the_inline_form_give_the_same_stream(mixture):
    tokenizer = load_tokenizer(make_config("/unused").model.text_encoder)
    inline = {"data.datasets": {"web": {"shards": "web/train-{000000..000003}.tar", "weight": 0.25},
                                "cc": {"folder": str(mixture / "cc"), "size": 20},
                                "coco": {"shards": "coco", "weight": 4}}}
    forms = [make_config(str(mixture), train=("web", "cc", "coco"), batch_size=4, train_type=mode, extra=inline)
             for mode in ("shuffle", "debias")]
    forms += [make_config("/nonexistent", train=("unused",), batch_size=4, train_type=mode,
                          manifest=str(mixture / "mix.yaml")) for mode in ("shuffle", "debias")]
    streams = []
    for cfg in forms:
        loader = build_train_loader(cfg, 0, 1, tokenizer)
        iterator = iter(loader)
        streams.append([(batch.dataset, batch.keys) for batch in (next(iterator) for _ in range(24))])
        loader.close()
    assert streams[0] == streams[2] and streams[1] == streams[3]
    assert {key.split("_")[0] for _, keys in streams[0] for key in keys} == {"web", "cc", "coco"}


def write(folder, text):
    path = folder / "mix.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ("coco:\n  shards: coco\n  wieght: 4\n",
     r"data.manifest .*mix.yaml: unknown config key coco.wieght; did you mean coco.weight\? \(valid keys here: "
     + re.escape(", ".join(sorted(field.name for field in dataclasses.fields(DatasetSource)))) + r"\)"),
    ("coco:\n  shards: coco\n  weight: heavy\n", r"mix.yaml: coco.weight: got 'heavy' \(str\), expected float"),
    ("coco: coco/\n", r"mix.yaml: source coco: expected a mapping of data.datasets.<name> keys \(shards, size, weight"),
    ("# nothing\n", r"mix.yaml: lists no sources"),
    ("- coco\n", r"data.manifest: .*mix.yaml: the top level must be a mapping"),
    ("coco: {shards: 'pipe:curl -s http://x/{0..3}.tar'}\n",
     r"mix.yaml: coco.shards: a manifest cannot name a `pipe:` shard \(it would run the shell command 'curl"),
    ("coco: {shards: 'a.tar::pipe:cat b.tar'}\n", r"coco.shards: a manifest cannot name a `pipe:` shard"),
    ("coco: {shards: coco, weight: 0}\n", r"data.datasets.coco.weight: must be a finite number > 0, got 0.0"),
], ids=["unknown key", "wrong type", "not a mapping", "empty", "a list", "pipe", "pipe after ::", "weight 0"])
def test_a_bad_manifest_is_refused_naming_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        manifest_config(write(tmp_path, text))


def test_a_missing_manifest_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"data.manifest: config file not found: .*absent.yaml"):
        manifest_config(tmp_path / "absent.yaml")


def test_urls_and_absolute_paths_in_a_manifest_stay_as_written(tmp_path):
    path = write(tmp_path, "web: {shards: 'https://host/web-{0..9}.tar :: /abs/more.tar :: rel/{0..1}.tar'}\n")
    assert manifest_config(path).data.datasets["web"].shards == \
        f"https://host/web-{{0..9}}.tar::/abs/more.tar::{tmp_path / 'rel/{0..1}.tar'}"


def test_a_parquet_source_in_a_manifest_is_relative_to_it_and_its_columns_are_not(tmp_path):
    path = write(tmp_path, "laion: {parquet: 'data/train-*.parquet', image_column: jpg, caption_column: txt}\n")
    source = manifest_config(path).data.datasets["laion"]
    assert (source.parquet, source.image_column, source.caption_column) == (
        str(tmp_path / "data/train-*.parquet"), "jpg", "txt")


def test_every_string_key_of_a_source_is_a_path_or_named_as_not_one():
    strings = {f.name for f in dataclasses.fields(DatasetSource) if f.type in (str, "str")}
    assert strings == set(MANIFEST_PATH_KEYS) | NOT_PATHS


def mixture_table(output):
    """source -> (samples, weight, share %, passes per epoch), from the comment lines after the printed config."""
    rows = {}
    for line in output.splitlines():
        match = re.fullmatch(r"#\s+(\w+)\s+(\d+)\s+([\d.e+-]+)\s+([\d.]+)%\s+([\d.]+)", line)
        if match:
            rows[match.group(1)] = tuple(float(value) for value in match.groups()[1:])
    return rows


def test_the_config_command_prints_the_resolved_mixture(mixture, elsewhere, capsys):
    config = elsewhere / "run.yaml"
    config.write_text(f"data:\n  train_type: debias\n  manifest: {os.path.relpath(mixture / 'mix.yaml')}\n")
    assert config_main([str(config)]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["data"]["train_name"] == ["web", "cc", "coco"]  # still YAML: comments after it
    # weight x samples: 0.25 x 48 = 12, 1 x 20 = 20, 4 x 6 = 24 of 56 -> 21.43%, 35.71%, 42.86% of the steps;
    # passes per epoch (74 samples): share x 74 / samples
    assert mixture_table(printed) == {"web": (48, 0.25, 21.43, 0.330), "cc": (20, 1, 35.71, 1.321),
                                      "coco": (6, 4, 42.86, 5.286)}
    assert "share = the fraction of steps that draw the source" in printed

    config.write_text(f"data:\n  manifest: {os.path.relpath(mixture / 'mix.yaml')}\n  datasets:\n"
                      "    cc: {folder: '', shards: nowhere/*.tar}\n")
    assert config_main([str(config)]) == 0
    printed = capsys.readouterr().out
    assert "# training mixture (data.train_type: shuffle): share = the source's fraction of every batch\n" in printed
    assert re.search(r"# +dataset 'cc' \(data.datasets.cc.shards\): shard spec 'nowhere/\*.tar' matches nothing",
                     printed)
    assert "(the shares need every source's samples)" in printed

    assert config_main([str(config), "data.manifest=", "data.train_name=[]"]) == 0
    assert capsys.readouterr().out.endswith("\n# training mixture: none (data.train_name is empty)\n")

    write(elsewhere, "coco: {shards: coco, wieght: 4}\n")
    assert config_main([str(config), "data.manifest=mix.yaml"]) == 2
    assert "did you mean coco.weight?" in capsys.readouterr().err
