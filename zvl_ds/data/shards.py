"""The shard writer behind ``tools/make_shards.py``: ZeroVL annotation CSVs + image folders -> WebDataset tars.

Input (ZeroVL layout): ``DATA_ROOT/<name>/<split>_anno.csv`` with columns ``image`` (file name relative to
``DATA_ROOT/<name>/<split>/``), ``caption`` and optionally ``image_id`` / ``caption_id``; one row per caption.

Output, per dataset folder ``OUT/<name>/`` (readers depend on exactly this):

- ``<split>-000000.tar``, ``<split>-000001.tar``, ...: one sample per unique image, members in the fixed order
  ``KEY.jpg``, ``KEY.json``, ``KEY.txt`` (mtime 0, uid/gid 0, empty owner names, mode 0o444, USTAR). ``KEY`` is
  digits only: 6 digits of shard index + (at least) 6 digits of position in the shard. The json holds
  ``image, image_id, captions, caption_ids, width, height, original_width, original_height, dataset, split``;
  the txt holds the first caption.
- Images are assigned to shards by their position among *all* unique images in order of first appearance in
  the CSV (shard i = unique images [i*N, (i+1)*N)); an image that fails is absent from its shard, so a tar may
  hold fewer than N samples. This makes every shard a pure function of its inputs, hence byte-identical output
  whatever the worker count, and lets ``--resume`` redo single shards.
- ``<split>-000000_stats.json`` per shard (img2dataset's field names where they apply), ``<split>_stats.json``
  per split, and ``sizes.json`` (shard file name -> sample count, as OpenCLIP reads it) merged over splits.

Captions and file names lose surrounding whitespace; rows of one image keep their CSV order. Rows that cannot
be used (empty caption, caption bytes not UTF-8, unparsable id, wrong field count) and images that cannot be
used (missing, empty, not an image, truncated, over --max-pixels, no caption left) are skipped and counted.

Ids: when ``image_id`` is missing it is derived from the image file name (63-bit positive int from BLAKE2b);
when ``caption_id`` is missing it is the caption's 0-based data row in the CSV. Both are stable for the same CSV.
``original_width``/``original_height`` are the source image's size after EXIF orientation.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import struct
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

SPLITS = ("train", "valid")
REQUIRED_COLUMNS = ("image", "caption")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default MAX_IMAGE_PIXELS
MAX_EXAMPLES = 5  # examples kept per failure reason
TAR_SUFFIXES = ("jpg", "json", "txt")  # fixed member order inside a sample
FORMAT_VERSION = 1  # bump when the bytes written for the same input change; old shards then fail --resume checks
TEMP_SUFFIX = ".tmp"

# Per-image skip reasons (counted in images).
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"
NO_VALID_CAPTION = "no_valid_caption"
INVALID_UTF8 = "invalid_utf8"  # also a per-row reason (caption bytes); per image when the file name is not UTF-8
OTHER_ERROR = "other_error"
# Per-row skip reasons (counted in caption rows).
EMPTY_CAPTION = "empty_caption"
INVALID_ID = "invalid_id"
MALFORMED_ROW = "malformed_row"  # wrong number of fields; pandas skips the line

# img2dataset groups its failures into download and resize failures; we map our reasons onto those names.
_DOWNLOAD_REASONS = (MISSING_FILE, EMPTY_FILE)
_DECODE_REASONS = (NOT_AN_IMAGE, CORRUPT_IMAGE, TOO_MANY_PIXELS, OTHER_ERROR)
_CAPTION_REASONS = (NO_VALID_CAPTION, INVALID_UTF8)

_RESAMPLING = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}

ExistingPolicy = Literal["refuse", "resume", "overwrite"]


class InputError(Exception):
    """A problem with the command's input that the user must fix; the CLI prints it and exits with code 2."""


class SkipImage(Exception):
    """One image cannot be written; ``reason`` is its counter name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Plain data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSettings:
    samples_per_shard: int = 1000
    max_size: int = 256  # shorter side in pixels; 0 keeps the original size
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_quality: int = 95
    # "box" is area averaging, img2dataset's default for downscaling (cv2 INTER_AREA); in Pillow it is ~1.2x
    # faster than bilinear and ~1.5x faster than bicubic, and training transforms resize the image again anyway.
    resample: Literal["box", "bilinear", "bicubic", "lanczos"] = "box"

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise InputError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.max_size < 0:
            raise InputError(f"--max-size must be >= 0 (0 keeps the original size), got {self.max_size}")
        if self.max_pixels < 1:
            raise InputError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InputError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.resample not in _RESAMPLING:
            raise InputError(f"--resample must be one of {', '.join(_RESAMPLING)}, got {self.resample!r}")

    @property
    def key_digits(self) -> int:
        """Digits of the in-shard position in a key; fixed per run so keys never collide."""
        return max(6, len(str(self.samples_per_shard - 1)))


@dataclass(frozen=True)
class SplitSource:
    """One CSV and its image folder, written to ``OUT/<dataset>/<split>-*.tar``."""

    dataset: str
    split: str
    csv_path: str
    images_dir: str


@dataclass
class ImageEntry:
    """One unique image with its valid captions, in CSV order."""

    image: str
    image_id: int
    row: int  # 1-based data row of the image's first appearance (for messages)
    captions: List[str] = field(default_factory=list)
    caption_ids: List[int] = field(default_factory=list)


@dataclass
class FailureLog:
    """Counts by reason plus the first few examples of each."""

    counts: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, List[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(example)

    def merge(self, other: "FailureLog") -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            kept = self.examples.setdefault(reason, [])
            kept.extend(other.examples.get(reason, [])[: MAX_EXAMPLES - len(kept)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> Dict[str, Dict[str, object]]:
        return {reason: {"count": self.counts[reason], "examples": self.examples.get(reason, [])}
                for reason in sorted(self.counts)}


@dataclass
class Annotations:
    """A CSV read and grouped by image."""

    entries: List[ImageEntry]
    rows_read: int
    row_failures: FailureLog
    derived_ids: List[str]  # id columns that were missing and derived
    image_id_conflicts: int  # rows whose image_id differs from the image's first row (the first one is kept)


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard; a shard is a pure function of this."""

    source: SplitSource
    out_dir: str
    index: int
    entries: Tuple[ImageEntry, ...]
    settings: ShardSettings

    @property
    def name(self) -> str:
        return shard_name(self.source.split, self.index)

    @property
    def tar_path(self) -> str:
        return os.path.join(self.out_dir, self.name + ".tar")

    @property
    def stats_path(self) -> str:
        return os.path.join(self.out_dir, self.name + "_stats.json")


@dataclass
class ShardResult:
    index: int
    count: int  # images assigned to the shard
    successes: int
    captions: int
    failures: FailureLog
    duration: float
    reused: bool = False  # kept from an earlier run under --resume


@dataclass
class ConvertedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int


@dataclass
class SplitReport:
    source: SplitSource
    out_dir: str
    rows_read: int
    unique_images: int
    images_written: int
    captions_written: int
    shards: int
    shards_reused: int
    image_failures: FailureLog
    row_failures: FailureLog
    derived_ids: List[str]
    image_id_conflicts: int
    duration: float
    images_per_sec: float  # images processed (written or skipped) in this run per second
    start_time: float
    end_time: float
    notes: List[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.image_failures.total + self.row_failures.total

    @property
    def shard_pattern(self) -> str:
        last = max(self.shards - 1, 0)
        return os.path.join(self.out_dir, f"{self.source.split}-{{{0:06d}..{last:06d}}}.tar")

    def to_json(self) -> Dict[str, object]:
        return {
            "dataset": self.source.dataset,
            "split": self.source.split,
            "csv": os.path.abspath(self.source.csv_path),
            "images_dir": os.path.abspath(self.source.images_dir),
            "rows_read": self.rows_read,
            "unique_images": self.unique_images,
            "images_written": self.images_written,
            "captions_written": self.captions_written,
            "shards": self.shards,
            "shards_reused": self.shards_reused,
            "shard_pattern": os.path.basename(self.shard_pattern),
            "skipped_images": self.image_failures.total,
            "skipped_caption_rows": self.row_failures.total,
            "failures": {"images": self.image_failures.to_json(), "caption_rows": self.row_failures.to_json()},
            "derived_ids": self.derived_ids,
            "image_id_conflicts": self.image_id_conflicts,
            "duration": round(self.duration, 3),
            "images_per_sec": round(self.images_per_sec, 1),
            "start_time": self.start_time,
            "end_time": self.end_time,
            "notes": self.notes,
        }


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def sample_key(shard_index: int, position: int, settings: ShardSettings) -> str:
    return f"{shard_index:06d}{position:0{settings.key_digits}d}"


# --------------------------------------------------------------------------------------------------
# Finding the inputs
# --------------------------------------------------------------------------------------------------


def _dataset_folders(data_root: str) -> List[str]:
    """Sub-folders of data_root that look like ZeroVL datasets (hold a *_anno.csv)."""
    found = []
    for name in sorted(os.listdir(data_root)):
        folder = os.path.join(data_root, name)
        if os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f"{s}_anno.csv")) for s in SPLITS):
            found.append(name)
    return found


def _split_from_csv_name(csv_path: str) -> Optional[str]:
    base = os.path.basename(csv_path)
    for split in SPLITS:
        if base.startswith(split):
            return split
    return None


def resolve_sources(data_root: Optional[str], datasets: Sequence[str], split: str = "all",
                    csv_path: Optional[str] = None, images_dir: Optional[str] = None
                    ) -> Tuple[List[SplitSource], List[str]]:
    """The (dataset, split) inputs named on the command line, and notes for the summary. Raises InputError."""
    if split not in SPLITS + ("all",):
        raise InputError(f"--split must be one of train, valid, all; got {split!r}")
    if csv_path is not None:
        return [_explicit_source(datasets, split, csv_path, images_dir)], []
    if images_dir is not None:
        raise InputError("--images needs --csv (it names the folder of that one CSV)")
    if not datasets:
        raise InputError("name at least one --dataset (or give --csv and --images)")
    if not data_root or not os.path.isdir(data_root):
        raise InputError(f"data root {data_root!r} is not a folder")
    sources: List[SplitSource] = []
    notes: List[str] = []
    for name in dict.fromkeys(datasets):  # a name given twice is written once
        folder = os.path.join(data_root, name)
        if not os.path.isdir(folder):
            available = _dataset_folders(data_root)
            listing = ", ".join(available) if available else "none (no */train_anno.csv or */valid_anno.csv)"
            raise InputError(f"no dataset folder {folder}; datasets under {data_root}: {listing}")
        wanted = SPLITS if split == "all" else (split,)
        present = [s for s in wanted if os.path.isfile(os.path.join(folder, f"{s}_anno.csv"))]
        if split != "all" and not present:
            raise InputError(f"{os.path.join(folder, split + '_anno.csv')}: file not found")
        if not present:
            raise InputError(f"{folder} holds neither train_anno.csv nor valid_anno.csv")
        if split == "all" and "train" not in present:
            notes.append(f"{name}: no train_anno.csv, validation-only dataset (valid split written)")
        for s in present:
            sources.append(_checked_source(name, s, os.path.join(folder, f"{s}_anno.csv"), os.path.join(folder, s)))
    return sources, notes


def _explicit_source(datasets: Sequence[str], split: str, csv_path: str, images_dir: Optional[str]) -> SplitSource:
    if len(datasets) > 1:
        raise InputError("--csv names one CSV: give at most one --dataset with it")
    name = datasets[0] if datasets else os.path.basename(os.path.dirname(os.path.abspath(csv_path)))
    if split == "all":
        split = _split_from_csv_name(csv_path) or ""
        if not split:
            raise InputError(f"cannot tell the split from the file name {csv_path}: pass --split train or valid")
    if images_dir is None:
        images_dir = os.path.join(os.path.dirname(csv_path), split)
    return _checked_source(name, split, csv_path, images_dir)


def _checked_source(name: str, split: str, csv_path: str, images_dir: str) -> SplitSource:
    if not name or "/" in name or name in (".", ".."):
        raise InputError(f"invalid dataset name {name!r}")
    if not os.path.isfile(csv_path):
        raise InputError(f"{csv_path}: file not found")
    if not os.path.isdir(images_dir):
        raise InputError(f"image folder {images_dir} (for {csv_path}) not found")
    return SplitSource(name, split, csv_path, images_dir)


# --------------------------------------------------------------------------------------------------
# Reading and grouping the CSV
# --------------------------------------------------------------------------------------------------


def read_csv_frame(csv_path: str) -> Tuple[pd.DataFrame, FailureLog]:
    """All columns as text. Undecodable bytes become lone surrogates (surrogateescape) so that one bad row is
    detected and skipped rather than killing the read; lines with the wrong field count are skipped and counted."""
    malformed = FailureLog()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                                encoding_errors="surrogateescape", on_bad_lines="warn")
    except pd.errors.EmptyDataError:
        raise InputError(f"{csv_path}: the file is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeError, OSError, ValueError, MemoryError) as error:
        raise InputError(f"{csv_path}: cannot read the CSV: {str(error).strip()}") from None
    for warning in caught:
        if issubclass(warning.category, pd.errors.ParserWarning):
            for line in re.findall(r"Skipping line \d+:[^\n]*", str(warning.message)):
                malformed.add(MALFORMED_ROW, line)
    _check_frame(frame, csv_path)
    return frame, malformed


def check_csv(csv_path: str) -> None:
    """Fail fast on a CSV that cannot be read, lacks a required column or has no rows (reads the head only)."""
    try:
        head = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                           encoding_errors="surrogateescape", nrows=5, on_bad_lines="skip")
    except pd.errors.EmptyDataError:
        raise InputError(f"{csv_path}: the file is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeError, OSError, ValueError, MemoryError) as error:
        raise InputError(f"{csv_path}: cannot read the CSV: {str(error).strip()}") from None
    _check_frame(head, csv_path)


def _check_frame(frame: pd.DataFrame, csv_path: str) -> None:
    frame.columns = [str(column).strip() for column in frame.columns]
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        shown = [name if len(name) <= 40 else name[:37] + "..." for name in frame.columns[:20]]
        binary = any(_has_undecodable_bytes(name) or any(ord(c) < 32 for c in name) for name in frame.columns)
        raise InputError(f"{csv_path}: missing required column(s) {', '.join(missing)}; "
                         f"columns found: {', '.join(shown) or 'none'}"
                         + (" (the header is not UTF-8 text: is this a CSV?)" if binary else ""))
    if len(frame) == 0:
        raise InputError(f"{csv_path}: no data rows (empty dataset)")


def derived_image_id(image_name: str) -> int:
    """A stable positive 63-bit id from the image file name (used when the CSV has no image_id column)."""
    digest = hashlib.blake2b(image_name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def parse_id(text: str) -> Optional[int]:
    """An integer id from CSV text ("12", " 12 ", "12.0"); None when it is not one."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


_SURROGATE = re.compile("[\udc80-\udcff]")


def _has_undecodable_bytes(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def _column(frame: pd.DataFrame, name: str) -> Optional[List[str]]:
    if name not in frame.columns:
        return None
    return [value if isinstance(value, str) else "" for value in frame[name].tolist()]


def group_by_image(frame: pd.DataFrame, row_failures: Optional[FailureLog] = None) -> Annotations:
    """One entry per unique image name in order of first appearance, each with its valid captions in row order.

    Captions and file names lose surrounding whitespace. Empty captions, captions with undecodable bytes and
    rows with an unparsable id are dropped and counted; an image left without captions stays in the list
    (it keeps its shard position) and is skipped by the writer as ``no_valid_caption``."""
    failures = row_failures if row_failures is not None else FailureLog()
    images = _column(frame, "image")
    captions = _column(frame, "caption")
    image_ids = _column(frame, "image_id")
    caption_ids = _column(frame, "caption_id")
    derived = [name for name, values in (("image_id", image_ids), ("caption_id", caption_ids)) if values is None]
    by_name: Dict[str, ImageEntry] = {}
    conflicts = 0
    for row, (image, caption) in enumerate(zip(images, captions)):
        image = image.strip()
        where = f"{image or '<empty file name>'} (data row {row + 1})"
        image_id = derived_image_id(image) if image_ids is None else parse_id(image_ids[row])
        caption_id = row if caption_ids is None else parse_id(caption_ids[row])
        if image_id is None or caption_id is None:
            bad = image_ids[row] if image_id is None else caption_ids[row]  # type: ignore[index]
            failures.add(INVALID_ID, f"{where}: id {bad!r} is not an integer")
            continue
        entry = by_name.get(image)
        if entry is None:
            entry = by_name[image] = ImageEntry(image=image, image_id=image_id, row=row + 1)
        elif image_id != entry.image_id:
            conflicts += 1
        caption = caption.strip()
        if not caption:
            failures.add(EMPTY_CAPTION, f"{where}: empty caption")
        elif _has_undecodable_bytes(caption):
            shown = caption.encode("utf-8", "replace")[:60]
            failures.add(INVALID_UTF8, f"{where}: caption is not valid UTF-8: {shown!r}")
        else:
            entry.captions.append(caption)
            entry.caption_ids.append(caption_id)
    return Annotations(list(by_name.values()), len(images), failures, derived, conflicts)


def read_annotations(csv_path: str) -> Annotations:
    frame, malformed = read_csv_frame(csv_path)
    return group_by_image(frame, malformed)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def read_image_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise SkipImage(MISSING_FILE, "no such file") from None
    except OSError as error:
        raise SkipImage(OTHER_ERROR, f"cannot read: {error}") from None
    if not data:
        raise SkipImage(EMPTY_FILE, "zero bytes")
    return data


def scaled_size(width: int, height: int, max_size: int) -> Tuple[int, int]:
    """(width, height) with the shorter side brought down to max_size, aspect kept; unchanged when smaller."""
    shorter = min(width, height)
    if max_size <= 0 or shorter <= max_size:
        return width, height
    scale = max_size / shorter
    if width <= height:
        return max_size, max(1, round(height * scale))
    return max(1, round(width * scale)), max_size


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not cost the image; it is then shown as stored
        return 1


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode. 16-bit grey is scaled (Pillow's own convert clips at 255); transparency is
    composited onto white (dropping alpha would expose whatever colour the transparent pixels hold)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode == "RGB":
            return image
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open_image(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise SkipImage(NOT_AN_IMAGE, "not a recognised image format") from None
    except Image.DecompressionBombError as error:
        raise SkipImage(TOO_MANY_PIXELS, str(error)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as error:
        raise SkipImage(CORRUPT_IMAGE, f"unreadable header: {error}") from None


def convert_image(data: bytes, settings: ShardSettings) -> ConvertedImage:
    """The JPEG to store. Original bytes are kept for an upright RGB JPEG already within max_size (after a full
    decode that proves it is complete); anything else is decoded (JPEG draft mode for cheap downscaling),
    turned upright, converted to RGB, resized so the shorter side is max_size and encoded at jpeg_quality."""
    image = _open_image(data)
    width, height = image.size
    if width * height > settings.max_pixels:
        raise SkipImage(TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels > limit {settings.max_pixels}")
    orientation = _exif_orientation(image)
    turned = orientation in (5, 6, 7, 8)  # EXIF transposes: width and height swap
    stored_target = scaled_size(width, height, settings.max_size)
    upright_size = (height, width) if turned else (width, height)
    target = (stored_target[1], stored_target[0]) if turned else stored_target
    try:
        if image.format == "JPEG" and image.mode == "RGB" and orientation == 1 and target == upright_size:
            image.load()
            return ConvertedImage(data, width, height, width, height)
        if image.format == "JPEG" and stored_target != (width, height):
            # Draft picks the largest DCT scale (1/2, 1/4, 1/8) that stays at least as large as asked.
            image.draft(None, stored_target)
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
        if rgb.size != target:
            rgb = rgb.resize(target, _RESAMPLING[settings.resample], reducing_gap=3.0)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=settings.jpeg_quality)
    except SkipImage:
        raise
    except Image.DecompressionBombError as error:
        raise SkipImage(TOO_MANY_PIXELS, str(error)) from None
    except (OSError, SyntaxError, EOFError, struct.error, zlib.error) as error:
        raise SkipImage(CORRUPT_IMAGE, f"truncated or corrupt: {error}") from None
    except Exception as error:  # any other decoder failure costs this image only
        raise SkipImage(OTHER_ERROR, f"{type(error).__name__}: {error}") from None
    return ConvertedImage(buffer.getvalue(), rgb.width, rgb.height, *upright_size)


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb check at our limit (its error fires at twice the limit; our own check covers the rest)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


# --------------------------------------------------------------------------------------------------
# Writing one shard
# --------------------------------------------------------------------------------------------------


def _tar_member(name: str, payload: bytes) -> Tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(payload)


def _sample_members(key: str, converted: ConvertedImage, entry: ImageEntry, source: SplitSource
                    ) -> List[Tuple[str, bytes]]:
    meta = {
        "image": entry.image,
        "image_id": entry.image_id,
        "captions": entry.captions,
        "caption_ids": entry.caption_ids,
        "width": converted.width,
        "height": converted.height,
        "original_width": converted.original_width,
        "original_height": converted.original_height,
        "dataset": source.dataset,
        "split": source.split,
    }
    payloads = {
        "jpg": converted.jpeg,
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "txt": entry.captions[0].encode("utf-8"),
    }
    return [(f"{key}.{suffix}", payloads[suffix]) for suffix in TAR_SUFFIXES]


def _file_fingerprint(path: str) -> Optional[List[int]]:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def shard_input_hash(task: ShardTask) -> str:
    """Hash of everything a shard's bytes depend on: settings, ids, captions, and each image file's size and
    mtime. --resume keeps a shard only when this still matches."""
    digest = hashlib.sha256()
    header = {"format": FORMAT_VERSION, "settings": asdict(task.settings), "dataset": task.source.dataset,
              "split": task.source.split, "index": task.index}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for entry in task.entries:
        record = [entry.image, entry.image_id, entry.captions, entry.caption_ids,
                  _file_fingerprint(os.path.join(task.source.images_dir, entry.image))]
        digest.update(json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str, payload: object) -> None:
    temp = path + TEMP_SUFFIX
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _convert_entry(task: ShardTask, entry: ImageEntry) -> ConvertedImage:
    if _has_undecodable_bytes(entry.image):
        raise SkipImage(INVALID_UTF8, "file name is not valid UTF-8")
    if not entry.captions:
        raise SkipImage(NO_VALID_CAPTION, "no valid caption left")
    if not entry.image:
        raise SkipImage(MISSING_FILE, "empty file name")
    data = read_image_file(os.path.join(task.source.images_dir, entry.image))
    return convert_image(data, task.settings)


def write_shard(task: ShardTask, on_image: Optional[Callable[[], None]] = None) -> ShardResult:
    """Write ``task.tar_path`` (via a temporary name, then rename) and its stats json; returns the counts."""
    start = time.time()
    input_hash = shard_input_hash(task)
    failures = FailureLog()
    successes = captions = 0
    temp_path = task.tar_path + TEMP_SUFFIX
    with pixel_limit(task.settings.max_pixels), open(temp_path, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for position, entry in enumerate(task.entries):
                try:
                    converted = _convert_entry(task, entry)
                except SkipImage as skip:
                    failures.add(skip.reason, f"{entry.image} (data row {entry.row}): {skip}")
                else:
                    key = sample_key(task.index, position, task.settings)
                    for name, payload in _sample_members(key, converted, entry, task.source):
                        archive.addfile(*_tar_member(name, payload))
                    successes += 1
                    captions += len(entry.captions)
                if on_image is not None:
                    on_image()
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp_path, task.tar_path)
    end = time.time()
    stats = _shard_stats(task, successes, captions, failures, start, end, input_hash)
    write_json_atomic(task.stats_path, stats)
    return ShardResult(task.index, len(task.entries), successes, captions, failures, end - start)


def _shard_stats(task: ShardTask, successes: int, captions: int, failures: FailureLog, start: float, end: float,
                 input_hash: str) -> Dict[str, object]:
    counts = failures.counts
    return {
        "count": len(task.entries),
        "successes": successes,
        "failed_to_download": sum(counts.get(r, 0) for r in _DOWNLOAD_REASONS),
        "failed_to_resize": sum(counts.get(r, 0) for r in _DECODE_REASONS),
        "failed_to_caption": sum(counts.get(r, 0) for r in _CAPTION_REASONS),
        "captions": captions,
        "failures": failures.to_json(),
        "status_dict": {"success": successes, **{r: counts[r] for r in sorted(counts)}},
        "duration": round(end - start, 3),
        "start_time": start,
        "end_time": end,
        "dataset": task.source.dataset,
        "split": task.source.split,
        "settings": asdict(task.settings),
        "input_hash": input_hash,
        "tar": {"name": os.path.basename(task.tar_path), "bytes": os.path.getsize(task.tar_path),
                "sha256": _file_sha256(task.tar_path), "members": successes * len(TAR_SUFFIXES)},
    }


def _failure_log_from_json(payload: Dict[str, Dict[str, object]]) -> FailureLog:
    log = FailureLog()
    for reason, item in payload.items():
        log.counts[reason] = int(item["count"])  # type: ignore[arg-type]
        log.examples[reason] = list(item.get("examples", []))[:MAX_EXAMPLES]  # type: ignore[arg-type]
    return log


def completed_shard(task: ShardTask) -> Optional[ShardResult]:
    """The result recorded for an existing shard when it is complete and made from the same input; else None.
    Complete means: stats json readable, input hash matches, tar size matches the stats, and the tar's headers
    read to the end with the expected member count. (Shards only reach their final name complete, by rename;
    these checks catch a stats file without its tar, damage and changed input. The recorded sha256 is not
    re-checked: that would read every byte of a large dataset again.)"""
    try:
        with open(task.stats_path, encoding="utf-8") as handle:
            stats = json.load(handle)
        tar_stats = stats["tar"]
        if stats.get("input_hash") != shard_input_hash(task):
            return None
        if os.path.getsize(task.tar_path) != tar_stats["bytes"]:
            return None
        with tarfile.open(task.tar_path, mode="r:") as archive:
            members = sum(1 for _ in archive)
        if members != tar_stats["members"] or members != stats["successes"] * len(TAR_SUFFIXES):
            return None
        return ShardResult(task.index, int(stats["count"]), int(stats["successes"]), int(stats["captions"]),
                           _failure_log_from_json(stats["failures"]), float(stats["duration"]), reused=True)
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError):
        return None


# --------------------------------------------------------------------------------------------------
# A whole split
# --------------------------------------------------------------------------------------------------


def make_tasks(source: SplitSource, entries: Sequence[ImageEntry], out_dir: str, settings: ShardSettings
               ) -> List[ShardTask]:
    size = settings.samples_per_shard
    return [ShardTask(source, out_dir, index, tuple(entries[start:start + size]), settings)
            for index, start in enumerate(range(0, len(entries), size))]


_SHARD_FILE = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{6,})(?:\.tar|_stats\.json)(?P<temp>\.tmp)?$")


def split_output_files(out_dir: str, split: str) -> List[str]:
    """Files of one split already in out_dir: shards, their stats, the split stats and temporaries."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in sorted(os.listdir(out_dir)):
        match = _SHARD_FILE.match(name)
        if (match and match.group("split") == split) or name in (f"{split}_stats.json", f"{split}_stats.json.tmp"):
            found.append(os.path.join(out_dir, name))
    return found


def _prepare_output(out_dir: str, split: str, num_shards: int, policy: ExistingPolicy) -> List[str]:
    """Apply the existing-output policy; returns notes. Raises InputError when refusing."""
    existing = split_output_files(out_dir, split)
    notes: List[str] = []
    if existing and policy == "refuse":
        raise InputError(f"{out_dir} already holds {split} output ({len(existing)} files, e.g. "
                         f"{os.path.basename(existing[0])}); pass --resume to finish it or --overwrite to replace it")
    for path in existing:
        name = os.path.basename(path)
        match = _SHARD_FILE.match(name)
        stale = match is not None and int(match.group("index")) >= num_shards
        if policy == "overwrite" or name.endswith(TEMP_SUFFIX) or stale:
            os.remove(path)
            if policy == "resume" and stale and not name.endswith(TEMP_SUFFIX):
                notes.append(f"removed {name} (beyond the {num_shards} shards of this input)")
    os.makedirs(out_dir, exist_ok=True)
    return notes


def update_sizes(out_dir: str, split: str, sizes: Dict[str, int]) -> None:
    """Merge this split's shard sizes into sizes.json, dropping the split's old entries only."""
    path = os.path.join(out_dir, "sizes.json")
    merged: Dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
        if isinstance(loaded, dict):
            merged = {k: v for k, v in loaded.items() if not (k.startswith(f"{split}-") and k.endswith(".tar"))}
    except (OSError, ValueError):
        pass
    merged.update(sizes)
    write_json_atomic(path, dict(sorted(merged.items())))


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds without re-importing torch (pulled in by zvl_ds); spawn elsewhere.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _run_tasks(tasks: Sequence[ShardTask], workers: int, on_images: Callable[[int], None]) -> Iterator[ShardResult]:
    """Write the shards, results in task order. One worker runs in this process (per-image progress)."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield write_shard(task, on_image=lambda: on_images(1))
        return
    with _pool_context().Pool(processes=min(workers, len(tasks))) as pool:
        for result in pool.imap(write_shard, tasks, chunksize=1):
            on_images(result.count)
            yield result


def _progress_bar(total: int, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="img", disable=not enabled, dynamic_ncols=True, leave=False,
                file=sys.stderr)


def convert_split(source: SplitSource, out_root: str, settings: ShardSettings, workers: int = 1,
                  policy: ExistingPolicy = "refuse", progress: bool = False) -> SplitReport:
    """Write all shards of one split; see the module docstring for the output format."""
    start = time.time()
    annotations = read_annotations(source.csv_path)
    out_dir = os.path.join(out_root, source.dataset)
    tasks = make_tasks(source, annotations.entries, out_dir, settings)
    notes = _prepare_output(out_dir, source.split, len(tasks), policy)
    results: Dict[int, ShardResult] = {}
    if policy == "resume":
        for task in tasks:
            kept = completed_shard(task)
            if kept is not None:
                results[task.index] = kept
    pending = [task for task in tasks if task.index not in results]
    pending_images = sum(len(task.entries) for task in pending)
    with _progress_bar(pending_images, f"{source.dataset}/{source.split}", progress) as bar:
        for result in _run_tasks(pending, workers, bar.update):
            results[result.index] = result
    end = time.time()
    ordered = [results[task.index] for task in tasks]
    image_failures = FailureLog()
    for result in ordered:
        image_failures.merge(result.failures)
    update_sizes(out_dir, source.split, {task.name + ".tar": results[task.index].successes for task in tasks})
    report = SplitReport(
        source=source, out_dir=out_dir,
        rows_read=annotations.rows_read + annotations.row_failures.counts.get(MALFORMED_ROW, 0),  # pandas drops those
        unique_images=len(annotations.entries), images_written=sum(r.successes for r in ordered),
        captions_written=sum(r.captions for r in ordered), shards=len(tasks),
        shards_reused=sum(r.reused for r in ordered), image_failures=image_failures,
        row_failures=annotations.row_failures, derived_ids=annotations.derived_ids,
        image_id_conflicts=annotations.image_id_conflicts, duration=end - start,
        images_per_sec=pending_images / max(end - start, 1e-9), start_time=start, end_time=end, notes=notes)
    write_json_atomic(os.path.join(out_dir, f"{source.split}_stats.json"), report.to_json())
    return report


def convert_sources(sources: Sequence[SplitSource], out_root: str, settings: ShardSettings, workers: int = 1,
                    policy: ExistingPolicy = "refuse", progress: bool = False) -> List[SplitReport]:
    """All splits in order. Every CSV is read and checked before anything is written, so input errors fail fast."""
    for source in sources:
        check_csv(source.csv_path)
        out_dir = os.path.join(out_root, source.dataset)
        existing = split_output_files(out_dir, source.split)
        if existing and policy == "refuse":
            _prepare_output(out_dir, source.split, 0, policy)  # raises with the message
    return [convert_split(source, out_root, settings, workers, policy, progress) for source in sources]


# --------------------------------------------------------------------------------------------------
# Outcome
# --------------------------------------------------------------------------------------------------


def exit_status(reports: Sequence[SplitReport], strict: bool) -> int:
    """0 normally; 1 when nothing at all was written, or under strict when anything was skipped."""
    if sum(report.images_written for report in reports) == 0:
        return 1
    if strict and any(report.skipped for report in reports):
        return 1
    return 0


def _failure_lines(title: str, log: FailureLog) -> List[str]:
    lines = []
    for reason in sorted(log.counts):
        example = log.examples.get(reason, [""])[0] if log.examples.get(reason) else ""
        lines.append(f"    skipped {title} {reason}: {log.counts[reason]}" + (f"  e.g. {example}" if example else ""))
    return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def format_summary(reports: Sequence[SplitReport], notes: Sequence[str] = (), quiet: bool = False) -> str:
    images = sum(r.images_written for r in reports)
    captions = sum(r.captions_written for r in reports)
    skipped = sum(r.skipped for r in reports)
    seconds = sum(r.duration for r in reports)
    if quiet:
        parts = [f"{r.source.dataset}/{r.source.split} {r.images_written}/{r.unique_images} img" for r in reports]
        return (f"make_shards: {images} images, {captions} captions, {skipped} skipped, "
                f"{_plural(sum(r.shards for r in reports), 'shard')}, {seconds:.1f}s ({'; '.join(parts)})")
    lines = []
    for r in reports:
        reused = f", {r.shards_reused} kept from before" if r.shards_reused else ""
        lines.append(f"{r.source.dataset}/{r.source.split}: {r.rows_read} rows -> {r.images_written} of "
                     f"{r.unique_images} images, {r.captions_written} captions in "
                     f"{_plural(r.shards, 'shard')}{reused}; "
                     f"{r.duration:.1f}s, {r.images_per_sec:.0f} img/s")
        lines.append(f"    {r.shard_pattern}")
        if r.derived_ids:
            lines.append(f"    derived {' and '.join(r.derived_ids)} (column missing in the CSV)")
        if r.image_id_conflicts:
            lines.append(f"    {r.image_id_conflicts} rows gave an image another image_id; the first one is kept")
        lines.extend(_failure_lines("images", r.image_failures))
        lines.extend(_failure_lines("caption rows", r.row_failures))
        lines.extend(f"    note: {note}" for note in r.notes)
    lines.extend(f"note: {note}" for note in notes)
    lines.append(f"total: {images} images, {captions} captions, {skipped} skipped, {seconds:.1f}s"
                 + ("; details in each <split>_stats.json" if skipped else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------


def _benchmark_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like frame: smooth gradients, a few solid shapes and mild sensor-like noise."""
    from PIL import ImageDraw

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    tilt = rng.uniform(-0.2, 0.2, size=(2, 3)).astype(np.float32)
    pixels = base + xs[..., None] * tilt[0] + ys[..., None] * tilt[1] + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, width), rng.integers(0, height)
        size = int(rng.integers(20, 160))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((x, y, x + size, y + size), fill=colour)
    return image


def write_benchmark_dataset(root: str, num_images: int, size: Tuple[int, int] = (640, 480), seed: int = 0
                            ) -> SplitSource:
    """``root/bench/train_anno.csv`` + ``train/*.jpg`` of photo-like JPEGs (quality 90)."""
    rng = np.random.default_rng(seed)
    images_dir = os.path.join(root, "bench", "train")
    os.makedirs(images_dir, exist_ok=True)
    rows = ["image,caption"]
    for index in range(num_images):
        name = f"{index:06d}.jpg"
        _benchmark_image(rng, *size).save(os.path.join(images_dir, name), format="JPEG", quality=90)
        rows.append(f"{name},benchmark image {index}")
    csv_path = os.path.join(root, "bench", "train_anno.csv")
    with open(csv_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(rows) + "\n")
    return SplitSource("bench", "train", csv_path, images_dir)


def benchmark_shards(num_images: int = 512, workers: Sequence[int] = (1, 2), max_size: int = 256,
                     resample: str = "box", work_dir: Optional[str] = None, progress: bool = False
                     ) -> Dict[str, object]:
    """Convert generated 640x480 JPEGs to max_size at each worker count; images/s per worker and speed-up.

    Timings are end to end (CSV read, pool start, decode, resize, encode, tar and stats writes)."""
    runs = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="zvl_shards_bench_") as root:
        source = write_benchmark_dataset(root, num_images)
        # Enough shards that every worker count divides the work evenly.
        settings = ShardSettings(samples_per_shard=max(1, math.ceil(num_images / (4 * max(workers)))),
                                 max_size=max_size, resample=resample)  # type: ignore[arg-type]
        for count in workers:
            start = time.perf_counter()
            report = convert_split(source, os.path.join(root, f"out_{count}"), settings, workers=count,
                                   progress=progress)
            seconds = time.perf_counter() - start
            if report.images_written != num_images:
                raise RuntimeError(f"benchmark wrote {report.images_written} of {num_images} images")
            runs.append({"workers": count, "seconds": round(seconds, 3),
                         "images_per_sec": round(num_images / seconds, 1),
                         "images_per_sec_per_worker": round(num_images / seconds / count, 1)})
    base = runs[0]["images_per_sec"]
    return {"images": num_images, "image_size": [640, 480], "max_size": max_size, "resample": resample,
            "cpu_count": os.cpu_count(),
            "runs": runs,
            "speedup": {str(r["workers"]): round(float(r["images_per_sec"]) / float(base), 2) for r in runs}}


def format_benchmark(result: Dict[str, object]) -> str:
    lines = [f"shard writer benchmark: {result['images']} JPEGs 640x480 -> max-size {result['max_size']} "
             f"({result['resample']}, {result['cpu_count']} CPUs)"]
    for run in result["runs"]:  # type: ignore[union-attr]
        lines.append(f"  workers={run['workers']}: {run['images_per_sec']:.1f} img/s total, "
                     f"{run['images_per_sec_per_worker']:.1f} img/s per worker ({run['seconds']:.2f}s), "
                     f"speed-up x{result['speedup'][str(run['workers'])]:.2f}")  # type: ignore[index]
    return "\n".join(lines)
