"""Writing WebDataset shards from grouped annotations: one shard, ``--resume``, a whole split, the summary.

The writer behind ``python -m zvl_ds.make_shards``; inputs come from ``annotations.py``, image bytes from ``images.py``.
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

Rows and images that cannot be used are skipped and counted by reason (see ``annotations.py`` and ``images.py``).
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

from zvl_ds.base.atomic_write import atomic_path, write_text_atomic
from zvl_ds.base.checksums import file_sha256
from zvl_ds.data.failures import (CORRUPT_IMAGE, EMPTY_FILE, INVALID_UTF8, MISSING_FILE, NO_VALID_CAPTION, NOT_AN_IMAGE,
                                  OTHER_ERROR, TOO_MANY_PIXELS, FailureCounter, SampleSkipped)
from zvl_ds.data.writing.annotations import (Annotations, ImageEntry, InputError, SplitSource, check_csv,
                                             has_undecodable_bytes, read_annotations)
from zvl_ds.data.writing.images import (DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS, RESAMPLING, ConvertedImage,
                                        convert_image, pixel_limit, read_image_file)

TAR_SUFFIXES = ("jpg", "json", "txt")  # fixed member order inside a sample
FORMAT_VERSION = 1  # bump when the bytes written for the same input change; old shards then fail --resume checks
TEMP_SUFFIX = ".tmp"

# img2dataset groups its failures into download and resize failures; we map our reasons onto those names.
_DOWNLOAD_REASONS = (MISSING_FILE, EMPTY_FILE)
_DECODE_REASONS = (NOT_AN_IMAGE, CORRUPT_IMAGE, TOO_MANY_PIXELS, OTHER_ERROR)
_CAPTION_REASONS = (NO_VALID_CAPTION, INVALID_UTF8)

ExistingPolicy = Literal["refuse", "resume", "overwrite"]


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
    max_file_mb: int = DEFAULT_MAX_FILE_MB  # larger image files are skipped unread (file_too_large)
    allow_outside_images: bool = False  # accept image paths (absolute, `..`, links) that leave the image folder

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise InputError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.max_size < 0:
            raise InputError(f"--max-size must be >= 0 (0 keeps the original size), got {self.max_size}")
        if self.max_pixels < 1:
            raise InputError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.max_file_mb < 1:
            raise InputError(f"--max-file-mb must be >= 1, got {self.max_file_mb}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InputError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.resample not in RESAMPLING:
            raise InputError(f"--resample must be one of {', '.join(RESAMPLING)}, got {self.resample!r}")

    @property
    def key_digits(self) -> int:
        """Digits of the in-shard position in a key; fixed per run so keys never collide."""
        return max(6, len(str(self.samples_per_shard - 1)))


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

    def input_hash(self) -> str:
        return shard_input_hash(self)

    def image_bytes(self, position: int, entry: ImageEntry) -> bytes:
        """The image file of the entry at ``position`` of the shard; raises SampleSkipped."""
        if has_undecodable_bytes(entry.image):
            raise SampleSkipped(INVALID_UTF8, "file name is not valid UTF-8")
        if not entry.captions:
            raise SampleSkipped(NO_VALID_CAPTION, "no valid caption left")
        if not entry.image:
            raise SampleSkipped(MISSING_FILE, "empty file name")
        return read_image_file(os.path.join(self.source.images_dir, entry.image), self.source.images_dir,
                               self.settings.max_file_mb << 20, self.settings.allow_outside_images)


@dataclass
class ShardResult:
    index: int
    count: int  # images assigned to the shard
    successes: int
    captions: int
    failures: FailureCounter
    duration: float
    reused: bool = False  # kept from an earlier run under --resume


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
    image_failures: FailureCounter
    row_failures: FailureCounter
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


def write_json_atomic(path: str, payload: object) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n", TEMP_SUFFIX)


def write_shard(task: ShardTask, on_image: Optional[Callable[[], None]] = None) -> ShardResult:
    """Write ``task.tar_path`` (via a temporary name, then rename) and its stats json; returns the counts."""
    start = time.time()
    input_hash = task.input_hash()
    failures = FailureCounter()
    successes = captions = 0
    with atomic_path(task.tar_path, TEMP_SUFFIX) as temp_path, pixel_limit(task.settings.max_pixels), \
            open(temp_path, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for position, entry in enumerate(task.entries):
                try:
                    converted = convert_image(task.image_bytes(position, entry), task.settings)
                except SampleSkipped as skip:
                    failures.add(skip.reason, f"{entry.image} (data row {entry.row}): {skip}")
                else:
                    key = sample_key(task.index, position, task.settings)
                    for name, payload in _sample_members(key, converted, entry, task.source):
                        archive.addfile(*_tar_member(name, payload))
                    successes += 1
                    captions += len(entry.captions)
                if on_image is not None:
                    on_image()
    end = time.time()
    stats = _shard_stats(task, successes, captions, failures, start, end, input_hash)
    write_json_atomic(task.stats_path, stats)
    return ShardResult(task.index, len(task.entries), successes, captions, failures, end - start)


def _shard_stats(task: ShardTask, successes: int, captions: int, failures: FailureCounter, start: float, end: float,
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
                "sha256": file_sha256(task.tar_path), "members": successes * len(TAR_SUFFIXES)},
    }


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
        if stats.get("input_hash") != task.input_hash():
            return None
        if os.path.getsize(task.tar_path) != tar_stats["bytes"]:
            return None
        with tarfile.open(task.tar_path, mode="r:") as archive:
            members = sum(1 for _ in archive)
        if members != tar_stats["members"] or members != stats["successes"] * len(TAR_SUFFIXES):
            return None
        return ShardResult(task.index, int(stats["count"]), int(stats["successes"]), int(stats["captions"]),
                           FailureCounter.from_json(stats["failures"]), float(stats["duration"]), reused=True)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, tarfile.TarError):
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
    except (OSError, ValueError, RecursionError):
        pass
    merged.update(sizes)
    write_json_atomic(path, dict(sorted(merged.items())))


class WorkerDied(RuntimeError):
    """A worker process ended without finishing its shard."""


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
    # A process pool that notices dead workers: multiprocessing.Pool replaces a worker killed by a signal (the
    # OOM killer) and waits forever for the shard it held; this executor fails instead.
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=_pool_context()) as pool:
        try:
            for result in pool.map(write_shard, tasks):
                on_images(result.count)
                yield result
        except BrokenProcessPool:
            raise WorkerDied("a shard worker process died (killed by a signal, e.g. the out-of-memory killer; "
                             "try fewer --workers); the finished shards are complete: rerun with --resume") from None


def _progress_bar(total: int, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="img", disable=not enabled, dynamic_ncols=True, leave=False,
                file=sys.stderr)


def convert_split(source: SplitSource, out_root: str, settings: ShardSettings, workers: int = 1,
                  policy: ExistingPolicy = "refuse", progress: bool = False) -> SplitReport:
    """Write all shards of one split; see the module docstring for the output format. Image paths that leave
    the image folder (absolute, `..`, a link out) are bad rows unless ``settings.allow_outside_images``."""
    start = time.time()
    annotations = read_annotations(source.csv_path, settings.allow_outside_images)
    out_dir = os.path.join(out_root, source.dataset)
    tasks = make_tasks(source, annotations.entries, out_dir, settings)
    return write_split(source, annotations, tasks, out_dir, workers, policy, progress, start)


def write_split(source: SplitSource, annotations: Annotations, tasks: Sequence[ShardTask], out_dir: str, workers: int,
                policy: ExistingPolicy, progress: bool, start: float) -> SplitReport:
    """Write (or, under --resume, keep) the shards of ``tasks``, then sizes.json and the split's stats."""
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
    image_failures = FailureCounter()
    for result in ordered:
        image_failures.merge(result.failures)
    update_sizes(out_dir, source.split, {task.name + ".tar": results[task.index].successes for task in tasks})
    report = SplitReport(
        source=source, out_dir=out_dir,
        rows_read=annotations.rows_read,
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
    return [convert_split(source, out_root, settings, workers, policy, progress)
            for source in sources]


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


def _failure_lines(title: str, log: FailureCounter) -> List[str]:
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
