"""Bounded reads of every input: YAML aliases, image files (FIFOs, devices, huge or sparse files, links out of the
image folder), float images, crafted model folders. Faults are planted with real files."""
import os

import pytest

from tests.helpers.paths import REPO_ROOT
from zvl_ds.config import ConfigError, load_config
from zvl_ds.config.load import MAX_EXPANDED_YAML_NODES


def alias_bomb(levels=9, width=9):
    lines = ["model:", "  text_encoder:", "    config:", "      a0: &a0 [" + ",".join(['"lol"'] * width) + "]"]
    lines += [f"      a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_yaml_aliases_are_bounded_in_config_files_and_overrides(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"_base_: {os.path.join(REPO_ROOT, 'configs', 'demo.yaml')}\n" + alias_bomb())
    with pytest.raises(ConfigError, match=r"bomb\.yaml: YAML aliases .* more than 100000 values"):
        load_config(str(bomb))
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("model:\n  text_encoder:\n    config: &me {inner: *me}\n")
    with pytest.raises(ConfigError, match="refers to a value that contains it"):
        load_config(str(recursive))
    # an override cannot smuggle one in either: it is read by the same loader
    with pytest.raises(ConfigError):
        load_config(None, ["model.text_encoder.config=" + alias_bomb().split("config:")[1].replace("\n", " ")])


def test_ordinary_anchors_still_load(tmp_path):
    config = tmp_path / "anchors.yaml"
    config.write_text(f"_base_: {os.path.join(REPO_ROOT, 'configs', 'demo.yaml')}\n"
                      "transforms:\n  normalize:\n    mean: &half [0.5, 0.5, 0.5]\n    std: *half\n")
    cfg = load_config(str(config))
    assert cfg.transforms.normalize.std == [0.5, 0.5, 0.5]
    # the limit counts expanded values: a document just under it loads
    wide = tmp_path / "wide.yaml"
    wide.write_text("model:\n  text_encoder:\n    config:\n      a: &a [" + ",".join(["1"] * 99) + "]\n"
                    "      b: [" + ",".join(["*a"] * (MAX_EXPANDED_YAML_NODES // 120)) + "]\n")
    assert len(load_config(str(wide)).model.text_encoder.config["b"]) == MAX_EXPANDED_YAML_NODES // 120


def test_image_files_are_read_up_to_the_size_limit_only(tmp_path):
    from zvl_ds.data.failures import SampleSkipped
    from zvl_ds.data.writing.images import read_image_file

    image = tmp_path / "a.jpg"
    image.write_bytes(b"x" * 1000)
    assert read_image_file(str(image), str(tmp_path), max_bytes=1000) == b"x" * 1000
    with pytest.raises(SampleSkipped, match=r"1000 bytes > limit 999") as skipped:
        read_image_file(str(image), str(tmp_path), max_bytes=999)
    assert skipped.value.reason == "file_too_large"
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(SampleSkipped, match="a folder") as skipped:
        read_image_file(str(tmp_path / "folder.jpg"), str(tmp_path))
    assert skipped.value.reason == "not_a_regular_file"
    with pytest.raises(SampleSkipped) as skipped:
        read_image_file(str(tmp_path / "gone.jpg"), str(tmp_path))
    assert skipped.value.reason == "missing_file"


def test_float_pixels_are_a_bad_row_not_a_black_image():
    import io

    import numpy as np
    from PIL import Image

    from zvl_ds.data.failures import SampleSkipped
    from zvl_ds.data.writing.images import convert_image
    from zvl_ds.data.writing.shard_writer import ShardSettings

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0.75, dtype=np.float32), mode="F").save(buffer, format="TIFF")
    with pytest.raises(SampleSkipped, match="floating-point pixels") as skipped:
        convert_image(buffer.getvalue(), ShardSettings())
    assert skipped.value.reason == "float_image"
    buffer = io.BytesIO()  # 8-bit grey still converts, with its values
    Image.fromarray(np.full((8, 8), 191, dtype=np.uint8), mode="L").save(buffer, format="TIFF")
    converted = convert_image(buffer.getvalue(), ShardSettings())
    assert abs(int(np.asarray(Image.open(io.BytesIO(converted.jpeg))).mean()) - 191) <= 2


def test_lines_the_csv_parser_leaves_in_no_row_are_counted(tmp_path):
    from zvl_ds.data.writing.annotations import read_annotations

    csv_path = tmp_path / "train_anno.csv"
    csv_path.write_text("image,caption\na.jpg,one\nb.jpg,two,extra\nc.jpg,\"three\nstill three\"\n\n")
    annotations = read_annotations(str(csv_path))
    # b.jpg has a field too many (the parser skips it); c.jpg's caption spans two lines (kept); the blank line is none
    assert annotations.row_failures.counts == {"malformed_row": 1}
    assert annotations.rows_read == 3
    assert [entry.captions for entry in annotations.entries] == [["one"], ["three\nstill three"]]


def test_json_nested_100k_deep_is_a_clear_error_in_every_file_the_project_reads(tmp_path):
    from zvl_ds.config import Config
    from zvl_ds.data.sources import shard_sizes_from_files
    from zvl_ds.runtime.checkpoint import CheckpointError, read_manifest
    from zvl_ds.runtime.engine import build_ds_config

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "manifest.json").write_text(deep)
    with pytest.raises(CheckpointError, match=r"manifest\.json is not a valid checkpoint manifest: RecursionError"):
        read_manifest(str(tmp_path))
    (tmp_path / "ds.json").write_text(deep)
    with pytest.raises(ConfigError, match=r"ds\.json: JSON nested too deeply"):
        build_ds_config(str(tmp_path / "ds.json"), Config(), 1)
    (tmp_path / "sizes.json").write_text(deep)  # a size file that cannot be read leaves the sizes unknown
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"")
    sizes, unknown = shard_sizes_from_files([str(shard)])
    assert sizes == [None] and unknown == [str(shard)]
