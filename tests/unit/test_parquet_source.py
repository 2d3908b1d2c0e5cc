"""Parquet datasets read in place (data.datasets.<name>.parquet): the same stream as tars of the same rows, exact
resume, validation once per row, bad rows counted by reason, bounded reads, no code from data, the missing extra.

The reference for the streams is the tar loader: the same samples written as tar shards whose sizes are the
Parquet row groups' give, sample for sample, the same images and tokens at every step.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from tests.helpers.data_fixtures import image_bytes, make_config, write_dataset
from tests.helpers.parquet_fixtures import hf_image_type, tar_like_rows, write_hf_snapshot, write_parquet
from tests.unit.test_stream import png_bomb
from zvl_ds.base.cli import run
from zvl_ds.config import ConfigError, DatasetSource, config_from_dict
from zvl_ds.data import DataSourceError, build_train_loader, build_valid_loader, load_tokenizer, tokenize
from zvl_ds.data.failures import DataLossError, FailureCounter
from zvl_ds.data.parquet_files import ParquetLayout
from zvl_ds.data.parquet_reader import read_row_group
from zvl_ds.data.sources import resolve_dataset

pa = pytest.importorskip("pyarrow")  # the optional extra `parquet`; CI installs it
pq = pytest.importorskip("pyarrow.parquet")

FILES = [[7, 6], [9]]  # two files: row groups of 7 and 6 rows, then one of 9


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(make_config("/unused").model.text_encoder)


def take(loader, steps):
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(steps)]
    loader.close()
    return batches


def parquet_config(root, name, spec, **kwargs):
    cfg = make_config(root, **kwargs)
    cfg.data.datasets = {name: DatasetSource(parquet=spec)}
    return cfg


def key_map(root, name, split, files):
    """Parquet key (``<file>/<row in file>``) -> the key of the same row in the tars."""
    keys, _, _ = tar_like_rows(name, split, [rows for groups in files for rows in groups])
    mapping, first = {}, 0
    for index, groups in enumerate(files):
        for row in range(sum(groups)):
            mapping[f"{split}-{index:05d}-of-{len(files):05d}.parquet/{row}"] = keys[first + row]
        first += sum(groups)
    return mapping


@pytest.fixture(scope="module")
def twin_datasets(tmp_path_factory):
    """``tars/aa`` and ``tars/bb`` as tar shards; ``pq/aa`` holds aa's rows as a Hugging Face snapshot."""
    root = str(tmp_path_factory.mktemp("twins"))
    write_dataset(os.path.join(root, "tars"), "aa", "train", [rows for groups in FILES for rows in groups])
    write_dataset(os.path.join(root, "tars"), "bb", "train", [11])
    write_hf_snapshot(os.path.join(root, "pq"), "aa", "train", FILES)
    return root


def twin_configs(root, **kwargs):
    tars = make_config(os.path.join(root, "tars"), train=("aa", "bb"), **kwargs)
    parquet = make_config(os.path.join(root, "tars"), train=("aa", "bb"), **kwargs)
    parquet.data.datasets = {"aa": DatasetSource(parquet=os.path.join(root, "pq", "aa", "data", "train-*.parquet"))}
    return tars, parquet


def assert_same_stream(got, want, keys):
    assert len(got) == len(want)
    for mine, theirs in zip(got, want):
        assert mine.step == theirs.step and mine.dataset == theirs.dataset
        assert [keys.get(key, key) for key in mine.keys] == theirs.keys
        assert torch.equal(mine.images, theirs.images) and torch.equal(mine.input_ids, theirs.input_ids)


# --------------------------------------------------------------------------------------------------
# The stream: the tar stream of the same rows, on every rank; exact resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,num_workers", [("shuffle", 2), ("debias", 0)])
def test_parquet_stream_is_the_tar_stream_of_the_same_rows(twin_datasets, tokenizer, mode, num_workers):
    tars, parquet = twin_configs(twin_datasets, batch_size=8, num_workers=num_workers, train_type=mode)
    keys = key_map(twin_datasets, "aa", "train", FILES)
    for rank in range(2):
        loader = build_train_loader(parquet, rank, 2, tokenizer)
        assert loader.steps_per_epoch == build_train_loader(tars, rank, 2, tokenizer).steps_per_epoch
        got = take(loader, 9)  # crosses an epoch boundary (3 steps per epoch)
        assert_same_stream(got, take(build_train_loader(tars, rank, 2, tokenizer), 9), keys)
        assert loader.error_counts() == {}


def test_parquet_resume_continues_exactly_mid_epoch(twin_datasets, tokenizer):
    _, cfg = twin_configs(twin_datasets, batch_size=8, num_workers=2, train_type="shuffle",
                          extra={"transforms.train_transforms": ["random_resize_crop", "autoaug"]})
    reference = take(build_train_loader(cfg, 1, 2, tokenizer), 7)
    for stop in (2, 4):  # mid-epoch (3 steps per epoch), in the first epoch and the second
        first = build_train_loader(cfg, 1, 2, tokenizer)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
        resumed = build_train_loader(cfg, 1, 2, tokenizer)
        resumed.load_state_dict(state)
        assert_same_stream(take(resumed, len(reference) - stop), reference[stop:], {})


# --------------------------------------------------------------------------------------------------
# Validation: every row once; a list of captions is an image's several captions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (3, 2)])
def test_validation_reads_every_row_once_with_its_captions(tmp_path, tokenizer, world_size, num_workers):
    root = str(tmp_path)
    write_hf_snapshot(root, "val", "validation", [[3, 2], [4]], captions_per_image=3)
    cfg = parquet_config(root, "val", "val/data/validation-*.parquet", valid=("val",), batch_size=6,
                         num_workers=num_workers)
    ids = []
    for rank in range(world_size):
        loader = build_valid_loader(cfg, "val", rank, world_size, tokenizer)
        for batch in loader:
            ids += batch.image_ids.tolist()
            assert batch.caption_image_ids.tolist() == [i for i in batch.image_ids.tolist() for _ in range(3)]
            texts = [f"val {i} caption {j}" for i in batch.image_ids.tolist() for j in range(3)]
            assert batch.input_ids.tolist() == tokenize(tokenizer, texts, 12)[0].tolist()
        assert loader.error_counts() == {}
    assert sorted(ids) == list(range(9))  # an image's id is its row in the dataset


def test_img2dataset_columns_and_named_columns(tmp_path, tokenizer):
    """img2dataset's `jpg` binary and `caption` string columns are found by default; other names are chosen."""
    root = str(tmp_path)
    images = [image_bytes(i) for i in range(6)]
    captions = [f"web caption {i}" for i in range(6)]
    write_parquet(os.path.join(root, "web", "00000.parquet"),
                  {"key": [f"{i:09d}" for i in range(6)], "jpg": images, "caption": captions}, [6])
    write_parquet(os.path.join(root, "named", "part.parquet"), {"picture": images, "alt": captions}, [4, 2])
    for name, source in {"web": DatasetSource(parquet="web"),
                         "named": DatasetSource(parquet="named", image_column="picture", caption_column="alt")
                         }.items():
        cfg = make_config(root, valid=(name,), batch_size=6)
        cfg.data.datasets = {name: source}
        batches = list(build_valid_loader(cfg, name, 0, 1, tokenizer))
        assert [i for b in batches for i in b.image_ids.tolist()] == list(range(6))
        assert [row for b in batches for row in b.input_ids.tolist()] == tokenize(tokenizer, captions, 12)[0].tolist()
    with pytest.raises(DataSourceError, match=r"none of the columns image, jpg.*picture, alt.*image_column"):
        resolve_dataset(parquet_config(root, "named", "named").data, "named", ["valid"])


# --------------------------------------------------------------------------------------------------
# Bad rows: skipped and counted by reason, under the skip budget
# --------------------------------------------------------------------------------------------------


def write_bad_rows(path):
    """Eight good rows and one of each bad row; returns the expected counts by reason."""
    good = [({"bytes": image_bytes(i), "path": f"g{i}.jpg"}, [f"good {i}"]) for i in range(8)]
    bad = [(None, ["no image cell"]),
           ({"bytes": None, "path": "elsewhere/x.jpg"}, ["only a path"]),
           ({"bytes": b"", "path": None}, ["zero bytes"]),
           ({"bytes": b"\xff\xd8 not a jpeg", "path": None}, ["corrupt"]),
           ({"bytes": png_bomb(), "path": None}, ["a decompression bomb"]),
           ({"bytes": image_bytes(50), "path": None}, None),
           ({"bytes": image_bytes(51), "path": None}, []),
           ({"bytes": image_bytes(52), "path": None}, [None, "  "])]
    rows = good[:4] + bad + good[4:]
    write_parquet(path, {"image": [r[0] for r in rows], "caption": [r[1] for r in rows]}, [8, 8],
                  types={"image": hf_image_type(), "caption": pa.list_(pa.string())})
    return {"missing_image": 3, "corrupt_image": 1, "too_many_pixels": 1, "missing_caption": 3}


def test_bad_rows_are_counted_by_reason_in_validation_and_training(tmp_path, tokenizer):
    root = str(tmp_path)
    expected = write_bad_rows(os.path.join(root, "bad", "rows.parquet"))
    cfg = parquet_config(root, "bad", "bad", valid=("bad",), train=("bad",), batch_size=4, num_workers=2)
    totals, keys = Counter(), []
    for rank in range(2):
        loader = build_valid_loader(cfg, "bad", rank, 2, tokenizer)
        keys += [k for b in loader for k in b.keys]
        totals.update(loader.error_counts())
    assert dict(totals) == expected
    assert sorted(keys) == sorted(f"rows.parquet/{row}" for row in [0, 1, 2, 3, 12, 13, 14, 15])
    loader = build_train_loader(cfg, 0, 1, tokenizer)  # 16 rows planned: 4 steps an epoch
    batches = take(loader, 4)  # 16 good samples: the 8 of the first epoch, then as many of the next
    assert all(len(b.keys) == 4 for b in batches)
    counts = loader.error_counts()
    assert set(counts) == set(expected) and all(counts[reason] >= n for reason, n in expected.items())
    # the skip budget sees them: 3 of 16 rows missing an image is above 10% of the window
    cfg.data.max_skip_fraction, cfg.data.skip_window = 0.1, 16
    loader = build_train_loader(cfg, 0, 1, tokenizer)
    take(loader, 2)
    with pytest.raises(DataLossError, match=r"\[missing_image\].*rows\.parquet"):
        loader.check_skips([loader.skip_report()])


# --------------------------------------------------------------------------------------------------
# Bounded reads: the footer decides before any row is read
# --------------------------------------------------------------------------------------------------


def read_all(path, max_bytes):
    """Every row group of ``path`` through the reader; (keys read, counts)."""
    groups = pq.ParquetFile(path).metadata
    layout = ParquetLayout(tuple(range(groups.num_row_groups)), "image", "caption")
    faults, keys = FailureCounter(), []
    for unit in range(groups.num_row_groups):
        rows = groups.row_group(unit).num_rows
        keys += [raw.key for raw in read_row_group(path, unit, layout, 0, rows, faults, max_bytes=max_bytes)]
    return keys, faults.counts


def noise(size, seed=0):
    """Bytes no codec compresses."""
    return np.random.default_rng(seed).bytes(size)


def test_a_huge_cell_and_a_decompression_bomb_are_skipped_unread(tmp_path):
    path = str(tmp_path / "big.parquet")
    zeros = bytes(16 << 20)  # 16 MiB that zstd stores in a few kB
    cells = [image_bytes(0), image_bytes(1), zeros, image_bytes(2), noise(3 << 19)]
    write_parquet(path, {"image": cells, "caption": ["a", "b", "c", "d", "e"]}, [2, 2, 1], compression="zstd")
    assert os.path.getsize(path) < 2 << 20  # the bomb: 16 MiB declared, a few kB on disk
    keys, counts = read_all(path, max_bytes=1 << 20)
    assert keys == ["big.parquet/0", "big.parquet/1"]
    assert counts == {"row_group_too_large": 3}  # the bomb's row group (2 rows) and the 1.5 MiB cell's (1 row)
    keys, counts = read_all(path, max_bytes=1 << 30)  # the default bound reads them
    assert len(keys) == 5 and counts == {}


def test_cut_and_damaged_files_lose_only_their_row_groups(tmp_path):
    path = str(tmp_path / "d.parquet")
    cells = [image_bytes(i) for i in range(4)] + [noise(200_000, seed) for seed in range(2)]
    write_parquet(path, {"image": cells, "caption": [f"c{i}" for i in range(6)]}, [2, 2, 2], compression="snappy")
    data = open(path, "rb").read()
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    # the last row group's image chunk cut out, the footer kept: its offsets now run past the end of the file
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[:start] + data[start + chunk.total_compressed_size:])
    keys, counts = read_all(str(cut), 1 << 30)
    assert keys == [f"cut.parquet/{i}" for i in range(4)] and counts == {"truncated_shard": 2}
    # garbage over the middle row group's pages (no valid page header): that row group fails, the others are read
    middle = pq.ParquetFile(path).metadata.row_group(1).column(0)
    begin = middle.dictionary_page_offset or middle.data_page_offset
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(data[:begin] + b"\xff" * middle.total_compressed_size +
                        data[begin + middle.total_compressed_size:])
    keys, counts = read_all(str(damaged), 1 << 30)
    assert keys == ["damaged.parquet/0", "damaged.parquet/1", "damaged.parquet/4", "damaged.parquet/5"]
    assert counts == {"truncated_shard": 2}


def test_many_files_read_side_by_side_keep_their_readers(tmp_path):
    """A shuffle piece reads a part of each dataset in turn: more files than the reader keeps open at once must not
    lose a file that a part is still reading."""
    from zvl_ds.data.parquet_reader import READ_BATCH_ROWS, row_batches

    rows = 2 * READ_BATCH_ROWS + 1
    paths = [str(tmp_path / f"f{i}.parquet") for i in range(12)]
    for index, path in enumerate(paths):
        write_parquet(path, {"image": [noise(20_000, index)] * rows, "caption": [f"c{index}"] * rows}, [rows],
                      use_dictionary=False)  # 2.6 MB a row group: a later batch reads beyond the first buffer
    layout = ParquetLayout((0,), "image", "caption")
    readers = [row_batches(path, 0, layout, 0, rows) for path in paths]
    seen = {path: 0 for path in paths}
    for _ in range(3):  # a batch of each file in turn, three times
        for path, reader in zip(paths, readers):
            batch = next(reader)
            assert set(batch.images) == {noise(20_000, paths.index(path))}
            seen[path] += len(batch.images)
    assert set(seen.values()) == {rows}


def test_a_file_gone_bad_after_the_start_is_counted_without_hanging(tmp_path, tokenizer):
    root = str(tmp_path)
    write_hf_snapshot(root, "val", "validation", [[3], [4]])
    cfg = parquet_config(root, "val", "val/data", valid=("val",), batch_size=4)
    loader = build_valid_loader(cfg, "val", 0, 1, tokenizer)  # resolved: 7 rows planned
    first, second = sorted(os.listdir(os.path.join(root, "val", "data")))
    with open(os.path.join(root, "val", "data", first), "r+b") as handle:
        handle.truncate(100)  # its footer is gone
    os.remove(os.path.join(root, "val", "data", second))
    os.mkfifo(os.path.join(root, "val", "data", second))  # nobody writes it: opening it would block
    assert list(loader) == [] and loader.error_counts() == {"unreadable_shard": 7}


def test_unusable_files_and_columns_are_refused_at_the_start(tmp_path):
    root = str(tmp_path)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    write_parquet(os.path.join(root, "ints.parquet"), {"image": [b"x"], "caption": [3]}, [1])
    cases = {"junk.parquet": r"junk\.parquet: not a readable Parquet file",
             "ints.parquet": r"caption column 'caption' is int64: it must be a string or a list of strings",
             "nothing-*.parquet": r"matches no Parquet file",
             "https://example.invalid/x.parquet": r"local files"}
    for spec, message in cases.items():
        with pytest.raises(DataSourceError, match=message):
            resolve_dataset(parquet_config(root, "d", spec).data, "d", ["train"])
    write_parquet(os.path.join(root, "ok.parquet"), {"image": [b"x"] * 3, "caption": ["a"] * 3}, [3])
    data = parquet_config(root, "d", "ok.parquet").data
    data.datasets["d"].size = 4
    with pytest.raises(DataSourceError, match=r"size=4, but its Parquet files hold 3 rows"):
        resolve_dataset(data, "d", ["train"])
    refused = [({"parquet": "x.parquet", "shards": "y"}, r"drop `shards` / `folder`"),
               ({"parquet": "x.parquet", "folder": "y"}, r"drop `shards` / `folder`"),
               ({"image_column": "img"}, r"data\.datasets\.d\.image_column: .*set data\.datasets\.d\.parquet")]
    for entry, message in refused:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"data": {"datasets": {"d": entry}}})


# --------------------------------------------------------------------------------------------------
# No code from data; pyarrow is an extra
# --------------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _PickledType(pa.ExtensionType):
    """The type name pyarrow before 14.0.1 unpickled from a file's metadata (CVE-2023-47248)."""

    def __init__(self, payload=b""):
        self.payload = payload
        super().__init__(pa.binary(), "arrow.py_extension_type")

    def __arrow_ext_serialize__(self):
        return self.payload

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        return cls(serialized)


def test_no_code_runs_from_a_file_and_extension_columns_are_refused(tmp_path, tokenizer):
    root = str(tmp_path)
    trap = str(tmp_path / "unpickled")
    images = pa.array([image_bytes(i) for i in range(3)], pa.binary())
    typed = pa.ExtensionArray.from_storage(_PickledType(pickle.dumps(_Trap(trap))), images)
    pq.write_table(pa.table({"image": typed, "caption": ["a", "b", "c"]}), os.path.join(root, "trap.parquet"))
    cfg = parquet_config(root, "t", "trap.parquet", valid=("t",), batch_size=3)
    batches = list(build_valid_loader(cfg, "t", 0, 1, tokenizer))  # read as its plain storage, binary
    assert [k for b in batches for k in b.keys] == [f"trap.parquet/{i}" for i in range(3)]
    assert not os.path.exists(trap)
    pa.register_extension_type(_PickledType())  # a type this process registered itself is not plain binary
    try:
        with pytest.raises(DataSourceError, match=r"image column 'image' is extension<arrow\.py_extension_type"):
            resolve_dataset(cfg.data, "t", ["valid"])
    finally:
        pa.unregister_extension_type("arrow.py_extension_type")
    assert not os.path.exists(trap)


def test_without_pyarrow_a_parquet_source_exits_2_naming_the_extra(tmp_path, monkeypatch, capsys):
    write_parquet(str(tmp_path / "a.parquet"), {"image": [b"x"], "caption": ["a"]}, [1])
    for module in ("pyarrow", "pyarrow.parquet", "pyarrow.fs", "pyarrow.types"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as where it is not installed
    data = parquet_config(str(tmp_path), "d", "a.parquet").data
    assert run(lambda: resolve_dataset(data, "d", ["train"])) == 2
    message = capsys.readouterr().err
    assert "data.datasets.d.parquet" in message and "needs pyarrow" in message and '".[parquet]"' in message


# --------------------------------------------------------------------------------------------------
# The benchmark compares the same images
# --------------------------------------------------------------------------------------------------


def test_the_format_benchmark_reads_the_same_samples_from_both(tmp_path):
    from zvl_ds.bench.data_formats import _config, benchmark_formats, write_both_formats
    from zvl_ds.data.pieces import read_unit
    from zvl_ds.data.reader import FieldLoader

    write_both_formats(str(tmp_path / "data"), 250, image_size=64, files=2)
    contents = {}
    for form in ("tar", "parquet"):
        cfg = _config(str(tmp_path / "data"), form, 0, 8, 56, "zvl_ds:demo_tokenizer")
        dataset = resolve_dataset(cfg.data, "bench", ["train"])
        fields, samples = FieldLoader(), []
        for unit, size in enumerate(dataset.shard_sizes):
            for raw in read_unit(dataset, unit, 0, size, FailureCounter()):
                loaded = fields.load(raw)
                samples.append((loaded["jpg"], json.loads(loaded["json"])["captions"]))
        fields.close()
        contents[form] = samples
    assert len(contents["tar"]) == 250 and contents["tar"] == contents["parquet"]
    assert resolve_dataset(_config(str(tmp_path / "data"), "parquet", 0, 8, 56, "").data, "bench",
                           ["train"]).shard_sizes == (100, 25, 100, 25)  # row groups as a snapshot's
    (tmp_path / "work").mkdir()
    result = benchmark_formats(workers=(1,), rounds=1, image_size=64, crop_size=56, batch_size=8, batches=2,
                               warmup=1, root=str(tmp_path / "work"), verbose=False)
    rates = result["loader"]["workers=1"]
    assert rates["tar"] > 0 and rates["parquet"] > 0
    assert rates["ratio"] == pytest.approx(rates["parquet"] / rates["tar"])
    assert os.listdir(tmp_path / "work") == []  # its data removed


# --------------------------------------------------------------------------------------------------
# docs/workflow.md: the snapshot its lines write trains and evaluates with its commands' settings
# --------------------------------------------------------------------------------------------------


def test_the_workflow_pages_parquet_example_runs_as_written(tmp_path, monkeypatch, tokenizer):
    import re
    import shlex

    from tests.helpers.paths import REPO_ROOT
    from zvl_ds import make_shards
    from zvl_ds.config import load_config
    from zvl_ds.data.writing.demo import make_demo_data

    page = open(os.path.join(REPO_ROOT, "docs", "workflow.md"), encoding="utf-8").read()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "hf_demo" in block)
    commands = [re.sub(r"\\\n\s*", " ", block).strip() for block in re.findall(r"```bash\n(.*?)```", page, flags=re.S)
                if "hf_demo" in block]
    lines = [line for block in commands for line in block.splitlines()]
    train = shlex.split(next(line for line in lines if "-m zvl_ds.train" in line))
    monkeypatch.chdir(tmp_path)
    make_demo_data("data", train_size=24, valid_size=6)  # the page's make_demo_data, smaller
    exec(compile(snippet, "docs/workflow.md", "exec"), {"__name__": "__main__"})
    overrides = [word for word in train if re.match(r"^[a-z_]+(\.[a-z_0-9]+)*=", word)]
    cfg = load_config(os.path.join(REPO_ROOT, train[train.index("--cfg") + 1]),
                      overrides + ["data.batch_size=8", "data.batch_size_train=8"])
    batches = take(build_train_loader(cfg, 0, 1, tokenizer), 4)  # 3 steps a pass of 24 rows
    assert {k for b in batches[:3] for k in b.keys} == {f"train-00000-of-00001.parquet/{i}" for i in range(24)}
    valid = list(build_valid_loader(cfg, "hf_demo_val", 0, 1, tokenizer))
    assert sum(len(b.keys) for b in valid) == 6 and sum(len(b.caption_ids) for b in valid) == 30  # 5 captions each
    for line in lines:
        words = shlex.split(line)
        if "zvl_ds.make_shards" in words:
            assert make_shards.main(words[words.index("zvl_ds.make_shards") + 1:] + ["--quiet"]) == 0
    assert sorted(os.listdir("shards")) == ["hf_demo", "hf_demo_val"]
