"""The demo data generator: layout, determinism, counts, captions that match the pixels, two distinct styles."""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from collections import deque

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests.helpers.paths import REPO_ROOT
from zvl_ds.data.writing import annotations
from zvl_ds.data.writing import shard_writer as shards
from zvl_ds.data.writing.demo import COLOURS, PLURALS, POSITION_PHRASES, SHAPES, make_demo_data

TRAIN, VALID = 40, 12


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(str(root), seed=0, train_size=TRAIN, valid_size=VALID)
    return root


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, root).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


# ------------------------------------------------------------------------------------------------
# An independent reading of an image: which pixels have the caption's colour, how many blobs, where
# ------------------------------------------------------------------------------------------------


def colour_mask(image, colour):
    """Pixels whose nearest palette colour is `colour` and that lie close to it."""
    names = list(COLOURS)
    distances = np.stack([np.abs(image - np.array(COLOURS[name])).max(-1) for name in names])
    return (distances.argmin(0) == names.index(colour)) & (distances[names.index(colour)] <= 60)


def blobs(mask, min_pixels=8):
    """4-connected components with at least min_pixels: list of (pixel count, (x0, y0, x1, y1))."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, members = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            a, b = queue.popleft()
            members.append((a, b))
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < height and 0 <= d < width and mask[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    queue.append((c, d))
        if len(members) >= min_pixels:
            ys, xs = zip(*members)
            found.append((len(members), (min(xs), min(ys), max(xs), max(ys))))
    return found


def parse_caption(caption):
    words = caption.split()
    colour = next(w for w in words if w in COLOURS)
    shape = next(s for s in SHAPES if s in words or PLURALS[s] in words)
    count = 3 if {"three", "3"} & set(words) else 2 if {"two", "2"} & set(words) else 1
    position = next(p for p, phrases in POSITION_PHRASES.items() if any(phrase in caption for phrase in phrases))
    return colour, shape, count, position


# Fill ratio (blob pixels / bounding-box area) of each ideal shape: circle pi/4, square 1, triangle 1/2,
# 5-point star with inner radius 0.45 about 0.38, plus-shaped cross with arm half-width 0.35 about 0.58.
FILL_RATIO = {"circle": 0.785, "square": 1.0, "triangle": 0.5, "star": 0.4, "cross": 0.6}


def nearest_shape(ratio):
    return min(FILL_RATIO, key=lambda shape: abs(FILL_RATIO[shape] - ratio))


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_layout_and_counts(demo):
    assert sorted(os.listdir(demo)) == ["demo_flat", "demo_sketch", "demo_val"]
    for name in ("demo_flat", "demo_sketch"):
        assert sorted(os.listdir(demo / name)) == ["train", "train_anno.csv"]
        rows = read_rows(demo / name / "train_anno.csv")
        assert list(rows[0]) == ["image", "caption"] and len(rows) == TRAIN
        assert sorted(r["image"] for r in rows) == sorted(os.listdir(demo / name / "train"))
    assert sorted(os.listdir(demo / "demo_val")) == ["valid", "valid_anno.csv"]
    rows = read_rows(demo / "demo_val" / "valid_anno.csv")
    assert list(rows[0]) == ["image", "image_id", "caption", "caption_id"]
    assert len(rows) == 5 * VALID and len({r["caption_id"] for r in rows}) == 5 * VALID
    by_image = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    assert len(by_image) == VALID == len(os.listdir(demo / "demo_val" / "valid"))
    for image, group in by_image.items():
        assert len({r["image_id"] for r in group}) == 1
        assert len({r["caption"] for r in group}) == 5  # five different wordings
        assert len({parse_caption(r["caption"]) for r in group}) == 1  # all describing the same scene
    assert rows[0]["image"] != rows[1]["image"]  # rows of one image are not adjacent
    for path in glob.glob(str(demo / "*" / "*" / "*.jpg")):
        image = Image.open(path)
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(demo, tmp_path):
    make_demo_data(str(tmp_path / "again"), seed=0, train_size=TRAIN, valid_size=VALID)
    make_demo_data(str(tmp_path / "other"), seed=1, train_size=TRAIN, valid_size=VALID)
    assert tree_digest(tmp_path / "again") == tree_digest(demo)
    assert tree_digest(tmp_path / "other") != tree_digest(demo)


def test_captions_use_the_demo_tokenizer_vocabulary(demo):
    vocab = set(open(os.path.join(REPO_ROOT, "zvl_ds", "assets", "demo_tokenizer", "vocab.txt")).read().split())
    captions = [r["caption"] for name in ("demo_flat", "demo_sketch")
                for r in read_rows(demo / name / "train_anno.csv")]
    captions += [r["caption"] for r in read_rows(demo / "demo_val" / "valid_anno.csv")]
    unknown = {word for caption in captions for word in caption.split() if word not in vocab}
    assert not unknown
    assert len(set(captions)) > 0.8 * len(captions)  # wording varies


def test_captions_describe_the_pixels(demo):
    """Colour, count and position read from the pixels match the caption in both styles; shapes (read from
    how much of its bounding box each blob fills) match in the flat style."""
    shape_hits = shape_total = 0
    for name in ("demo_flat", "demo_sketch"):
        for row in read_rows(demo / name / "train_anno.csv"):
            colour, shape, count, position = parse_caption(row["caption"])
            mask = colour_mask(pixels(demo / name / "train" / row["image"]), colour)
            found = blobs(mask)
            assert len(found) == count, (name, row)
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean(), ys.mean()
            where = {"left": cx < 26, "right": cx > 38, "top": cy < 26, "bottom": cy > 38,
                     "center": abs(cx - 32) < 8 and abs(cy - 32) < 8}
            assert where[position], (name, row, cx, cy)
            if name == "demo_flat":
                for size, (x0, y0, x1, y1) in found:
                    shape_hits += nearest_shape(size / ((x1 - x0 + 1) * (y1 - y0 + 1))) == shape
                    shape_total += 1
    assert shape_hits >= 0.9 * shape_total


def test_the_two_styles_differ_clearly(demo):
    """A one-number style cue (border brightness) separates the two training sets perfectly: the shortcut
    that mixing datasets in one batch offers and debiased sampling removes."""
    def border_brightness(path):
        image = pixels(path)
        edges = [image[:2], image[-2:], image[:, :2], image[:, -2:]]
        return np.concatenate([edge.ravel() for edge in edges]).mean()

    flat = [border_brightness(p) for p in glob.glob(str(demo / "demo_flat" / "train" / "*.jpg"))]
    sketch = [border_brightness(p) for p in glob.glob(str(demo / "demo_sketch" / "train" / "*.jpg"))]
    assert min(flat) > 200 and max(sketch) < 90
    # Same concepts in both: every colour and shape word appears in each training set.
    for name in ("demo_flat", "demo_sketch"):
        scenes = [parse_caption(r["caption"]) for r in read_rows(demo / name / "train_anno.csv")]
        assert {s[0] for s in scenes} == set(COLOURS) and {s[1] for s in scenes} == set(SHAPES)
    # The validation set mixes both styles.
    valid = [border_brightness(p) for p in glob.glob(str(demo / "demo_val" / "valid" / "*.jpg"))]
    assert min(valid) < 90 and max(valid) > 200


def test_demo_data_round_trips_through_the_shard_writer(demo, tmp_path):
    sources, notes = annotations.resolve_sources(str(demo), ["demo_flat", "demo_sketch", "demo_val"], "all")
    reports = shards.convert_sources(sources, str(tmp_path), shards.ShardSettings(samples_per_shard=16))
    assert [(r.source.dataset, r.source.split, r.images_written, r.captions_written) for r in reports] == [
        ("demo_flat", "train", TRAIN, TRAIN), ("demo_sketch", "train", TRAIN, TRAIN),
        ("demo_val", "valid", VALID, 5 * VALID)]
    assert notes == ["demo_val: no train_anno.csv, validation-only dataset (valid split written)"]
    urls = sorted(glob.glob(str(tmp_path / "demo_val" / "valid-*.tar")))
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    rows = read_rows(demo / "demo_val" / "valid_anno.csv")
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["captions"] == [r["caption"] for r in rows if r["image"] == meta["image"]]
        assert meta["caption_ids"] == [int(r["caption_id"]) for r in rows if r["image"] == meta["image"]]
        # 64x64 JPEGs are within --max-size: stored byte for byte.
        assert sample["jpg"] == open(demo / "demo_val" / "valid" / meta["image"], "rb").read()


def test_command_line(tmp_path, capsys):
    from zvl_ds import make_demo_data as cli

    assert cli.main(["--out", str(tmp_path), "--train-size", "3", "--valid-size", "2", "--seed", "5"]) == 0
    assert len(read_rows(tmp_path / "demo_flat" / "train_anno.csv")) == 3
    assert len(read_rows(tmp_path / "demo_val" / "valid_anno.csv")) == 10
    assert cli.main(["--out", str(tmp_path / "x"), "--captions-per-image", "9"]) == 2
    assert "captions_per_image" in capsys.readouterr().err
