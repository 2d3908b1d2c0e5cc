"""The training loader over tar shards: deterministic, resumable, fault-tolerant.

Training (``build_train_loader``): the rank's DataLoader workers each play one *role* of ``sampling.py``: role
``w`` makes the whole per-rank batch of every step ``g`` with ``g % R == w``, and the DataLoader hands the roles'
batches out round-robin, so the loader yields steps 0, 1, 2, ... forever. A role reads, per source, a chain of
pieces (contiguous runs of the rank's sample slice), shuffles each through a seeded buffer, and decodes only what
goes into its batches. Every random choice about a sample (caption, crop, AutoAugment) is seeded by the sample's
identity and pass, so it does not depend on the worker that happens to decode it.

Exact resume: each batch carries its role's cursor per source (piece number, samples consumed from the piece's
shuffled order). The loader keeps, per role, the cursor of the last batch the *caller* received, not what the
workers prefetched. A resumed role re-reads its piece from the start through the same seeded buffer, dropping the
consumed samples undecoded (for local tars they are not even read: only their headers are), and continues.

Faults: a sample that cannot be used (``reader.py``'s reasons) is skipped and counted, and the role takes the next
sample of its stream in its place, so batches always hold ``b`` samples and every rank always yields a batch per
step (no rank can hang the others). Counts reach the caller through ``error_counts()``; skipping is bounded:
the caller sums every rank's ``skip_report()`` and ``check_skips`` raises ``DataLossError`` (the same on every rank)
when one reason exceeds ``data.max_skip_fraction`` of the samples read within ``data.skip_window``.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from zvl_ds.base.errors import UserError
from zvl_ds.config import Config
from zvl_ds.data.decode import (_captions, _data_loader, _decode_image, _describe, _image_bytes, _json_meta,
                                _load_fields, _private_torch_rng, end_workers)
from zvl_ds.data.failures import (MAX_EXAMPLES, DataLossError, FailureCounter, SampleSkipped, SkipBudget, shards_named,
                                  sum_counts)
from zvl_ds.data.mixture import train_layouts
from zvl_ds.data.pieces import SourceStream
from zvl_ds.data.reader import FieldLoader, RawSample
from zvl_ds.data.sampling import MIXED, SHUFFLE, SamplingPlan, build_plan, derive_seed, name_key
from zvl_ds.data.sources import ResolvedDataset
from zvl_ds.data.teacher_store import StoredEmbeddingsReader
from zvl_ds.data.transforms import CaptionAugmenter, ImageTransform, caption_preparer, scaled_train_transforms, tokenize

STATE_FORMAT = 1
_VISIT_TAG = 0x7151


@dataclass
class TrainBatch:
    images: torch.Tensor  # uint8 [b, 3, S, S]
    input_ids: torch.Tensor  # long [b, L]
    attention_mask: torch.Tensor  # long [b, L]
    keys: List[str]
    dataset: str  # the source dataset; "mixed" in shuffle mode
    step: int  # the global optimizer step this batch is for (0-based)
    # with an online distillation teacher: the same captions in the teacher's tokens, long [b, L_teacher]
    teacher_input_ids: Optional[torch.Tensor] = None
    teacher_attention_mask: Optional[torch.Tensor] = None
    # with a stored teacher (distill.source: stored): its embeddings of each sample's image (evaluation view) and of
    # the caption picked for it, float16 [b, d_teacher]
    teacher_image_embeds: Optional[torch.Tensor] = None
    teacher_text_embeds: Optional[torch.Tensor] = None

    def pin_memory(self) -> "TrainBatch":
        names = ("teacher_input_ids", "teacher_attention_mask", "teacher_image_embeds", "teacher_text_embeds")
        teacher = {name: getattr(self, name).pin_memory() for name in names if getattr(self, name) is not None}
        return replace(self, images=self.images.pin_memory(), input_ids=self.input_ids.pin_memory(),
                       attention_mask=self.attention_mask.pin_memory(), **teacher)


@dataclass
class TeacherInputs:
    """What a distillation teacher reads beside the student (``zvl_ds.model.teacher``): its image side, which makes
    the loader hand over the crops at the larger of the two sides (each view is resized down on the device), and
    its tokenizer, which tokenizes every caption a second time."""

    image_size: int
    tokenizer: object
    max_length: int


@dataclass
class _BatchInfo:
    """What a worker reports with each training batch (plain values; crosses the process boundary)."""

    worker: int
    role: int
    step: int
    cursors: List[List[int]]  # per source: [piece, samples consumed from it]
    faults: Dict[str, int]  # this worker's cumulative skip counts
    examples: Dict[str, List[str]]  # and the first few examples of each reason (they name the shards)


@dataclass
class _TrainSpec:
    """Everything a worker needs (pickled to workers under the spawn start method)."""

    plan: SamplingPlan
    datasets: List[ResolvedDataset]
    transform: ImageTransform
    prepare_caption: Optional[Callable[[str], str]]  # transforms.caption_train; None: captions as written
    caption_aug: Optional[CaptionAugmenter]
    tokenizer: object
    max_length: int
    seed: int
    buffer_size: int
    max_warnings: int
    teacher: Optional[TeacherInputs] = None
    stored_teacher: bool = False  # attach the teacher's stored embeddings (distill.source: stored)


class LoaderTimeout(UserError, RuntimeError):
    """The loader workers gave no batch within ``data.loader_timeout``; the message names the step's shards."""


class _TrainStream(IterableDataset):
    def __init__(self, spec: _TrainSpec, start_step: int, cursors: List[List[List[int]]]):
        super().__init__()
        self.spec, self.start_step, self.cursors = spec, start_step, cursors

    def __iter__(self) -> Iterator[Tuple[TrainBatch, _BatchInfo]]:
        spec, plan = self.spec, self.spec.plan
        info = get_worker_info()
        worker = info.id if info is not None else 0
        step = self.start_step + worker
        role = step % plan.roles
        faults = FailureCounter(spec.max_warnings)
        fields = FieldLoader()
        stored = StoredEmbeddingsReader() if spec.stored_teacher else None
        streams = [SourceStream(plan, source, role, self.cursors[role][source], spec.datasets, spec.buffer_size,
                                faults) for source in range(len(plan.source_names))]
        try:
            while True:
                source = plan.source_of_step(step)
                with _private_torch_rng(spec.transform.uses_torch_rng):
                    batch = self._make_batch(streams[source], step, fields, faults, stored)
                yield batch, _BatchInfo(worker, role, step, [s.cursor for s in streams], faults.snapshot(),
                                        {reason: list(kept) for reason, kept in faults.examples.items()})
                step += plan.roles
        finally:
            fields.close()
            if stored is not None:
                stored.close()

    def _make_batch(self, stream: SourceStream, step: int, fields: FieldLoader, faults: FailureCounter,
                    stored: Optional[StoredEmbeddingsReader]) -> TrainBatch:
        spec = self.spec
        size = spec.transform.size
        count = spec.plan.batch_size
        images = torch.empty((count, 3, size, size), dtype=torch.uint8)
        captions: List[str] = []
        keys: List[str] = []
        embeddings: List[Tuple[torch.Tensor, torch.Tensor]] = []
        while len(keys) < count:
            raw = stream.next_raw()
            try:
                image, caption, picked, choices = self._decode(raw, fields)
                if stored is not None:  # the stored embedding of the caption picked here
                    embeddings.append(stored.lookup(raw.path, raw.position, raw.key, picked, choices))
            except SampleSkipped as skipped:
                faults.add(skipped.reason, str(skipped))
                continue
            stream.mark_good()
            images[len(keys)] = image
            captions.append(caption)
            keys.append(raw.key)
        input_ids, attention_mask = tokenize(spec.tokenizer, captions, spec.max_length)
        label = MIXED if spec.plan.mode == SHUFFLE else spec.plan.source_names[stream.source]
        batch = TrainBatch(images, input_ids, attention_mask, keys, label, step)
        if spec.teacher is not None:
            batch.teacher_input_ids, batch.teacher_attention_mask = tokenize(spec.teacher.tokenizer, captions,
                                                                             spec.teacher.max_length)
        if stored is not None:
            batch.teacher_image_embeds = torch.stack([image for image, _ in embeddings])
            batch.teacher_text_embeds = torch.stack([text for _, text in embeddings])
        return batch

    def _decode(self, raw: RawSample, fields: FieldLoader) -> Tuple[torch.Tensor, str, int, int]:
        """(image, caption, which of the sample's captions it is, how many there are)."""
        spec = self.spec
        where = _describe(raw)
        rng = random.Random(derive_seed(spec.seed, _VISIT_TAG, name_key(spec.datasets[raw.dataset].name),
                                        raw.pass_index, raw.shard, raw.position))
        data = _load_fields(fields, raw)
        image_bytes = _image_bytes(data, where)
        captions = _captions(_json_meta(data, where), data, where)
        picked = rng.randrange(len(captions))
        caption = captions[picked]
        if spec.prepare_caption is not None:
            caption = spec.prepare_caption(caption)
        if spec.caption_aug is not None:
            caption = spec.caption_aug(caption, rng)
        return _decode_image(spec.transform, image_bytes, rng, where), caption, picked, len(captions)



def _fingerprint(cfg: Config, plan: SamplingPlan) -> Dict[str, object]:
    fingerprint: Dict[str, object] = {
        "train_type": plan.mode, "seed": cfg.seed, "rank": plan.rank, "world_size": plan.world_size,
        "roles": plan.roles, "batch_size": plan.batch_size, "shuffle_buffer": cfg.data.shuffle_buffer,
        "datasets": [[d.name, d.size] for d in plan.datasets]}
    if any(weight != 1 for weight in plan.weights):  # unweighted: the state of a run from before weights existed
        fingerprint["weights"] = list(plan.weights)
    return fingerprint


class TrainLoader:
    """This rank's endless stream of ``TrainBatch``es, one per optimizer step, resumable exactly."""

    def __init__(self, cfg: Config, rank: int, world_size: int, tokenizer, teacher: Optional[TeacherInputs] = None):
        data = cfg.data
        if data.batch_size % world_size:
            raise ValueError(f"data.batch_size={data.batch_size} is not divisible by the world size {world_size}")
        self.cfg = cfg
        self.num_workers = data.num_workers
        datasets, layouts = train_layouts(data)
        self.plan = build_plan(data.train_type, layouts, cfg.seed, rank, world_size, max(1, data.num_workers),
                               data.batch_size // world_size)
        caption_aug = (CaptionAugmenter(cfg.transforms.caption_aug, tokenizer)
                       if cfg.transforms.caption_aug.enable else None)
        self._spec = _TrainSpec(self.plan, datasets, _train_transform(cfg, teacher),
                                caption_preparer(cfg.transforms.caption_train), caption_aug, tokenizer,
                                cfg.model.max_length, cfg.seed, data.shuffle_buffer, data.max_bad_sample_warnings,
                                teacher, cfg.distill.enabled and cfg.distill.source == "stored")
        self._fingerprint = _fingerprint(cfg, self.plan)
        self._step = 0
        self._cursors = [[[0, 0] for _ in self.plan.source_names] for _ in range(self.plan.roles)]
        self._faults_before: Dict[str, int] = {}  # from DataLoaders already closed
        self._faults_by_worker: Dict[int, Dict[str, int]] = {}
        self._examples: Dict[str, List[str]] = {}  # the first few skip examples per reason, from any worker
        self._delivered = 0  # samples this rank delivered since the loader was built (or its state loaded)
        self._skip_budget = SkipBudget(data.max_skip_fraction, data.skip_window)
        self._iterator = None

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def image_size(self) -> int:
        return self._spec.transform.size

    def state_dict(self) -> Dict[str, object]:
        return {"format": STATE_FORMAT, "step": self._step, "cursors": [[list(c) for c in role]
                                                                         for role in self._cursors],
                "fingerprint": dict(self._fingerprint)}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}")
        saved = state.get("fingerprint", {})
        # a key on one side only (`weights`, set when a weight is not 1) is a difference too
        keys = list(self._fingerprint) + [key for key in saved if key not in self._fingerprint]
        differences = [f"{key}: saved {saved.get(key)!r}, now {self._fingerprint.get(key)!r}"
                       for key in keys if _plain(saved.get(key)) != _plain(self._fingerprint.get(key))]
        if differences:
            raise ValueError("cannot resume the data stream exactly; the loader was saved with different "
                             "settings (" + "; ".join(differences) + ")")
        cursors = state["cursors"]
        if len(cursors) != self.plan.roles or any(len(role) != len(self.plan.source_names) for role in cursors):
            raise ValueError("loader state: cursor table does not match the roles and sources")
        self._close_iterator()
        self._step = int(state["step"])
        self._cursors = [[[int(c[0]), int(c[1])] for c in role] for role in cursors]

    def error_counts(self) -> Dict[str, int]:
        return sum_counts([self._faults_before, *self._faults_by_worker.values()])

    def skip_report(self) -> Dict[str, object]:
        """This rank's samples delivered, skips by reason and skip examples (what ``check_skips`` sums over ranks)."""
        return {"delivered": self._delivered, "counts": self.error_counts(),
                "examples": {reason: list(kept) for reason, kept in self._examples.items()}}

    def check_skips(self, reports: List[Dict[str, object]]) -> Dict[str, int]:
        """The skip counts summed over the ranks' ``skip_report``s; raises ``DataLossError`` when one reason is above
        ``data.max_skip_fraction`` of the window. Given the same reports, every rank decides the same."""
        counts = sum_counts(report["counts"] for report in reports)  # type: ignore[misc]
        delivered = sum(int(report["delivered"]) for report in reports)  # type: ignore[call-overload]
        over = self._skip_budget.over_budget(delivered, counts)
        if over:
            raise DataLossError(self._data_loss_message(over, reports))
        return counts

    def _data_loss_message(self, over, reports: List[Dict[str, object]]) -> str:
        data = self.cfg.data
        lines = []
        for reason, skipped, read in over:
            examples = [e for report in reports for e in report["examples"].get(reason, [])]  # type: ignore[union-attr]
            named = shards_named(examples, {d.name: d.shards for d in self._spec.datasets})
            where = "; ".join(f"dataset {name!r}: {', '.join(shards[:MAX_EXAMPLES])}"
                              + (" ..." if len(shards) > MAX_EXAMPLES else "") for name, shards in named.items())
            lines.append(f"[{reason}] {skipped} of the last {read} samples read were skipped "
                         f"({100.0 * skipped / max(read, 1):.1f}%); {where or 'no shard named'}; e.g. "
                         f"{examples[0] if examples else '-'}")
        return (f"data: too many samples skipped, above data.max_skip_fraction={data.max_skip_fraction} of a "
                f"window of data.skip_window={data.skip_window} samples; training stops rather than go on with "
                "part of its data (a checkpoint of the last good step is saved first; fix the shards, or raise "
                "data.max_skip_fraction, and resume):\n  " + "\n  ".join(lines))

    def __iter__(self) -> Iterator[TrainBatch]:
        self._close_iterator()
        stream = _TrainStream(self._spec, self._step, [[list(c) for c in role] for role in self._cursors])
        loader = _data_loader(stream, self.num_workers, self.cfg.data.loader_timeout)
        iterator = iter(loader)
        self._iterator = iterator
        return self._batches(iterator)

    def _batches(self, iterator) -> Iterator[TrainBatch]:
        while True:
            try:
                batch, info = next(iterator)
            except StopIteration:
                return
            except RuntimeError as error:  # torch's "DataLoader timed out after N seconds" says nothing of the data
                if "DataLoader timed out" not in str(error):
                    raise
                raise LoaderTimeout(self._timeout_message()) from error
            if info.step != self._step:  # would mean the round-robin assumption broke: never yield a wrong step
                raise RuntimeError(f"data loader delivered step {info.step}, expected {self._step}")
            self._cursors[info.role] = [list(c) for c in info.cursors]
            self._faults_by_worker[info.worker] = info.faults
            for reason, examples in info.examples.items():
                kept = self._examples.setdefault(reason, [])
                for example in examples:
                    if example not in kept and len(kept) < MAX_EXAMPLES:
                        kept.append(example)
            self._delivered += self.plan.batch_size
            self._step += 1
            yield batch

    def _timeout_message(self) -> str:
        names = ([dataset.name for dataset in self._spec.datasets] if self.plan.mode == SHUFFLE
                 else [self.plan.source_names[self.plan.source_of_step(self._step)]])
        shards = list(dict.fromkeys(shard for dataset in self._spec.datasets if dataset.name in names
                                    for shard in dataset.shards))  # a Parquet file names each of its row groups
        listed = ", ".join(shards[:4]) + (f" and {len(shards) - 4} more" if len(shards) > 4 else "")
        return (f"data.loader_timeout: the loader workers produced no batch for step {self._step} within "
                f"{self.cfg.data.loader_timeout:g} s; a shard read may be stalled (a hung network filesystem, a "
                f"pipe or device instead of a file). The step reads dataset(s) {', '.join(names)}: shards {listed}")

    def _close_iterator(self) -> None:
        if self._iterator is not None:
            end_workers(self._iterator)
            self._iterator = None
        self._faults_before = self.error_counts()
        self._faults_by_worker = {}

    def close(self) -> None:
        self._close_iterator()


def _train_transform(cfg: Config, teacher: Optional[TeacherInputs]) -> ImageTransform:
    """The training transform; its crops at the teacher's side when a teacher reads larger images than the student."""
    transform = ImageTransform(cfg.transforms.train_transforms, cfg.transforms)
    if teacher is None or teacher.image_size <= transform.size:
        return transform
    return ImageTransform(cfg.transforms.train_transforms, scaled_train_transforms(cfg.transforms, teacher.image_size))


def _plain(value):
    return json.loads(json.dumps(value))


def build_train_loader(cfg: Config, rank: int, world_size: int, tokenizer,
                       teacher: Optional[TeacherInputs] = None) -> TrainLoader:
    return TrainLoader(cfg, rank, world_size, tokenizer, teacher)
