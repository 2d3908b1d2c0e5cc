"""make_shards --parquet: Parquet rows -> the shard writer's tars. The reference is the CSV path of the same writer:
the same images as files and a CSV give the same image members, captions and shard layout. Resume and bad rows as
the CSV path's tests check them, with planted faults."""
from __future__ import annotations

import glob
import io
import json
import os

import pytest
from PIL import Image

from tests.helpers.data_fixtures import image_bytes
from tests.helpers.parquet_fixtures import hf_image_type, write_parquet
from tests.unit.test_parquet_source import write_bad_rows
from tests.unit.test_shards import read_back, tar_bytes, write_csv
from zvl_ds import make_shards
from zvl_ds.data.writing import annotations
from zvl_ds.data.writing import parquet_shards
from zvl_ds.data.writing import shard_writer as shards

pa = pytest.importorskip("pyarrow")  # the optional extra `parquet`; CI installs it

SETTINGS = shards.ShardSettings(samples_per_shard=3, max_size=24)
IMAGES = 10


def same_images(root):
    """IMAGES images (48x40: --max-size 24 resizes them) as files with a CSV, and as two Parquet files of row
    groups [4, 2] and [4], a Hugging Face Image column and a list of two captions per row."""
    images = [image_bytes(i, size=(48, 40)) for i in range(IMAGES)]
    captions = [[f"caption {k} of image {i}" for k in range(2)] for i in range(IMAGES)]
    folder = os.path.join(root, "csv", "ds", "train")
    os.makedirs(folder)
    for i, data in enumerate(images):
        with open(os.path.join(folder, f"img_{i}.jpg"), "wb") as handle:
            handle.write(data)
    write_csv(os.path.join(root, "csv", "ds", "train_anno.csv"), ["image", "caption"],
              [[f"img_{i}.jpg", caption] for i in range(IMAGES) for caption in captions[i]])
    cells = [{"bytes": data, "path": f"img_{i}.jpg"} for i, data in enumerate(images)]
    for name, rows, groups in (("train-00000-of-00002.parquet", slice(0, 6), [4, 2]),
                               ("train-00001-of-00002.parquet", slice(6, 10), [4])):
        write_parquet(os.path.join(root, "hf", "data", name), {"image": cells[rows], "caption": captions[rows]},
                      groups, types={"image": hf_image_type()})
    return os.path.join(root, "hf", "data", "train-*.parquet")


def convert(spec, out, policy="refuse", workers=1, settings=SETTINGS):
    return parquet_shards.convert_parquet(spec, "ds", "train", str(out), settings, workers, policy)


def test_parquet_rows_become_the_shards_the_csv_path_writes(tmp_path):
    spec = same_images(str(tmp_path))
    reference = shards.convert_split(annotations.resolve_sources(str(tmp_path / "csv"), ["ds"], "train")[0][0],
                                     str(tmp_path / "from_csv"), SETTINGS)
    report = convert(spec, tmp_path / "out", workers=2)  # the pool path: tasks cross to worker processes
    assert report.images_written == reference.images_written == IMAGES and report.shards == 4
    got, want = read_back(tmp_path / "out" / "ds"), read_back(tmp_path / "from_csv" / "ds")
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want]
    assert [s["jpg"] for s in got] == [s["jpg"] for s in want]  # the same conversion of the same image
    assert [s["txt"] for s in got] == [s["txt"] for s in want]
    metas = [json.loads(s["json"]) for s in got]
    assert [m["captions"] for m in metas] == [json.loads(s["json"])["captions"] for s in want]
    assert [m["image_id"] for m in metas] == list(range(IMAGES))
    assert [m["caption_ids"] for m in metas] == [[2 * i, 2 * i + 1] for i in range(IMAGES)]
    assert metas[7]["image"] == "train-00001-of-00002.parquet/1"
    assert Image.open(io.BytesIO(got[0]["jpg"])).size == (29, 24)  # shorter side resized to --max-size (28.8)
    sizes = json.load(open(tmp_path / "out" / "ds" / "sizes.json"))
    assert sizes == json.load(open(tmp_path / "from_csv" / "ds" / "sizes.json"))
    stats = json.load(open(tmp_path / "out" / "ds" / "train_stats.json"))
    assert len(stats["parquet"]) == 2 and "csv" not in stats and stats["images_written"] == IMAGES
    assert tar_bytes(tmp_path / "out" / "ds") == tar_bytes(convert(spec, tmp_path / "one").out_dir)  # 1 worker


def test_resume_keeps_complete_shards_and_redoes_the_rest(tmp_path):
    spec = same_images(str(tmp_path))
    convert(spec, tmp_path / "ref")
    reference = tar_bytes(tmp_path / "ref" / "ds")
    convert(spec, tmp_path / "out")
    out_dir = tmp_path / "out" / "ds"
    os.remove(out_dir / "train-000001.tar")  # killed before the rename
    with open(out_dir / "train-000002.tar", "r+b") as handle:  # damaged
        handle.truncate(1000)
    (out_dir / "train-000003.tar.tmp").write_bytes(b"partial")
    with pytest.raises(annotations.InputError, match="--resume"):
        convert(spec, tmp_path / "out")
    report = convert(spec, tmp_path / "out", policy="resume")
    assert report.shards_reused == 2  # shards 0 and 3
    assert tar_bytes(out_dir) == reference and not glob.glob(str(out_dir / "*.tmp"))
    # a Parquet file written again (its rows the same) is new input: the shards reading it are redone
    second = tmp_path / "hf" / "data" / "train-00001-of-00002.parquet"
    os.utime(second, ns=(os.stat(second).st_atime_ns, os.stat(second).st_mtime_ns + 10**9))
    report = convert(spec, tmp_path / "out", policy="resume")
    assert report.shards_reused == 2  # shards 2 and 3 read rows 6..9, which are in the second file
    assert tar_bytes(out_dir) == reference


def test_bad_rows_are_counted_and_the_rest_written(tmp_path):
    write_bad_rows(str(tmp_path / "bad.parquet"))
    report = convert(str(tmp_path / "bad.parquet"), tmp_path / "out",
                     settings=shards.ShardSettings(samples_per_shard=5, max_size=24))
    # the writer's own names where it has them: bytes that are no image are not_an_image, as for an image file
    assert report.image_failures.counts == {"missing_image": 3, "no_valid_caption": 3, "not_an_image": 1,
                                            "too_many_pixels": 1}
    assert report.images_written == 8
    assert [json.loads(s["json"])["captions"] for s in read_back(tmp_path / "out" / "ds")] == [
        [f"good {i}"] for i in range(8)]


def test_the_command_line(tmp_path, capsys):
    spec = same_images(str(tmp_path))
    base = ["--parquet", spec, "--dataset", "ds", "--out", str(tmp_path / "out"), "--quiet", "--samples-per-shard",
            "3", "--max-size", "24", "--workers", "1"]
    assert make_shards.main(base + ["--split", "train"]) == 0
    assert sorted(os.listdir(tmp_path / "out" / "ds"))[:2] == ["sizes.json", "train-000000.tar"]
    cases = [([], "pass --split train or --split valid"),
             (["--split", "train"], "already holds train output"),
             (["--split", "train", "--resume", "--caption-column", "text"], "no column 'text' (--caption-column)"),
             (["--split", "valid", "--dataset", "other"], "one --dataset")]
    for extra, message in cases:
        assert make_shards.main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert make_shards.main(["--parquet", str(tmp_path / "none-*.parquet"), "--dataset", "x", "--split", "valid",
                             "--out", str(tmp_path / "o")]) == 2
    assert "matches no Parquet file" in capsys.readouterr().err
