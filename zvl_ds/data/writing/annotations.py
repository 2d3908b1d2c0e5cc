"""Finding the annotation CSVs named on the command line and reading them into one entry per unique image.

Input (ZeroVL layout): ``DATA_ROOT/<name>/<split>_anno.csv`` with columns ``image`` (file name relative to
``DATA_ROOT/<name>/<split>/``), ``caption`` and optionally ``image_id`` / ``caption_id``; one row per caption.

Captions and file names lose surrounding whitespace; rows of one image keep their CSV order. Rows that cannot
be used (empty caption, caption bytes not UTF-8, unparsable id, wrong field count) are skipped and counted. So
are rows that do not parse as the header says: a stray quote makes the CSV parser read the following lines into
one field, and a field whose later lines look like rows of their own (the header's field count, a file name in the
`image` column) is a ``malformed_row``, counted with the rows it swallowed; lines of the file that end up in no
row at all are counted too. Nothing is dropped silently.

Ids: when ``image_id`` is missing it is derived from the image file name (63-bit positive int from BLAKE2b);
when ``caption_id`` is missing it is the caption's 0-based data row in the CSV. Both are stable for the same CSV.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from zvl_ds.base.errors import UserError
from zvl_ds.data.failures import (EMPTY_CAPTION, INVALID_ID, INVALID_UTF8, MALFORMED_ROW, PATH_OUTSIDE_IMAGES,
                                  FailureCounter)

SPLITS = ("train", "valid")
REQUIRED_COLUMNS = ("image", "caption")


class InputError(UserError):
    """A problem with the command's input that the user must fix; the CLI prints it and exits with code 2."""


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
class Annotations:
    """A CSV read and grouped by image."""

    entries: List[ImageEntry]
    rows_read: int  # rows of the file: parsed, swallowed into another row's field, or skipped by the parser
    row_failures: FailureCounter
    derived_ids: List[str]  # id columns that were missing and derived
    image_id_conflicts: int  # rows whose image_id differs from the image's first row (the first one is kept)


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


def _data_lines(csv_path: str) -> int:
    """Non-blank lines after the header (streamed: the file may be large)."""
    with open(csv_path, "rb") as handle:
        return max(0, sum(1 for line in handle if line.strip()) - 1)


def _unaccounted_lines(csv_path: str, frame: pd.DataFrame, dropped: int) -> int:
    """Data lines of the file that are in no row: not a parsed row, not a line the parser skipped and not a line
    inside a quoted multi-line field. (Blank lines inside fields make this an undercount, never a false alarm.)"""
    inside_fields = sum(value.count("\n") for column in frame.columns for value in frame[column].tolist()
                        if isinstance(value, str))
    return _data_lines(csv_path) - (len(frame) + dropped + inside_fields)


@contextlib.contextmanager
def _python_strings():
    """Text columns and headers held as Python strings. With pyarrow installed, pandas 3 stores strings in Arrow,
    which must be valid UTF-8: the lone surrogates of an undecodable byte would fail the whole read instead of the
    one row that holds them. Python storage keeps them, with or without pyarrow."""
    with pd.option_context("mode.string_storage", "python"):
        yield


def read_csv_frame(csv_path: str) -> Tuple[pd.DataFrame, FailureCounter]:
    """All columns as text. Undecodable bytes become lone surrogates (surrogateescape) so that one bad row is
    detected and skipped rather than killing the read; lines with the wrong field count are skipped and counted."""
    malformed = FailureCounter()
    try:
        with warnings.catch_warnings(record=True) as caught, _python_strings():
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
    with _python_strings():
        _check_frame(frame, csv_path)
    lost = _unaccounted_lines(csv_path, frame, malformed.counts.get(MALFORMED_ROW, 0))
    if lost > 0:
        malformed.add(MALFORMED_ROW, f"{csv_path}: {lost} line(s) of the file are in no row (the CSV parser "
                                     "disagrees with the file's lines)", count=lost)
    return frame, malformed


def check_csv(csv_path: str) -> None:
    """Fail fast on a CSV that cannot be read, lacks a required column or has no rows (reads the head only)."""
    with _python_strings():
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
        binary = any(has_undecodable_bytes(name) or any(ord(c) < 32 for c in name) for name in frame.columns)
        raise InputError(f"{csv_path}: missing required column(s) {', '.join(missing)}; "
                         f"columns found: {', '.join(shown) or 'none'}"
                         + (" (the header is not UTF-8 text: is this a CSV?)" if binary else ""))
    if len(frame) == 0:
        raise InputError(f"{csv_path}: no data rows (empty dataset)")


def derived_image_id(image_name: str) -> int:
    """A stable positive 63-bit id from the image file name (used when the CSV has no image_id column)."""
    digest = hashlib.blake2b(image_name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


ID_RANGE = range(-2**63, 2**63)  # ids are stored and collated as int64


def parse_id(text: str) -> Optional[int]:
    """An int64 id from CSV text ("12", " 12 ", "12.0"); None when it is not one (also "1e30": too large)."""
    text = text.strip()
    try:
        number = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        if not value.is_integer():
            return None
        number = int(value)
    return number if number in ID_RANGE else None


_SURROGATE = re.compile("[\udc80-\udcff]")


def has_undecodable_bytes(text: str) -> bool:
    """True when text holds bytes that were not UTF-8 (read_csv_frame keeps them as lone surrogates)."""
    return _SURROGATE.search(text) is not None


def _column(frame: pd.DataFrame, name: str) -> Optional[List[str]]:
    if name not in frame.columns:
        return None
    return [value if isinstance(value, str) else "" for value in frame[name].tolist()]


def stays_inside_folder(image_name: str) -> bool:
    """True for a relative path without `..` parts: joined to the image folder, it names a file inside it."""
    parts = image_name.replace("\\", "/").split("/")
    return not os.path.isabs(image_name) and ".." not in parts


_FILE_NAME = re.compile(r"^[^\s,]+\.[A-Za-z0-9]{2,5}$")


def swallowed_rows(value: str, columns: int, image_column: int) -> int:
    """Lines after the first of a multi-line field that read as whole rows of the CSV: as many fields as the
    header and a file name in the image column (what a stray quote pulls into one caption)."""
    count = 0
    for line in value.splitlines()[1:]:
        fields = next(csv.reader([line]), [])
        if len(fields) == columns and _FILE_NAME.match(fields[image_column].strip()):
            count += 1
    return count


def group_by_image(frame: pd.DataFrame, row_failures: Optional[FailureCounter] = None,
                   allow_outside_images: bool = False) -> Annotations:
    """One entry per unique image name in order of first appearance, each with its valid captions in row order.

    Captions and file names lose surrounding whitespace. Empty captions, captions with undecodable bytes,
    rows with an unparsable or out-of-int64 id and (unless ``allow_outside_images``) rows whose image path
    leaves the image folder are dropped and counted; an image left without captions stays in the list
    (it keeps its shard position) and is skipped by the writer as ``no_valid_caption``."""
    failures = row_failures if row_failures is not None else FailureCounter()
    images = _column(frame, "image")
    captions = _column(frame, "caption")
    image_ids = _column(frame, "image_id")
    caption_ids = _column(frame, "caption_id")
    derived = [name for name, values in (("image_id", image_ids), ("caption_id", caption_ids)) if values is None]
    columns = [_column(frame, name) or [] for name in frame.columns]
    image_column = list(frame.columns).index("image")
    by_name: Dict[str, ImageEntry] = {}
    conflicts = swallowed_total = 0
    for row, (image, caption) in enumerate(zip(images, captions)):
        image = image.strip()
        where = f"{image or '<empty file name>'} (data row {row + 1})"
        swallowed = sum(swallowed_rows(values[row], len(columns), image_column)
                        for values in columns if "\n" in values[row])
        if swallowed:
            swallowed_total += swallowed
            failures.add(MALFORMED_ROW, f"{where}: a field runs over {swallowed} following line(s) that read as "
                                        "rows of their own (a stray quote?); this row and those are skipped",
                         count=1 + swallowed)
            continue
        image_id = derived_image_id(image) if image_ids is None else parse_id(image_ids[row])
        caption_id = row if caption_ids is None else parse_id(caption_ids[row])
        if image_id is None or caption_id is None:
            bad = image_ids[row] if image_id is None else caption_ids[row]  # type: ignore[index]
            failures.add(INVALID_ID, f"{where}: id {bad!r} is not a 64-bit integer")
            continue
        if not allow_outside_images and not stays_inside_folder(image):
            failures.add(PATH_OUTSIDE_IMAGES, f"{where}: the image path leaves the image folder (absolute or "
                                              "'..'); --allow-outside-images accepts it")
            continue
        entry = by_name.get(image)
        if entry is None:
            entry = by_name[image] = ImageEntry(image=image, image_id=image_id, row=row + 1)
        elif image_id != entry.image_id:
            conflicts += 1
        caption = caption.strip()
        if not caption:
            failures.add(EMPTY_CAPTION, f"{where}: empty caption")
        elif has_undecodable_bytes(caption):
            shown = caption.encode("utf-8", "replace")[:60]
            failures.add(INVALID_UTF8, f"{where}: caption is not valid UTF-8: {shown!r}")
        else:
            entry.captions.append(caption)
            entry.caption_ids.append(caption_id)
    return Annotations(list(by_name.values()), len(images) + swallowed_total, failures, derived, conflicts)


def read_annotations(csv_path: str, allow_outside_images: bool = False) -> Annotations:
    frame, malformed = read_csv_frame(csv_path)
    not_in_frame = malformed.counts.get(MALFORMED_ROW, 0)  # lines the parser skipped or left in no row
    annotations = group_by_image(frame, malformed, allow_outside_images)
    annotations.rows_read += not_in_frame
    return annotations
