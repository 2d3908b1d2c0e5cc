"""The shard writer: round trip through plain webdataset, bad input, CSV errors, determinism, resume, modes."""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests.helpers.paths import REPO_ROOT
from zvl_ds import make_shards
from zvl_ds.bench import data as bench
from zvl_ds.data.writing import annotations
from zvl_ds.data.writing import shard_writer as shards
from zvl_ds.data.writing.images import scaled_size

MAKE_SHARDS = ["-m", "zvl_ds.make_shards"]
PYTHON = sys.executable
CLI = make_shards

# make_shards with a disk that never answers for one image: reading ZVL_TEST_BLOCKED_IMAGE blocks on the FIFO
# ZVL_TEST_FIFO, which nobody writes (make_shards refuses a FIFO named as an image, so the stall is planted in the
# read; the workers are forked and inherit it).
STALLING_MAKE_SHARDS = """
import os, sys

from zvl_ds import make_shards
from zvl_ds.data.writing import shard_writer

BLOCKED, FIFO = os.environ["ZVL_TEST_BLOCKED_IMAGE"], os.environ["ZVL_TEST_FIFO"]
read_image_file = shard_writer.read_image_file


def stalling_read(path, *args, **kwargs):
    if os.path.basename(path) == BLOCKED:
        with open(FIFO, "rb") as handle:
            return handle.read()
    return read_image_file(path, *args, **kwargs)


shard_writer.read_image_file = stalling_read
sys.exit(make_shards.cli())
"""


def stalling_make_shards(tmp_path, blocked_image, args):
    script = tmp_path / "stalling_make_shards.py"
    script.write_text(STALLING_MAKE_SHARDS)
    fifo = tmp_path / "slow_disk"
    os.mkfifo(fifo)
    from tests.helpers.processes import child_env

    env = dict(child_env(), ZVL_TEST_BLOCKED_IMAGE=blocked_image, ZVL_TEST_FIFO=str(fifo))
    return subprocess.Popen([PYTHON, str(script), *args], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def solid(path, size=(24, 16), colour=(200, 30, 30), fmt="JPEG", mode="RGB", **save):
    Image.new(mode, size, colour).save(path, format=fmt, **save)


def write_csv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def make_dataset(root, name="ds", split="train", images=7, captions_per_image=2, with_ids=True, size=(24, 16)):
    """images solid JPEGs; rows interleaved so one image's rows are not adjacent. Returns the CSV rows."""
    folder = os.path.join(root, name)
    os.makedirs(os.path.join(folder, split), exist_ok=True)
    rows = []
    for k in range(captions_per_image):
        for i in range(images):
            rows.append([f"img_{i}.jpg", 100 + i, f"caption {k} of image {i}, with comma", 1000 + 10 * i + k])
    for i in range(images):
        solid(os.path.join(folder, split, f"img_{i}.jpg"), size=size, colour=(20 * i, 100, 200 - 20 * i))
    if with_ids:
        write_csv(os.path.join(folder, f"{split}_anno.csv"), ["image", "image_id", "caption", "caption_id"], rows)
    else:
        write_csv(os.path.join(folder, f"{split}_anno.csv"), ["image", "caption"], [[r[0], r[2]] for r in rows])
    return rows


def source_of(root, name="ds", split="train"):
    sources, _ = annotations.resolve_sources(str(root), [name], split)
    return sources[0]


def convert(root, out, settings=None, workers=1, policy="refuse", name="ds", split="train"):
    return shards.convert_split(source_of(root, name, split), str(out), settings or shards.ShardSettings(), workers,
                                policy)


def read_back(out_dir, split="train"):
    urls = sorted(glob.glob(os.path.join(out_dir, f"{split}-*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def tar_bytes(out_dir, split="train"):
    paths = sorted(glob.glob(os.path.join(out_dir, f"{split}-*.tar")))
    return {os.path.basename(p): open(p, "rb").read() for p in paths}


def run_cli(*args, timeout=120):
    return subprocess.run([PYTHON, *MAKE_SHARDS, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)


# ------------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------------


def test_round_trip_through_plain_webdataset(tmp_path):
    rows = make_dataset(tmp_path / "data", images=7, captions_per_image=3)
    report = convert(tmp_path / "data", tmp_path / "out", shards.ShardSettings(samples_per_shard=3))
    out_dir = tmp_path / "out" / "ds"
    # Reference: the CSV grouped by image in order of first appearance, with plain Python.
    expected = {}
    for image, image_id, caption, caption_id in rows:
        item = expected.setdefault(image, {"image_id": image_id, "captions": [], "caption_ids": []})
        item["captions"].append(caption)
        item["caption_ids"].append(caption_id)
    samples = read_back(out_dir)
    assert [json.loads(s["json"])["image"] for s in samples] == list(expected)  # order of first appearance
    for sample in samples:
        meta = json.loads(sample["json"])
        want = expected[meta["image"]]
        assert meta["image_id"] == want["image_id"]
        assert meta["captions"] == want["captions"]
        assert meta["caption_ids"] == want["caption_ids"]
        assert sample["txt"].decode() == want["captions"][0]
        assert "." not in sample["__key__"] and sample["__key__"].isdigit()
        assert set(meta) == {"image", "image_id", "captions", "caption_ids", "width", "height", "original_width",
                             "original_height", "dataset", "split"}
        assert (meta["dataset"], meta["split"]) == ("ds", "train")
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (meta["width"], meta["height"]) == (24, 16)
    assert len({s["__key__"] for s in samples}) == 7
    # Every CSV row came back exactly once.
    got_rows = sorted((json.loads(s["json"])["image"], c, cid) for s in samples
                      for c, cid in zip(json.loads(s["json"])["captions"], json.loads(s["json"])["caption_ids"]))
    assert got_rows == sorted((r[0], r[2], r[3]) for r in rows)
    # Sizes, stats and shard layout.
    assert sorted(os.listdir(out_dir)) == sorted(
        ["sizes.json", "train_stats.json"] + [f"train-{i:06d}.tar" for i in range(3)]
        + [f"train-{i:06d}_stats.json" for i in range(3)])
    assert json.load(open(out_dir / "sizes.json")) == {"train-000000.tar": 3, "train-000001.tar": 3,
                                                       "train-000002.tar": 1}
    shard_stats = json.load(open(out_dir / "train-000002_stats.json"))
    assert shard_stats["count"] == 1 and shard_stats["successes"] == 1 and shard_stats["status_dict"] == {"success": 1}
    split_stats = json.load(open(out_dir / "train_stats.json"))
    assert (split_stats["rows_read"], split_stats["images_written"], split_stats["captions_written"]) == (21, 7, 21)
    assert report.images_written == 7 and report.shards == 3 and report.skipped == 0


def test_tar_members_have_fixed_order_and_metadata(tmp_path):
    make_dataset(tmp_path / "data", images=2)
    convert(tmp_path / "data", tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "ds" / "train-000000.tar") as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == ["000000000000.jpg", "000000000000.json", "000000000000.txt",
                                         "000000000001.jpg", "000000000001.json", "000000000001.txt"]
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode) == (0, 0, 0, "", "",
                                                                                                 0o444)
        assert member.isreg()


def test_derived_ids_when_id_columns_are_missing(tmp_path):
    rows = make_dataset(tmp_path / "data", images=3, captions_per_image=2, with_ids=False)
    report = convert(tmp_path / "data", tmp_path / "out")
    assert report.derived_ids == ["image_id", "caption_id"]
    for sample in read_back(tmp_path / "out" / "ds"):
        meta = json.loads(sample["json"])
        digest = hashlib.blake2b(meta["image"].encode(), digest_size=8).digest()
        assert meta["image_id"] == int.from_bytes(digest, "big") & (2**63 - 1) and meta["image_id"] > 0
        # caption id = 0-based data row of that caption in the CSV
        assert meta["caption_ids"] == [i for i, r in enumerate(rows) if r[0] == meta["image"]]


# ------------------------------------------------------------------------------------------------
# bad input: skipped and counted, the rest written
# ------------------------------------------------------------------------------------------------


def test_each_bad_input_kind_is_counted_and_the_rest_written(tmp_path):
    folder = tmp_path / "data" / "ds"
    images = folder / "train"
    images.mkdir(parents=True)
    solid(images / "good1.jpg")
    solid(images / "good2.png", fmt="PNG")
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_bytes(b"this is not an image at all\n" * 10)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    solid(images / "bomb_warn.png", size=(60, 50), fmt="PNG")  # 3000 px: over the limit, under twice the limit
    solid(images / "bomb_error.png", size=(100, 100), fmt="PNG")  # 10000 px: Pillow's own error fires
    solid(images / "only_empty_captions.jpg")
    solid(images / "some_empty.jpg")
    lines = [
        b"image,image_id,caption,caption_id",
        b"good1.jpg,1,a good one,10",
        b"missing.jpg,2,no file,20",
        b"empty.jpg,3,zero bytes,30",
        b"text.jpg,4,not an image,40",
        b"truncated.jpg,5,cut in half,50",
        b"bomb_warn.png,6,big,60",
        b"bomb_error.png,7,bigger,70",
        b"only_empty_captions.jpg,8,,80",
        b"only_empty_captions.jpg,8,   ,81",
        b"some_empty.jpg,9,,90",
        b"some_empty.jpg,9,kept caption,91",
        b"good2.png,10,bad bytes \xff\xfe here,100",
        b"good2.png,10,a png,101",
        b"good2.png,ten,bad id,102",
        b"good1.jpg,1,too,many,fields",
        b"good1.jpg,1,second caption,11",
    ]
    (folder / "train_anno.csv").write_bytes(b"\n".join(lines) + b"\n")
    settings = shards.ShardSettings(samples_per_shard=4, max_pixels=2500)
    report = convert(tmp_path / "data", tmp_path / "out", settings)
    assert report.image_failures.counts == {"missing_file": 1, "empty_file": 1, "not_an_image": 1,
                                            "corrupt_image": 1, "too_many_pixels": 2, "no_valid_caption": 1}
    assert report.row_failures.counts == {"empty_caption": 3, "invalid_utf8": 1, "invalid_id": 1,
                                          "malformed_row": 1}
    written = {json.loads(s["json"])["image"]: json.loads(s["json"]) for s in read_back(tmp_path / "out" / "ds")}
    assert written["good1.jpg"]["captions"] == ["a good one", "second caption"]
    assert written["good1.jpg"]["caption_ids"] == [10, 11]
    assert written["some_empty.jpg"]["captions"] == ["kept caption"]
    assert written["good2.png"]["captions"] == ["a png"] and written["good2.png"]["caption_ids"] == [101]
    assert sorted(written) == ["good1.jpg", "good2.png", "some_empty.jpg"]
    assert report.rows_read == 16 and report.captions_written == 4
    # Per-shard stats add up and give examples; sizes.json agrees with the tars.
    total = {"count": 0, "successes": 0}
    for path in sorted(glob.glob(str(tmp_path / "out" / "ds" / "train-*_stats.json"))):
        stats = json.load(open(path))
        assert stats["successes"] + sum(v["count"] for v in stats["failures"].values()) == stats["count"]
        total["count"] += stats["count"]
        total["successes"] += stats["successes"]
    assert total == {"count": 10, "successes": 3}
    split_stats = json.load(open(tmp_path / "out" / "ds" / "train_stats.json"))
    assert split_stats["failures"]["images"]["missing_file"]["examples"][0].startswith("missing.jpg")
    assert "data row 2" in split_stats["failures"]["images"]["missing_file"]["examples"][0]
    assert sum(json.load(open(tmp_path / "out" / "ds" / "sizes.json")).values()) == 3
    # Exit codes: 0 normally, 1 under --strict when anything was skipped.
    assert shards.exit_status([report], strict=False) == 0
    assert shards.exit_status([report], strict=True) == 1
    assert CLI.main(["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "o2"),
                     "--max-pixels", "2500", "--strict", "--quiet", "--workers", "1"]) == 1


def test_nothing_written_exits_1(tmp_path):
    folder = tmp_path / "data" / "ds"
    (folder / "train").mkdir(parents=True)
    write_csv(folder / "train_anno.csv", ["image", "caption"], [["gone.jpg", "a caption"]])
    assert CLI.main(["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "out"),
                     "--quiet"]) == 1


# ------------------------------------------------------------------------------------------------
# image modes
# ------------------------------------------------------------------------------------------------


def _exif_rotated_jpeg(path):
    """Stored 40x20: left half red, right half blue; EXIF orientation 6 = rotate 90 degrees clockwise to view."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, format="JPEG", quality=95, exif=exif.tobytes())


def test_modes_and_orientation_are_converted(tmp_path):
    folder = tmp_path / "data" / "ds"
    images = folder / "train"
    images.mkdir(parents=True)
    solid(images / "grey.png", mode="L", colour=90, fmt="PNG")
    solid(images / "cmyk.jpg", mode="CMYK", colour=(0, 255, 255, 0), quality=95)  # pure red in CMYK
    rgba = Image.new("RGBA", (24, 16), (0, 255, 0, 0))  # fully transparent green: must come out white
    rgba.paste((255, 0, 0, 255), (0, 0, 12, 16))  # opaque red on the left half
    rgba.save(images / "rgba.png")
    palette = Image.new("P", (24, 16), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(images / "palette.png")
    sixteen = np.zeros((16, 24), dtype=np.uint16)
    sixteen[:, :8], sixteen[:, 8:16] = 65535, 32896  # white | mid grey (32896 / 257 = 128) | black
    Image.fromarray(sixteen).save(images / "sixteen.png")
    assert Image.open(images / "sixteen.png").mode.startswith("I")
    _exif_rotated_jpeg(images / "rotated.jpg")
    Image.new("RGB", (300, 150), (10, 200, 10)).save(images / "big.jpg", quality=95)
    Image.new("RGB", (400, 200), (10, 10, 200)).save(images / "big.png")
    solid(images / "small.jpg", size=(60, 40))
    names = ["grey.png", "cmyk.jpg", "rgba.png", "palette.png", "sixteen.png", "rotated.jpg", "big.jpg", "big.png",
             "small.jpg"]
    write_csv(folder / "train_anno.csv", ["image", "caption"], [[n, n] for n in names])
    report = convert(tmp_path / "data", tmp_path / "out", shards.ShardSettings(max_size=64))
    assert report.images_written == len(names)
    got = {}
    for sample in read_back(tmp_path / "out" / "ds"):
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (meta["width"], meta["height"])
        got[meta["image"]] = (meta, np.asarray(image).astype(int), sample["jpg"])

    def close(pixel, colour, tolerance=30):
        return np.abs(np.asarray(pixel) - np.asarray(colour)).max() <= tolerance

    assert close(got["grey.png"][1][8, 12], (90, 90, 90), 6)
    assert close(got["cmyk.jpg"][1][8, 12], (255, 0, 0), 40)
    assert close(got["rgba.png"][1][8, 3], (255, 0, 0)) and close(got["rgba.png"][1][8, 20], (255, 255, 255))
    assert close(got["palette.png"][1][8, 12], (0, 0, 255))
    pixels = got["sixteen.png"][1]
    assert close(pixels[8, 3], (255, 255, 255), 6) and close(pixels[8, 12], (128, 128, 128), 6)
    assert close(pixels[8, 20], (0, 0, 0), 6)
    meta, pixels, _ = got["rotated.jpg"]
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (20, 40, 20, 40)
    assert close(pixels[5, 10], (255, 0, 0)) and close(pixels[35, 10], (0, 0, 255))  # red on top after rotation
    for name, colour in (("big.jpg", (10, 200, 10)), ("big.png", (10, 10, 200))):
        meta, pixels, _ = got[name]
        assert (meta["width"], meta["height"]) == (128, 64)  # shorter side 64, aspect 2:1 kept
        assert (meta["original_width"], meta["original_height"]) == Image.open(images / name).size
        assert close(pixels[32, 64], colour, 8)
    assert got["small.jpg"][2] == (images / "small.jpg").read_bytes()  # JPEG within max-size: bytes kept


def test_scaled_size_keeps_aspect_and_never_upscales():
    assert scaled_size(640, 480, 256) == (341, 256)
    assert scaled_size(480, 640, 256) == (256, 341)
    assert scaled_size(200, 100, 256) == (200, 100)
    assert scaled_size(5000, 10, 5) == (2500, 5)
    assert scaled_size(640, 480, 0) == (640, 480)


# ------------------------------------------------------------------------------------------------
# CSV errors: exit 2 with a message, no traceback
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_csv_and_input_errors_exit_2_with_a_message(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, name="good", images=1)
    (data / "nocol").mkdir()
    (data / "nocol" / "train").mkdir()
    write_csv(data / "nocol" / "train_anno.csv", ["file", "text"], [["a.jpg", "x"]])
    (data / "empty").mkdir()
    (data / "empty" / "train").mkdir()
    (data / "empty" / "train_anno.csv").write_bytes(b"")
    (data / "header").mkdir()
    (data / "header" / "train").mkdir()
    (data / "header" / "train_anno.csv").write_text("image,caption\n")
    (data / "quote").mkdir()
    (data / "quote" / "train").mkdir()
    (data / "quote" / "train_anno.csv").write_text('image,caption\na.jpg,"never closed\nb.jpg,x\n')
    cases = [
        (["--dataset", "nocol"], ["nocol/train_anno.csv", "missing required column(s) image, caption",
                                  "columns found: file, text"]),
        (["--dataset", "empty"], ["empty/train_anno.csv", "empty"]),
        (["--dataset", "header"], ["header/train_anno.csv", "no data rows"]),
        (["--dataset", "quote"], ["quote/train_anno.csv", "cannot read the CSV"]),
        (["--dataset", "absent"], ["absent", "datasets under", "good", "nocol"]),
        (["--dataset", "good", "--split", "valid"], ["good/valid_anno.csv", "not found"]),
    ]
    for extra, fragments in cases:
        args = ["--data-root", str(data), "--out", str(tmp_path / "out"), "--quiet", *extra]
        result = run_cli(*args) if extra[1] == "nocol" else None  # one real subprocess; the rest in-process
        if result is not None:
            assert result.returncode == 2, result.stderr
            assert "Traceback" not in result.stderr
            message = result.stderr
        else:
            stderr = io.StringIO()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(sys, "stderr", stderr)
                assert CLI.main(args) == 2
            message = stderr.getvalue()
        for fragment in fragments:
            assert fragment in message, (extra, message)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_existing_output_is_refused_without_resume_or_overwrite(tmp_path):
    make_dataset(tmp_path / "data", split="train", images=2)
    make_dataset(tmp_path / "data", split="valid", images=3)
    args = ["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "out"), "--quiet"]
    assert CLI.main([*args, "--split", "train"]) == 0
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stderr", stderr)
        assert CLI.main([*args, "--split", "train"]) == 2
    assert "--resume" in stderr.getvalue() and "--overwrite" in stderr.getvalue()
    # Another split in the same folder is not "existing output"; sizes.json is merged, not clobbered.
    assert CLI.main([*args, "--split", "valid"]) == 0
    sizes = json.load(open(tmp_path / "out" / "ds" / "sizes.json"))
    assert sizes == {"train-000000.tar": 2, "valid-000000.tar": 3}
    before = tar_bytes(tmp_path / "out" / "ds", "train")
    assert CLI.main([*args, "--split", "train", "--overwrite"]) == 0
    assert tar_bytes(tmp_path / "out" / "ds", "train") == before
    assert json.load(open(tmp_path / "out" / "ds" / "sizes.json")) == sizes


# ------------------------------------------------------------------------------------------------
# determinism and resume
# ------------------------------------------------------------------------------------------------


def test_byte_identical_across_worker_counts(tmp_path):
    make_dataset(tmp_path / "data", images=9, size=(90, 70))
    os.remove(tmp_path / "data" / "ds" / "train" / "img_4.jpg")  # a failure inside a shard must not shift others
    settings = shards.ShardSettings(samples_per_shard=2, max_size=32)
    one = convert(tmp_path / "data", tmp_path / "w1", settings, workers=1)
    two = convert(tmp_path / "data", tmp_path / "w2", settings, workers=2)
    assert one.images_written == two.images_written == 8
    first, second = tar_bytes(tmp_path / "w1" / "ds"), tar_bytes(tmp_path / "w2" / "ds")
    assert len(first) == 5 and first == second
    assert (tmp_path / "w1" / "ds" / "sizes.json").read_bytes() == (tmp_path / "w2" / "ds" / "sizes.json").read_bytes()


def test_resume_after_simulated_kill_matches_uninterrupted_run(tmp_path):
    make_dataset(tmp_path / "data", images=10, size=(50, 40))
    settings = shards.ShardSettings(samples_per_shard=2, max_size=32)
    convert(tmp_path / "data", tmp_path / "ref", settings)
    reference = tar_bytes(tmp_path / "ref" / "ds")
    convert(tmp_path / "data", tmp_path / "out", settings)
    out_dir = tmp_path / "out" / "ds"
    kept_mtime = os.stat(out_dir / "train-000000.tar").st_mtime_ns
    os.remove(out_dir / "train-000001.tar")  # killed before the rename
    with open(out_dir / "train-000002.tar", "r+b") as handle:  # damaged (not something our writer leaves)
        handle.truncate(1000)
    os.remove(out_dir / "train-000003_stats.json")  # killed between the tar rename and its stats
    (out_dir / "train-000004.tar.tmp").write_bytes(b"partial")
    (out_dir / "train-000007.tar").write_bytes(b"stale shard from a bigger input")
    with pytest.raises(annotations.InputError, match="--resume"):
        convert(tmp_path / "data", tmp_path / "out", settings)
    report = convert(tmp_path / "data", tmp_path / "out", settings, policy="resume")
    assert report.shards_reused == 2  # shards 0 and 4
    assert tar_bytes(out_dir) == reference
    assert os.stat(out_dir / "train-000000.tar").st_mtime_ns == kept_mtime
    assert not glob.glob(str(out_dir / "*.tmp")) and not (out_dir / "train-000007.tar").exists()
    assert json.load(open(out_dir / "sizes.json")) == {f"train-{i:06d}.tar": 2 for i in range(5)}
    # A changed input invalidates the shards that depend on it, and only those.
    solid(tmp_path / "data" / "ds" / "train" / "img_9.jpg", size=(50, 40), colour=(1, 2, 3))
    report = convert(tmp_path / "data", tmp_path / "out", settings, policy="resume")
    assert report.shards_reused == 4


@pytest.mark.slow
def test_resume_after_real_sigkill_matches_uninterrupted_run(tmp_path):
    """SIGKILL a 2-worker run while one worker is blocked reading an image (a read that stalls on a FIFO stands in
    for a slow disk), then --resume: the shards equal an uninterrupted run's."""
    make_dataset(tmp_path / "data", images=12, size=(50, 40))
    args = ["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--samples-per-shard", "2", "--max-size", "32",
            "--quiet", "--workers", "2"]
    assert CLI.main([*args, "--out", str(tmp_path / "ref")]) == 0
    reference = tar_bytes(tmp_path / "ref" / "ds")
    process = stalling_make_shards(tmp_path, "img_7.jpg", [*args, "--out", str(tmp_path / "out")])  # shard 3 stalls
    out_dir = tmp_path / "out" / "ds"
    try:
        deadline = time.monotonic() + 60
        while not (out_dir / "train-000003.tar.tmp").exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the run never reached shard 3"
            time.sleep(0.05)
        time.sleep(0.3)  # let the other worker finish a shard or two
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (out_dir / "train-000003.tar").exists()
    finished = glob.glob(str(out_dir / "train-*.tar"))
    assert 1 <= len(finished) < 6  # killed mid-run: the worker that took shard 3 had finished one before
    for path in finished:  # whatever made it to a final name is complete
        with tarfile.open(path) as archive:
            assert len(archive.getmembers()) == 6
    assert CLI.main([*args, "--out", str(tmp_path / "out"), "--resume"]) == 0
    assert tar_bytes(out_dir) == reference
    assert json.load(open(out_dir / "train_stats.json"))["shards_reused"] == len(finished)
    assert not glob.glob(str(out_dir / "*.tmp"))


# ------------------------------------------------------------------------------------------------
# sources, split all, benchmark
# ------------------------------------------------------------------------------------------------


def test_split_all_takes_the_splits_present_and_explicit_csv(tmp_path):
    make_dataset(tmp_path / "data", name="both", split="train", images=2)
    make_dataset(tmp_path / "data", name="both", split="valid", images=1)
    make_dataset(tmp_path / "data", name="valonly", split="valid", images=1)
    sources, notes = annotations.resolve_sources(str(tmp_path / "data"), ["both", "valonly"], "all")
    assert [(s.dataset, s.split) for s in sources] == [("both", "train"), ("both", "valid"), ("valonly", "valid")]
    assert notes == ["valonly: no train_anno.csv, validation-only dataset (valid split written)"]
    csv_path = str(tmp_path / "data" / "valonly" / "valid_anno.csv")
    (source,) = annotations.resolve_sources(None, [], "all", csv_path=csv_path)[0]
    assert (source.dataset, source.split, source.images_dir) == ("valonly", "valid",
                                                                 str(tmp_path / "data" / "valonly" / "valid"))
    with pytest.raises(annotations.InputError, match="image folder"):
        annotations.resolve_sources(None, ["x"], "train", csv_path=csv_path, images_dir=str(tmp_path / "nope"))


def test_benchmark_returns_per_worker_figures(tmp_path):
    result = bench.benchmark_shards(num_images=6, workers=(1, 2), work_dir=str(tmp_path))
    assert [run["workers"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert run["images_per_sec"] > 0
        assert run["images_per_sec_per_worker"] == pytest.approx(run["images_per_sec"] / run["workers"], rel=0.01)
    assert result["speedup"]["1"] == 1.0
    assert os.listdir(tmp_path) == []  # temporary data removed


# ------------------------------------------------------------------------------------------------
# crafted CSVs: ids beyond int64, image paths that leave the image folder
# ------------------------------------------------------------------------------------------------


def test_ids_that_are_not_int64_are_bad_rows(tmp_path):
    folder = tmp_path / "data" / "ds"
    (folder / "train").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        solid(folder / "train" / name)
    write_csv(folder / "train_anno.csv", ["image", "image_id", "caption", "caption_id"],
              [["a.jpg", "1e30", "float beyond int64", "1"], ["b.jpg", str(2**63), "just beyond", "2"],
               ["c.jpg", "3", "caption id beyond", str(-2**63 - 1)], ["d.jpg", str(2**63 - 1), "the largest", "1e3"]])
    report = convert(tmp_path / "data", tmp_path / "out")
    assert report.row_failures.counts == {"invalid_id": 3}
    assert any("'1e30' is not a 64-bit integer" in e for e in report.row_failures.examples["invalid_id"])
    written = [json.loads(s["json"]) for s in read_back(tmp_path / "out" / "ds")]
    assert [(m["image"], m["image_id"], m["caption_ids"]) for m in written] == [("d.jpg", 2**63 - 1, [1000])]


def test_image_paths_outside_the_image_folder_are_bad_rows_unless_allowed(tmp_path):
    folder = tmp_path / "data" / "ds"
    (folder / "train" / "sub").mkdir(parents=True)
    solid(folder / "train" / "sub" / "inside.jpg")
    secret = tmp_path / "data" / "secret.jpg"  # a readable image outside DATA_ROOT/ds/train
    solid(secret, colour=(1, 2, 3))
    write_csv(folder / "train_anno.csv", ["image", "caption"],
              [["sub/inside.jpg", "inside"], [str(secret), "absolute"], ["../../secret.jpg", "dot dot"],
               ["sub/../../../secret.jpg", "dot dot in the middle"]])
    report = convert(tmp_path / "data", tmp_path / "out")
    assert report.row_failures.counts == {"path_outside_images": 3}
    assert [json.loads(s["json"])["image"] for s in read_back(tmp_path / "out" / "ds")] == ["sub/inside.jpg"]
    assert CLI.main(["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "o2"),
                     "--quiet", "--workers", "1", "--allow-outside-images"]) == 0
    allowed = [json.loads(s["json"])["image"] for s in read_back(tmp_path / "o2" / "ds")]
    assert allowed == ["sub/inside.jpg", str(secret), "../../secret.jpg", "sub/../../../secret.jpg"]


def _children(pid):
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to find the worker processes")
def test_a_killed_worker_stops_the_run_instead_of_hanging(tmp_path):
    """SIGKILL one of 2 workers (as the OOM killer would) while another is stalled reading: the run stops with
    an error within a bounded time, and --resume then completes it as an uninterrupted run would."""
    make_dataset(tmp_path / "data", images=12, size=(50, 40))
    args = ["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--samples-per-shard", "2", "--max-size", "32",
            "--quiet", "--workers", "2"]
    assert CLI.main([*args, "--out", str(tmp_path / "ref")]) == 0
    reference = tar_bytes(tmp_path / "ref" / "ds")
    # the worker that takes shard 3 stalls reading img_7.jpg
    process = stalling_make_shards(tmp_path, "img_7.jpg", [*args, "--out", str(tmp_path / "out")])
    out_dir = tmp_path / "out" / "ds"
    try:
        deadline = time.monotonic() + 60
        while not (out_dir / "train-000003.tar.tmp").exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the run never reached shard 3"
            time.sleep(0.05)
        workers = _children(process.pid)
        assert workers, "no worker processes found"
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)  # before the fix: waits forever for the lost shard
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == 1
    assert "a shard worker process died" in stderr and "--resume" in stderr
    for path in glob.glob(str(out_dir / "train-*.tar")):  # whatever made it to a final name is complete
        with tarfile.open(path) as archive:
            assert len(archive.getmembers()) == 6
    assert CLI.main([*args, "--out", str(tmp_path / "out"), "--resume"]) == 0
    assert tar_bytes(out_dir) == reference
