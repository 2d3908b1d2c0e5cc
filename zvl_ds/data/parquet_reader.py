"""Raw samples out of Parquet row groups: the tar reader's counterpart for ``data.datasets.<name>.parquet``.

A row group is a unit of the sampling plan, as a tar shard is, and a sample's position is its row inside the row
group: ``read_row_group`` yields the rows ``[start, stop)`` of one as ``RawSample``s that the decoder takes as it
takes a tar's (the image cell's bytes as the image member, the captions as a json ``captions`` list). A row whose
image or caption cell is empty is skipped and counted here (``missing_image``, ``missing_caption``); an image that
does not decode is counted by the decoder (``corrupt_image``, ``too_many_pixels``), as for tars.

Bounded reads, checked before any row is read:
- a row group whose image and caption columns declare more than ``MAX_ROW_GROUP_BYTES`` uncompressed (a huge cell,
  or a small cell that would decompress to gigabytes) is skipped unread and counted (``row_group_too_large``);
- a column chunk that runs past the end of the file (the file cut short, or a crafted offset) loses the row
  group's samples as ``truncated_shard``, unread, as a tar member past the end does;
- the file must be a regular file, and its footer is parsed under ``parquet_files``' Thrift limits.
Rows are then decoded ``READ_BATCH_ROWS`` at a time, the column chunks read through a small buffer, so a worker
holds one batch of rows beyond its shuffle buffer. A file that cannot be opened counts the planned samples as
``unreadable_shard``; a read that fails part-way counts the rest as ``truncated_shard``; rows the plan expects
but the row group lacks (the file changed) count as ``short_shard``.

Unlike a local tar, whose skipped samples cost a header read, a row group is decoded to reach a row in it: a
resumed role re-reads its piece's row groups up to where it stopped (as a streamed tar is re-read).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

from zvl_ds.data.failures import (MISSING_CAPTION, MISSING_IMAGE, ROW_GROUP_TOO_LARGE, SHORT_SHARD, TRUNCATED_SHARD,
                                  UNREADABLE_SHARD, FailureCounter)
from zvl_ds.data.parquet_files import IMAGE_BYTES_FIELD, IMAGE_PATH_FIELD, ParquetLayout, open_parquet
from zvl_ds.data.reader import RawSample

MAX_ROW_GROUP_BYTES = 1 << 30  # declared uncompressed bytes of the image and caption columns of one row group
READ_BATCH_ROWS = 64
IMAGE_FIELD = "jpg"  # the member the decoder takes the image from; it reads any format Pillow knows


class _OpenFile:
    """One opened file: its reader, size when opened, and the first row of each row group."""

    def __init__(self, path: str):
        self.size = os.path.getsize(path)
        self.handle = open_parquet(path)
        metadata = self.handle.metadata
        self.first_rows = [0]
        for group in range(metadata.num_row_groups):
            self.first_rows.append(self.first_rows[-1] + metadata.row_group(group).num_rows)


class _OpenFiles:
    """A few files kept open per process (a piece reads many row groups of one file in a row), keyed by path,
    size and modification time, so that a file replaced since is opened afresh."""

    def __init__(self, max_open: int = 8):
        self.max_open = max_open
        self._pid = os.getpid()
        self._files: "OrderedDict[Tuple[str, int, int], _OpenFile]" = OrderedDict()

    def get(self, path: str) -> _OpenFile:
        if self._pid != os.getpid():  # a forked loader worker: the parent's readers are not this process's
            self._pid, self._files = os.getpid(), OrderedDict()
        status = os.stat(path)
        key = (path, status.st_size, status.st_mtime_ns)
        found = self._files.get(key)
        if found is None:
            found = self._files[key] = _OpenFile(path)
            while len(self._files) > self.max_open:  # not closed here: a part being read may still hold it; the
                self._files.popitem(last=False)  # file closes with its last reader
        self._files.move_to_end(key)
        return found


_OPEN_FILES = _OpenFiles()


def _arrow_errors() -> Tuple[type, ...]:
    import pyarrow

    return (OSError, ValueError, EOFError, pyarrow.ArrowException)


def _chunk_start(chunk) -> int:
    dictionary = chunk.dictionary_page_offset
    return dictionary if chunk.has_dictionary_page and dictionary is not None else chunk.data_page_offset


def row_group_problem(opened: _OpenFile, group: int, columns: Sequence[str], max_bytes: int
                      ) -> Optional[Tuple[str, str]]:
    """(reason, message) when row group ``group`` must not be read: absent, its chunks past the end of the file,
    or declaring more than ``max_bytes`` for ``columns``. Only the footer is consulted."""
    metadata = opened.handle.metadata
    if not 0 <= group < metadata.num_row_groups:
        return SHORT_SHARD, f"no row group {group} (the file holds {metadata.num_row_groups}; it changed?)"
    row_group = metadata.row_group(group)
    declared = 0
    for index in range(row_group.num_columns):
        chunk = row_group.column(index)
        if not any(chunk.path_in_schema == name or chunk.path_in_schema.startswith(name + ".") for name in columns):
            continue
        declared += max(chunk.total_uncompressed_size, chunk.total_compressed_size)
        start = _chunk_start(chunk)
        if start < 0 or chunk.total_compressed_size < 0 or start + chunk.total_compressed_size > opened.size:
            return TRUNCATED_SHARD, (f"row group {group}: column chunk {chunk.path_in_schema} runs past the end of "
                                     f"the file ({start} + {chunk.total_compressed_size} > {opened.size} bytes)")
    if declared > max_bytes:
        return ROW_GROUP_TOO_LARGE, (f"row group {group}: columns {', '.join(columns)} declare {declared} bytes, "
                                     f"above the {max_bytes} one loader read may take (rewrite the file with "
                                     "smaller row groups, or convert it with python -m zvl_ds.make_shards --parquet)")
    return None


class RowGroupLost(Exception):
    """The rest of a row group cannot be read; ``reason`` is what its rows are counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RowBatch(NamedTuple):
    """Cells of consecutive rows of one row group: the images (bytes, and a struct's paths) only when asked for."""

    first: int  # position of the first row in the row group
    first_in_file: int
    captions: List[object]
    images: Optional[List[Optional[bytes]]]
    image_paths: Optional[List[Optional[str]]]


def row_batches(path: str, group: int, layout: ParquetLayout, start: int, stop: int, with_images: bool = True,
                max_bytes: int = MAX_ROW_GROUP_BYTES) -> Iterator[RowBatch]:
    """The rows ``[start, stop)`` of row group ``group`` of ``path``, a batch at a time, after the footer's checks
    (``row_group_problem``); raises ``RowGroupLost`` when the row group, or the rest of it, cannot be read."""
    columns = [layout.caption_column] + ([layout.image_column] if with_images else [])
    errors = _arrow_errors()
    try:
        opened = _OPEN_FILES.get(path)
        problem = row_group_problem(opened, group, columns, max_bytes)
    except errors as error:
        raise RowGroupLost(UNREADABLE_SHARD, f"{path}: {type(error).__name__}: {error}") from None
    if problem is not None:
        raise RowGroupLost(problem[0], f"{path}: {problem[1]}")
    offset = 0
    try:
        for batch in opened.handle.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group], columns=columns,
                                                use_threads=False):
            lo, hi = max(start - offset, 0), min(stop - offset, batch.num_rows)
            if lo < hi:
                images, paths = (_image_cells(batch.column(layout.image_column).slice(lo, hi - lo)) if with_images
                                 else (None, None))
                captions = batch.column(layout.caption_column).slice(lo, hi - lo).to_pylist()
                yield RowBatch(offset + lo, opened.first_rows[group] + offset + lo, captions, images, paths)
            offset += batch.num_rows
            if offset >= stop:
                return
    except errors as error:
        raise RowGroupLost(TRUNCATED_SHARD, f"{path}: row group {group}: {type(error).__name__}: {error}") from None


def _image_cells(column) -> Tuple[List[Optional[bytes]], Optional[List[Optional[str]]]]:
    """The image bytes of each row, and for a struct column each row's ``path`` (to name an image without bytes)."""
    import pyarrow.types as types

    if not types.is_struct(column.type):
        return column.to_pylist(), None
    fields = column.flatten()  # with the struct's own nulls merged into each field's
    names = [column.type.field(i).name for i in range(column.type.num_fields)]
    paths = fields[names.index(IMAGE_PATH_FIELD)].to_pylist() if IMAGE_PATH_FIELD in names else None
    return fields[names.index(IMAGE_BYTES_FIELD)].to_pylist(), paths


def caption_list(cell) -> List[str]:
    """A caption cell's captions: a string is one, a list is several (its nulls dropped), a null none."""
    if cell is None:
        return []
    return [cell] if isinstance(cell, str) else [caption for caption in cell if caption is not None]


def missing_image(image_path: Optional[str]) -> str:
    """What a row whose image cell holds no bytes is skipped with (a Hugging Face cell may name a file instead)."""
    only_path = f" (only a path, {image_path!r}: files outside are not read)" if image_path else ""
    return f"the image cell holds no bytes{only_path}"


def row_problem(image: Optional[bytes], image_path: Optional[str], captions: List[str]) -> Optional[Tuple[str, str]]:
    """(reason, message) when a row cannot be a sample: no image bytes, or no caption that is not blank."""
    if not image:
        return MISSING_IMAGE, missing_image(image_path)
    if not any(caption.strip() for caption in captions):
        return MISSING_CAPTION, "the caption cell holds no caption"
    return None


def read_row_group(path: str, unit: int, layout: ParquetLayout, start: int, stop: int, faults: FailureCounter,
                   max_bytes: int = MAX_ROW_GROUP_BYTES) -> Iterator[RawSample]:
    """Rows ``[start, stop)`` of unit ``unit`` (row group ``layout.row_groups[unit]`` of ``path``) as raw samples;
    what cannot be read is counted in ``faults``."""
    if stop <= start:
        return
    group = layout.row_groups[unit]
    consumed = 0  # rows of [start, stop) yielded or counted
    try:
        for batch in row_batches(path, group, layout, start, stop, max_bytes=max_bytes):
            for index, (image, cell) in enumerate(zip(batch.images, batch.captions)):  # type: ignore[arg-type]
                consumed += 1
                captions = caption_list(cell)
                problem = row_problem(image, batch.image_paths[index] if batch.image_paths else None, captions)
                if problem is not None:
                    faults.add(problem[0], f"{path}: row group {group} row {batch.first + index}: {problem[1]}")
                    continue
                fields = {IMAGE_FIELD: image, "json": json.dumps({"captions": captions}).encode("utf-8")}
                yield RawSample(f"{os.path.basename(path)}/{batch.first_in_file + index}", path, unit,
                                batch.first + index, fields)  # type: ignore[arg-type]
    except RowGroupLost as lost:
        faults.add(lost.reason, str(lost), stop - start - consumed)
        return
    if consumed < stop - start:
        faults.add(SHORT_SHARD, f"{path}: row group {group}: {stop - start - consumed} of rows {start}..{stop - 1} "
                                "absent (the file changed?)", stop - start - consumed)
