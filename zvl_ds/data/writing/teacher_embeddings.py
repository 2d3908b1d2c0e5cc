"""Reinforcing shards: a teacher's embeddings of every sample written beside each shard (``python -m
zvl_ds.reinforce_shards``; the file format is ``data/teacher_store.py``).

Each shard is read in its sample order and decoded as the teacher's evaluation decodes it (``TeacherView``: its
validation transforms, caption preparation, tokenizer and caption length), in DataLoader workers, one shard per
item; the caller's ``encoder`` embeds the images and every caption in batches, and the shard's file is written
atomically. A shard is a unit: it is written whole or not at all, so a run stopped at any point resumes
(``resume``) by redoing only the shards without a complete file of the same teacher.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Literal, Optional, Protocol, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zvl_ds.base.errors import UserError
from zvl_ds.data.decode import _captions, _decode_image, _describe, _image_bytes, _json_meta, _load_fields
from zvl_ds.data.failures import FailureCounter, SampleSkipped
from zvl_ds.data.reader import FieldLoader, read_segment
from zvl_ds.data.teacher_store import embeddings_path, header_problem, write_embeddings
from zvl_ds.data.transforms import ImageTransform, tokenize

ExistingPolicy = Literal["refuse", "resume", "overwrite"]
_ALL = 1 << 62  # read a shard to its end


@dataclass(frozen=True)
class TeacherView:
    """How the teacher's evaluation turns a sample into inputs (picklable: it travels to the loader workers)."""

    transform: ImageTransform  # its validation transforms
    prepare_caption: Optional[Callable[[str], str]]  # its transforms.caption_eval; None: as written
    tokenizer: object
    max_length: int


@dataclass(frozen=True)
class ShardJob:
    dataset: str
    path: str


@dataclass
class DecodedShard:
    """One shard as the teacher's evaluation sees it. ``images`` holds the readable samples only (``readable``: their
    positions); each sample's captions follow one another in ``input_ids``."""

    job: ShardJob
    keys: List[str]
    readable: List[int]
    images: torch.Tensor  # uint8 [k, 3, S, S]
    caption_counts: List[int]  # per sample; 0 for a sample the teacher could not read
    input_ids: torch.Tensor  # long [m, L]
    attention_mask: torch.Tensor
    missing: Dict[str, str]  # key -> why it could not be read
    fault: Optional[str]  # the shard itself could not be read to its end (nothing is written for it)


class _Faults(FailureCounter):
    """Shards are read to their end, so a 'short' shard is not a fault; anything else is."""

    def add(self, reason: str, example: str, count: int = 1) -> None:
        if reason != "short_shard":
            super().add(reason, example, count)


def decode_shard(job: ShardJob, index: int, view: TeacherView) -> DecodedShard:
    """Every sample of ``job``'s shard in order, decoded in the teacher's evaluation view."""
    faults, fields = _Faults(), FieldLoader()
    keys: List[str] = []
    readable: List[int] = []
    images: List[torch.Tensor] = []
    counts: List[int] = []
    captions: List[str] = []
    missing: Dict[str, str] = {}
    try:
        for raw in read_segment(job.path, index, 0, _ALL, faults):
            keys.append(raw.key)
            where = _describe(raw)
            try:
                data = _load_fields(fields, raw)
                texts = _captions(_json_meta(data, where), data, where)  # the list the training loader picks from
                image = _decode_image(view.transform, _image_bytes(data, where), random.Random(0), where)
            except SampleSkipped as skipped:
                missing[raw.key] = f"{skipped.reason}: {skipped}"
                counts.append(0)
                continue
            readable.append(len(keys) - 1)
            images.append(image)
            counts.append(len(texts))
            captions.extend(view.prepare_caption(text) if view.prepare_caption else text for text in texts)
    finally:
        fields.close()
    fault = "; ".join(f"{reason}: {examples[0]}" for reason, examples in faults.examples.items()) or None
    size = view.transform.size
    stacked = torch.stack(images) if images else torch.empty((0, 3, size, size), dtype=torch.uint8)
    ids, mask = tokenize(view.tokenizer, captions, view.max_length) if captions else (
        torch.empty((0, view.max_length), dtype=torch.long), torch.empty((0, view.max_length), dtype=torch.long))
    return DecodedShard(job, keys, readable, stacked, counts, ids, mask, missing, fault)


class _DecodedShards(IterableDataset):
    """Worker w of W decodes shards w, w + W, ... (each item is a whole shard; their order does not matter)."""

    def __init__(self, jobs: Sequence[Tuple[int, ShardJob]], view: TeacherView):
        super().__init__()
        self.jobs, self.view = list(jobs), view

    def __iter__(self) -> Iterator[DecodedShard]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, job in self.jobs[worker::workers]:
            yield decode_shard(job, index, self.view)


def _keep(item):
    return item


class TeacherEncoder(Protocol):
    """What embeds a decoded shard: L2-normalised float embeddings [n, d] of uint8 images and of token ids."""

    def images(self, images_uint8: torch.Tensor) -> torch.Tensor: ...

    def texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


def _in_batches(function, batch_size: int, *tensors: torch.Tensor) -> torch.Tensor:
    parts = [function(*(t[start:start + batch_size] for t in tensors)).float().cpu()
             for start in range(0, tensors[0].shape[0], batch_size)]
    return torch.cat(parts)


def embed_shard(decoded: DecodedShard, encoder: TeacherEncoder, batch_size: int, width: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image [n, d], text [m, d]) of a decoded shard; the rows of samples the teacher could not read are zeros."""
    image = torch.zeros((len(decoded.keys), width))
    if decoded.readable:
        image[decoded.readable] = _in_batches(encoder.images, batch_size, decoded.images)
    text = (_in_batches(encoder.texts, batch_size, decoded.input_ids, decoded.attention_mask)
            if decoded.input_ids.shape[0] else torch.zeros((0, width)))
    return image, text


@dataclass
class ReinforceReport:
    shards: int = 0
    written: int = 0
    kept: int = 0  # complete from an earlier run (resume)
    samples: int = 0
    captions: int = 0
    missing: int = 0  # samples the teacher could not read (no embeddings; the training loader skips them)
    failed: List[str] = field(default_factory=list)  # shards that could not be read to their end: nothing written
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"reinforce_shards: {self.shards} shard(s): {self.written} written, {self.kept} kept from before, "
                 f"{len(self.failed)} failed; {self.samples} samples and {self.captions} captions embedded"
                 + (f", {self.missing} samples unreadable (no embeddings)" if self.missing else "")
                 + f"; {self.seconds:.1f}s"]
        lines.extend(f"    failed: {failure}" for failure in self.failed)
        return "\n".join(lines)


def pending_jobs(jobs: Sequence[ShardJob], identity: Dict[str, str], policy: ExistingPolicy
                 ) -> Tuple[List[ShardJob], int]:
    """(the shards to embed, how many are kept) under ``policy``: ``refuse`` stops when any shard has a file
    already, ``resume`` keeps the files of the same teacher and shard, ``overwrite`` redoes everything."""
    existing = [job for job in jobs if os.path.exists(embeddings_path(job.path))]
    if existing and policy == "refuse":
        raise UserError(f"{embeddings_path(existing[0].path)} exists ({len(existing)} of the {len(jobs)} shards have "
                        "stored embeddings): pass --resume to keep the complete ones of this teacher and write the "
                        "rest, or --overwrite to write them all again")
    if policy != "resume":
        return list(jobs), 0
    pending = [job for job in jobs if header_problem(job.path, identity) is not None]
    return pending, len(jobs) - len(pending)


def reinforce(jobs: Sequence[ShardJob], view: TeacherView, encoder: TeacherEncoder, identity: Dict[str, str],
              scale: float, bias: Optional[float], width: int, policy: ExistingPolicy = "refuse", workers: int = 1,
              batch_size: int = 256, on_shard: Optional[Callable[[DecodedShard], None]] = None) -> ReinforceReport:
    """Write the teacher's embeddings beside each shard of ``jobs`` (see the module docstring)."""
    start = time.time()
    report = ReinforceReport(shards=len(jobs))
    pending, report.kept = pending_jobs(jobs, identity, policy)
    index_of = {job: index for index, job in enumerate(jobs)}
    dataset = _DecodedShards([(index_of[job], job) for job in pending], view)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(workers, len(pending)), collate_fn=_keep,
                        generator=torch.Generator().manual_seed(0))
    for decoded in loader:
        if decoded.fault is not None:
            report.failed.append(f"{decoded.job.path}: {decoded.fault}")
            continue
        image, text = embed_shard(decoded, encoder, batch_size, width)
        write_embeddings(decoded.job.path, image, text, decoded.caption_counts, decoded.keys, decoded.missing,
                         identity, scale, bias)
        report.written += 1
        report.samples += len(decoded.readable)
        report.captions += int(text.shape[0])
        report.missing += len(decoded.missing)
        if on_shard is not None:
            on_shard(decoded)
    report.seconds = time.time() - start
    return report
