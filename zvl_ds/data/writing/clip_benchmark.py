"""Writing clip_benchmark's WebDataset layout (``python -m zvl_ds.make_shards --clip-benchmark``; the layout:
``zvl_ds/data/clip_benchmark_sets.py``) from labelled images or a ZeroVL validation CSV.

Classification images keep their file's bytes when they are RGB JPEG, PNG or WebP, so clip_benchmark decodes the
very pixels ``python -m zvl_ds.classify`` reads; any other image is stored as a lossless RGB PNG. Retrieval images
are converted exactly as ``make_shards`` converts them (same settings, same bytes as the shards
``python -m zvl_ds.eval_retrieval`` reads). Unreadable images are skipped and counted. A set is written into a
temporary folder and renamed: it appears complete or not at all.
"""
from __future__ import annotations

import io
import math
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

from PIL import Image

from zvl_ds.base.atomic_write import atomic_folder
from zvl_ds.data.clip_benchmark_sets import (CLASSNAMES_FILE, DEFAULT_EVAL_WORKERS, KEPT_FORMATS, NSHARDS_FILE, SPLIT,
                                             TEMPLATES_FILE, TYPE_FILE, to_benchmark_template)
from zvl_ds.data.failures import CORRUPT_IMAGE, NO_VALID_CAPTION, FailureCounter, SampleSkipped
from zvl_ds.data.writing.annotations import InputError, SplitSource, read_annotations
from zvl_ds.data.writing.images import convert_image, pixel_limit, read_image_file
from zvl_ds.data.writing.shard_writer import ShardSettings, _tar_member


@dataclass
class BenchmarkSetReport:
    """What one written set holds."""

    name: str
    out_dir: str
    kind: str  # classification | retrieval
    images: int
    shards: int
    captions: int = 0
    classes: int = 0
    failures: FailureCounter = field(default_factory=FailureCounter)

    def summary(self) -> str:
        what = f"{self.classes} classes" if self.kind == "classification" else f"{self.captions} captions"
        skipped = f", {self.failures.total} skipped" if self.failures.total else ""
        # only when skipped images emptied whole runs of the set: clip_benchmark's default workers need a tar each
        workers = (f"; fewer tars than clip_benchmark eval's {DEFAULT_EVAL_WORKERS} default workers: add "
                   f"--num_workers {self.shards}" if self.shards < min(DEFAULT_EVAL_WORKERS, self.images) else "")
        return (f"{self.name}: clip_benchmark {self.kind} set, {self.images} images, {what} in {self.shards} "
                f"tar(s){skipped} -> {self.out_dir} (clip_benchmark eval --dataset wds/{self.name} "
                f"--dataset_root {self.out_dir}{workers})")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _classification_image(path: str) -> Tuple[bytes, str]:
    """(bytes to store, extension): the file itself when clip_benchmark decodes it to the same RGB pixels."""
    data = read_image_file(path)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format in KEPT_FORMATS and image.mode == "RGB":
                image.load()  # a truncated file fails here, as it fails in classify
                return data, KEPT_FORMATS[image.format]
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise SampleSkipped(CORRUPT_IMAGE, f"unreadable: {error}") from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def tar_count(candidates: int, samples_per_shard: int) -> int:
    """Tars for a set of ``candidates`` images: at most ``samples_per_shard`` images in each, and at least one for each
    of clip_benchmark eval's default dataloader workers when there are that many images."""
    return max(math.ceil(candidates / samples_per_shard), min(DEFAULT_EVAL_WORKERS, candidates), 1)


def _write_tars(folder: str, samples: Iterator[Tuple[int, List[Tuple[str, bytes]]]], candidates: int,
                samples_per_shard: int) -> Tuple[int, int]:
    """``folder/SPLIT/0.tar, 1.tar, ...`` and ``nshards.txt`` from ``(candidate index, members)`` pairs; (samples,
    tars). The candidates are cut into ``tar_count`` runs of near-equal length, one tar each, in their order; a run
    whose images were all skipped writes no tar (the tars stay numbered 0..N-1)."""
    split_dir = os.path.join(folder, SPLIT)
    os.makedirs(split_dir)
    runs = tar_count(candidates, samples_per_shard)
    count = shards = 0
    current_run = -1
    archive: Optional[tarfile.TarFile] = None
    try:
        for candidate, members in samples:
            run = candidate * runs // candidates
            if run != current_run:
                if archive is not None:
                    archive.close()
                archive = tarfile.open(os.path.join(split_dir, f"{shards}.tar"), "w", format=tarfile.USTAR_FORMAT)
                shards += 1
                current_run = run
            for name, payload in members:
                archive.addfile(*_tar_member(name, payload))
            count += 1
    finally:
        if archive is not None:
            archive.close()
    _write_text(os.path.join(split_dir, NSHARDS_FILE), f"{shards}\n")
    return count, shards


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _prepare(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not overwrite:
        raise InputError(f"{out_dir} exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)


def write_classification_set(out_dir: str, samples: Sequence[Tuple[str, int]], classnames: Sequence[str],
                             templates: Sequence[str], samples_per_shard: int = 1000,
                             overwrite: bool = False) -> BenchmarkSetReport:
    """A classification set from ``(image path, label)`` samples, class names in label order and ``{}`` templates."""
    if not samples:
        raise InputError("no labelled images to write")
    _prepare(out_dir, overwrite)
    failures = FailureCounter()

    def members() -> Iterator[Tuple[int, List[Tuple[str, bytes]]]]:
        index = 0
        for candidate, (path, label) in enumerate(samples):
            try:
                data, extension = _classification_image(path)
            except SampleSkipped as skip:
                failures.add(skip.reason, f"{path}: {skip}")
                continue
            key = f"{index:08d}"
            index += 1
            yield candidate, [(f"{key}.{extension}", data), (f"{key}.cls", str(label).encode())]

    with atomic_folder(out_dir) as folder:
        _write_text(os.path.join(folder, TYPE_FILE), "classification\n")
        _write_text(os.path.join(folder, CLASSNAMES_FILE), "".join(f"{name}\n" for name in classnames))
        _write_text(os.path.join(folder, TEMPLATES_FILE),
                    "".join(f"{to_benchmark_template(t)}\n" for t in templates))
        images, shards = _write_tars(folder, members(), len(samples), samples_per_shard)
        if not images:
            raise InputError(f"none of the {len(samples)} images could be read; nothing written")
    return BenchmarkSetReport(os.path.basename(os.path.normpath(out_dir)), out_dir, "classification", images, shards,
                              classes=len(classnames), failures=failures)


def write_retrieval_set(out_dir: str, source: SplitSource, settings: ShardSettings, overwrite: bool = False,
                        allow_outside_images: bool = False) -> BenchmarkSetReport:
    """A retrieval set from a ZeroVL annotation CSV: every image once with all its captions (one per line)."""
    annotations = read_annotations(source.csv_path, allow_outside_images)
    _prepare(out_dir, overwrite)
    failures = FailureCounter()
    failures.merge(annotations.row_failures)
    captions = 0

    def members() -> Iterator[Tuple[int, List[Tuple[str, bytes]]]]:
        nonlocal captions
        index = 0
        for candidate, entry in enumerate(annotations.entries):
            try:
                if not entry.captions:
                    raise SampleSkipped(NO_VALID_CAPTION, "no valid caption left")
                converted = convert_image(read_image_file(os.path.join(source.images_dir, entry.image)), settings)
            except SampleSkipped as skip:
                failures.add(skip.reason, f"{entry.image} (data row {entry.row}): {skip}")
                continue
            # one caption per line: a line break inside a caption becomes a space (the same words for the tokenizer)
            lines = [" ".join(caption.splitlines()) for caption in entry.captions]
            captions += len(lines)
            key = f"{index:08d}"
            index += 1
            yield candidate, [(f"{key}.jpg", converted.jpeg), (f"{key}.txt", "\n".join(lines).encode("utf-8"))]

    with atomic_folder(out_dir) as folder, pixel_limit(settings.max_pixels):
        _write_text(os.path.join(folder, TYPE_FILE), "retrieval\n")
        images, shards = _write_tars(folder, members(), len(annotations.entries), settings.samples_per_shard)
        if not images:
            raise InputError(f"none of the images of {source.csv_path} could be read; nothing written")
    return BenchmarkSetReport(os.path.basename(os.path.normpath(out_dir)), out_dir, "retrieval", images, shards,
                              captions=captions, failures=failures)
