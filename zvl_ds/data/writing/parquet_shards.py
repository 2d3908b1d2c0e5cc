"""make_shards --parquet: Parquet rows (a Hugging Face dataset snapshot, img2dataset's Parquet output) -> the shard
writer's tars, for users who prefer tars to reading Parquet in place.

The output is the shard writer's (``shard_writer.py``): ``OUT/<name>/<split>-NNNNNN.tar`` holding ``KEY.jpg`` (the
image converted as the CSV path converts it: --max-size, --jpeg-quality, --max-pixels), ``KEY.json`` and
``KEY.txt``, with per-shard and per-split stats and sizes.json. Shard ``i`` holds rows ``[i*N, (i+1)*N)`` of the
rows in order (the files in the order the spec names them, each file's row groups in order). A row is one image:
its ``image_id`` is its row among all the rows, its captions are its caption cell (a string, or a list of strings),
numbered in order over the split as its ``caption_ids``; ``image`` in the json is ``<file>/<row in the file>``.

Atomic and resumable as the CSV path: a shard reaches its name complete, and --resume keeps a shard whose input is
unchanged (the settings, its rows' captions and ids, and the size and modification time of each Parquet file it
reads). Rows are read as the training loader reads them (``parquet_reader.py``, with its bounds): a row without
image bytes is skipped as ``missing_image``, one without a caption as ``no_valid_caption``, and the rows of a row
group that cannot be read under the loader's reason (``unreadable_shard``, ``truncated_shard``,
``row_group_too_large``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from zvl_ds.data.failures import MISSING_IMAGE, NO_VALID_CAPTION, SHORT_SHARD, FailureCounter, SampleSkipped
from zvl_ds.data.parquet_files import ParquetLayout, expand_parquet_spec, read_layout
from zvl_ds.data.parquet_reader import RowGroupLost, caption_list, missing_image, row_batches
from zvl_ds.data.sampling import segments_in_range
from zvl_ds.data.writing.annotations import Annotations, ImageEntry, InputError, SplitSource
from zvl_ds.data.writing.shard_writer import (FORMAT_VERSION, ExistingPolicy, ShardSettings, ShardTask, SplitReport,
                                              split_output_files, write_json_atomic, write_split)

RowRange = Tuple[str, int, int, int]  # (file, row group, first row, row after the last) of a shard's rows
Cell = Union[bytes, SampleSkipped]


@dataclass(frozen=True)
class ParquetShardTask(ShardTask):
    """A shard of Parquet rows: its entries (captions and ids, read up front) and where their images are."""

    layout: ParquetLayout = ParquetLayout((), "", "")
    rows: Tuple[RowRange, ...] = ()
    files: Tuple[Tuple[str, int, int], ...] = ()  # (file, size, mtime) of every file the rows come from
    cells: Dict[int, Cell] = field(default_factory=dict, compare=False, repr=False)  # filled in the worker

    def input_hash(self) -> str:
        digest = hashlib.sha256()
        header = {"format": FORMAT_VERSION, "input": "parquet", "settings": asdict(self.settings),
                  "dataset": self.source.dataset, "split": self.source.split, "index": self.index,
                  "columns": [self.layout.image_column, self.layout.caption_column], "rows": self.rows,
                  "files": self.files}
        digest.update(json.dumps(header, sort_keys=True).encode())
        for entry in self.entries:
            digest.update(json.dumps([entry.image, entry.image_id, entry.captions, entry.caption_ids]).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def image_bytes(self, position: int, entry: ImageEntry) -> bytes:
        if position not in self.cells:  # the shard's first image: read them all (each is handed out once)
            self.cells.update(self._read_images())
        cell = self.cells.pop(position)
        if isinstance(cell, SampleSkipped):
            raise SampleSkipped(cell.reason, str(cell))
        if not entry.captions:
            raise SampleSkipped(NO_VALID_CAPTION, "the caption cell holds no caption")
        return cell

    def _read_images(self) -> Dict[int, Cell]:
        cells: Dict[int, Cell] = {}
        first = 0
        for path, group, start, stop in self.rows:
            read = 0
            try:
                for batch in row_batches(path, group, self.layout, start, stop):
                    for image, image_path in zip(batch.images, batch.image_paths or [None] * len(batch.images)):
                        cells[first + read] = image or SampleSkipped(MISSING_IMAGE, missing_image(image_path))
                        read += 1
            except RowGroupLost as lost:
                for offset in range(read, stop - start):
                    cells[first + offset] = SampleSkipped(lost.reason, str(lost))
            for offset in range(read, stop - start):
                cells.setdefault(first + offset, SampleSkipped(SHORT_SHARD, f"{path}: row group {group} ends early"))
            first += stop - start
        return cells


def _read_entries(unit_files: Sequence[str], sizes: Sequence[int], layout: ParquetLayout) -> List[ImageEntry]:
    """One entry per row, with its captions (the caption column only is read). A row group whose captions cannot
    be read gives entries without captions: its images are read (and counted) in the worker."""
    entries: List[ImageEntry] = []
    caption_id = 0
    first_row = {path: 0 for path in unit_files}
    for unit, (path, rows) in enumerate(zip(unit_files, sizes)):
        cells: List[List[str]] = []
        try:
            for batch in row_batches(path, layout.row_groups[unit], layout, 0, rows, with_images=False):
                cells.extend(caption_list(cell) for cell in batch.captions)
        except RowGroupLost:
            pass
        for row in range(rows):
            captions = [caption for caption in cells[row] if caption.strip()] if row < len(cells) else []
            entry = ImageEntry(f"{os.path.basename(path)}/{first_row[path] + row}", len(entries), len(entries) + 1,
                               captions, list(range(caption_id, caption_id + len(captions))))
            caption_id += len(captions)
            entries.append(entry)
        first_row[path] += rows
    return entries


def _row_ranges(unit_files: Sequence[str], sizes: Sequence[int], layout: ParquetLayout, lo: int, hi: int
                ) -> Tuple[RowRange, ...]:
    order = np.arange(len(sizes))
    return tuple((unit_files[s.shard], layout.row_groups[s.shard], s.start, s.stop)
                 for s in segments_in_range(order, np.asarray(sizes, dtype=np.int64), lo, hi))


def _file_stamps(paths: Sequence[str]) -> Tuple[Tuple[str, int, int], ...]:
    stamps = []
    for path in dict.fromkeys(paths):
        status = os.stat(path)
        stamps.append((os.path.abspath(path), status.st_size, status.st_mtime_ns))
    return tuple(stamps)


def convert_parquet(spec: str, dataset: str, split: str, out_root: str, settings: ShardSettings, workers: int = 1,
                    policy: ExistingPolicy = "refuse", progress: bool = False, image_column: str = "",
                    caption_column: str = "") -> SplitReport:
    """Write ``OUT/<dataset>/<split>-*.tar`` from the Parquet files of ``spec``; see the module docstring."""
    start = time.time()
    if split not in ("train", "valid"):
        raise InputError(f"--parquet writes one split: pass --split train or --split valid, not {split!r}")
    if not dataset or "/" in dataset or dataset in (".", ".."):
        raise InputError(f"--parquet needs one --dataset NAME (the folder OUT/NAME), got {dataset!r}")
    files = expand_parquet_spec(spec)
    unit_files, sizes, layout = read_layout(files, image_column, caption_column, ("--image-column", "--caption-column"))
    out_dir = os.path.join(out_root, dataset)
    if policy == "refuse" and split_output_files(out_dir, split):
        raise InputError(f"{out_dir} already holds {split} output; pass --resume to finish it or --overwrite to "
                         "replace it")
    entries = _read_entries(unit_files, sizes, layout)
    source = SplitSource(dataset, split, spec, "")
    per_shard = settings.samples_per_shard
    tasks = []
    for index, lo in enumerate(range(0, len(entries), per_shard)):
        rows = _row_ranges(unit_files, sizes, layout, lo, min(lo + per_shard, len(entries)))
        tasks.append(ParquetShardTask(source, out_dir, index, tuple(entries[lo:lo + per_shard]), settings, layout,
                                      rows, _file_stamps([row[0] for row in rows])))
    annotations = Annotations(entries, len(entries), FailureCounter(), [], 0)
    report = write_split(source, annotations, tasks, out_dir, workers, policy, progress, start)
    report.notes.append(f"read {len(entries)} rows from {len(files)} Parquet file(s), {len(sizes)} row group(s)")
    stats = report.to_json()
    for key in ("csv", "images_dir"):
        del stats[key]
    stats["parquet"] = [os.path.abspath(path) for path in files]
    write_json_atomic(os.path.join(out_dir, f"{split}_stats.json"), stats)
    return report
