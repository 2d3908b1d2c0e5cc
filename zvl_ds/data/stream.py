"""Training and validation loaders over tar shards: deterministic, resumable, fault-tolerant.

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
step (no rank can hang the others). Counts reach the caller through ``error_counts()``.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zvl_ds.config import Config
from zvl_ds.data import failures
from zvl_ds.data import reader
from zvl_ds.data.failures import FailureCounter, SampleSkipped, sum_counts
from zvl_ds.data.reader import FieldLoader, RawSample, read_segment
from zvl_ds.data.sampling import (MIXED, SHUFFLE, DatasetLayout, Part, Piece, SamplingPlan, build_plan,
                                  derive_seed, name_key, validation_part)
from zvl_ds.data.sources import (DataSourceError, ResolvedDataset, require_sizes, resolve_dataset,
                                  resolve_train_datasets)
from zvl_ds.data.transforms import (CaptionAugmenter, ImageTransform, TooManyPixels, caption_preparer, to_uint8_chw,
                                    tokenize)

STATE_FORMAT = 1
_VISIT_TAG, _VALID_TAG = 0x7151, 0x7152


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainBatch:
    images: torch.Tensor  # uint8 [b, 3, S, S]
    input_ids: torch.Tensor  # long [b, L]
    attention_mask: torch.Tensor  # long [b, L]
    keys: List[str]
    dataset: str  # the source dataset; "mixed" in shuffle mode
    step: int  # the global optimizer step this batch is for (0-based)

    def pin_memory(self) -> "TrainBatch":
        return replace(self, images=self.images.pin_memory(), input_ids=self.input_ids.pin_memory(),
                       attention_mask=self.attention_mask.pin_memory())


@dataclass
class ValidBatch:
    images: torch.Tensor  # uint8 [n, 3, S, S]
    image_ids: torch.Tensor  # long [n]
    input_ids: torch.Tensor  # long [m, L]
    attention_mask: torch.Tensor  # long [m, L]
    caption_ids: torch.Tensor  # long [m]
    caption_image_ids: torch.Tensor  # long [m]: the image id of each caption
    keys: List[str]

    def pin_memory(self) -> "ValidBatch":
        return replace(self, images=self.images.pin_memory(), input_ids=self.input_ids.pin_memory(),
                       attention_mask=self.attention_mask.pin_memory())


@dataclass
class _BatchInfo:
    """What a worker reports with each training batch (plain values; crosses the process boundary)."""

    worker: int
    role: int
    step: int
    cursors: List[List[int]]  # per source: [piece, samples consumed from it]
    faults: Dict[str, int]  # this worker's cumulative skip counts


def _keep(item):
    return item


# --------------------------------------------------------------------------------------------------
# Sample decoding
# --------------------------------------------------------------------------------------------------


def _load_fields(loader: FieldLoader, raw: RawSample) -> Dict[str, bytes]:
    try:
        return loader.load(raw)
    except OSError as error:
        raise SampleSkipped(failures.UNREADABLE_SHARD, f"{raw.path}: {error}") from None
    except Exception as error:
        if reader.is_truncation(error):
            raise SampleSkipped(failures.TRUNCATED_SHARD, str(error)) from None
        raise


def _image_bytes(fields: Dict[str, bytes], where: str) -> bytes:
    for ext in reader.IMAGE_EXTENSIONS:
        if ext in fields:
            return fields[ext]
    raise SampleSkipped(failures.MISSING_IMAGE, f"{where}: no {'/'.join(reader.IMAGE_EXTENSIONS)} member")


def _json_meta(fields: Dict[str, bytes], where: str) -> Optional[dict]:
    if "json" not in fields:
        return None
    try:
        meta = json.loads(fields["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise SampleSkipped(failures.BAD_JSON, f"{where}: {error}") from None
    except RecursionError:  # nesting deeper than the parser's stack
        raise SampleSkipped(failures.BAD_JSON, f"{where}: json nested too deeply") from None
    if not isinstance(meta, dict):
        raise SampleSkipped(failures.BAD_JSON, f"{where}: json is a {type(meta).__name__}, not an object")
    return meta


def _captions(meta: Optional[dict], fields: Dict[str, bytes], where: str) -> List[str]:
    """The json ``captions`` (or img2dataset's single ``caption``), else the ``.txt``; empty ones dropped."""
    captions: List[str] = []
    if meta is not None:
        value = meta.get("captions")
        if value is not None and not (isinstance(value, list) and all(isinstance(c, str) for c in value)):
            raise SampleSkipped(failures.BAD_JSON, f"{where}: json 'captions' is not a list of strings")
        captions = [c for c in (value or []) if c.strip()]
        if not captions and isinstance(meta.get("caption"), str) and meta["caption"].strip():
            captions = [meta["caption"]]
    if not captions and "txt" in fields:
        try:
            text = fields["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        if text:
            captions = [text]
    if not captions:
        raise SampleSkipped(failures.MISSING_CAPTION, f"{where}: no caption in .json or .txt")
    return captions


def _decode_image(transform: ImageTransform, data: bytes, rng: random.Random, where: str) -> torch.Tensor:
    try:
        return to_uint8_chw(transform(data, rng))
    except TooManyPixels as error:
        raise SampleSkipped(failures.TOO_MANY_PIXELS, f"{where}: {error}") from None
    except Exception as error:  # Pillow raises many types on bad bytes; every one means "skip this sample"
        raise SampleSkipped(failures.CORRUPT_IMAGE, f"{where}: {type(error).__name__}: {error}") from None


def _is_int64(value: object) -> bool:
    """Ids become int64 tensors: larger ones (or bools, floats) cannot be collated."""
    return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63


def _describe(raw: RawSample) -> str:
    return f"{raw.path} sample {raw.key!r}"


# --------------------------------------------------------------------------------------------------
# Reading pieces
# --------------------------------------------------------------------------------------------------


def buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Webdataset-style shuffle: hold ``size`` items, emit a random one as each new item arrives."""
    held: list = []
    for item in items:
        if len(held) < size:
            held.append(item)
            continue
        index = rng.randrange(size)
        out, held[index] = held[index], item
        yield out
    rng.shuffle(held)
    yield from held


def _read_part(part: Part, dataset: ResolvedDataset, faults: FailureCounter) -> Iterator[RawSample]:
    for segment in part.segments:
        for raw in read_segment(dataset.shards[segment.shard], segment.shard, segment.start, segment.stop, faults):
            raw.dataset, raw.pass_index = part.dataset, part.pass_index
            yield raw


def read_piece(piece: Piece, datasets: Sequence[ResolvedDataset], buffer_size: int,
               faults: FailureCounter) -> Iterator[RawSample]:
    """A piece's raw samples: its parts read in order (or interleaved by its pattern), then buffer-shuffled."""
    streams = [_read_part(part, datasets[part.dataset], faults) for part in piece.parts]
    if piece.pattern is None:
        ordered: Iterator[RawSample] = (raw for stream in streams for raw in stream)
    else:
        ordered = (raw for raw in (next(streams[i], None) for i in piece.pattern.tolist()) if raw is not None)
    return buffer_shuffle(ordered, max(1, buffer_size), random.Random(piece.shuffle_seed))


class SourceStream:
    """One role's endless stream of raw samples from one source, with its resumable cursor."""

    def __init__(self, plan: SamplingPlan, source: int, role: int, cursor: Sequence[int],
                 datasets: Sequence[ResolvedDataset], buffer_size: int, faults: FailureCounter):
        self.plan, self.source, self.role = plan, source, role
        self.piece_index, self.offset = int(cursor[0]), int(cursor[1])
        self.datasets, self.buffer_size, self.faults = datasets, buffer_size, faults
        self._samples: Optional[Iterator[RawSample]] = None
        self._good_in_piece = False
        self._barren_pieces = 0  # consecutive pieces that gave no usable sample

    @property
    def cursor(self) -> List[int]:
        return [self.piece_index, self.offset]

    def mark_good(self) -> None:
        self._good_in_piece = True
        self._barren_pieces = 0

    def next_raw(self) -> RawSample:
        while True:
            if self._samples is None:
                self._samples = read_piece(self.plan.piece(self.source, self.role, self.piece_index),
                                           self.datasets, self.buffer_size, self.faults)
                for _ in range(self.offset):  # resume: drop what was consumed, undecoded
                    if next(self._samples, None) is None:
                        break
            raw = next(self._samples, None)
            if raw is not None:
                self.offset += 1
                return raw
            self._next_piece()

    def _next_piece(self) -> None:
        self._barren_pieces = 0 if self._good_in_piece else self._barren_pieces + 1
        if self._barren_pieces > 2 * self.plan.roles + 2:
            name = self.plan.source_names[self.source]
            raise RuntimeError(f"data source {name!r}: no usable sample in {self._barren_pieces} consecutive "
                               f"epochs/passes of rank {self.plan.rank} role {self.role}; skipped so far: "
                               f"{self.faults.snapshot()}")
        self.piece_index, self.offset = self.piece_index + 1, 0
        self._samples, self._good_in_piece = None, False


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


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
        streams = [SourceStream(plan, source, role, self.cursors[role][source], spec.datasets, spec.buffer_size,
                                faults) for source in range(len(plan.source_names))]
        try:
            while True:
                source = plan.source_of_step(step)
                with _private_torch_rng(spec.transform.uses_torch_rng):
                    batch = self._make_batch(streams[source], step, fields, faults)
                yield batch, _BatchInfo(worker, role, step, [s.cursor for s in streams], faults.snapshot())
                step += plan.roles
        finally:
            fields.close()

    def _make_batch(self, stream: SourceStream, step: int, fields: FieldLoader, faults: FailureCounter) -> TrainBatch:
        spec = self.spec
        size = spec.transform.size
        count = spec.plan.batch_size
        images = torch.empty((count, 3, size, size), dtype=torch.uint8)
        captions: List[str] = []
        keys: List[str] = []
        while len(keys) < count:
            raw = stream.next_raw()
            try:
                image, caption = self._decode(raw, fields)
            except SampleSkipped as skipped:
                faults.add(skipped.reason, str(skipped))
                continue
            stream.mark_good()
            images[len(keys)] = image
            captions.append(caption)
            keys.append(raw.key)
        input_ids, attention_mask = tokenize(spec.tokenizer, captions, spec.max_length)
        label = MIXED if spec.plan.mode == SHUFFLE else spec.plan.source_names[stream.source]
        return TrainBatch(images, input_ids, attention_mask, keys, label, step)

    def _decode(self, raw: RawSample, fields: FieldLoader) -> Tuple[torch.Tensor, str]:
        spec = self.spec
        where = _describe(raw)
        rng = random.Random(derive_seed(spec.seed, _VISIT_TAG, name_key(spec.datasets[raw.dataset].name),
                                        raw.pass_index, raw.shard, raw.position))
        data = _load_fields(fields, raw)
        image_bytes = _image_bytes(data, where)
        captions = _captions(_json_meta(data, where), data, where)
        caption = captions[rng.randrange(len(captions))]
        if spec.prepare_caption is not None:
            caption = spec.prepare_caption(caption)
        if spec.caption_aug is not None:
            caption = spec.caption_aug(caption, rng)
        return _decode_image(spec.transform, image_bytes, rng, where), caption


@contextlib.contextmanager
def _private_torch_rng(enabled: bool):
    """AutoAugment seeds torch's global generator per sample; keep that from leaking into the caller's process."""
    if not enabled:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        yield


def _fingerprint(cfg: Config, plan: SamplingPlan) -> Dict[str, object]:
    return {"train_type": plan.mode, "seed": cfg.seed, "rank": plan.rank, "world_size": plan.world_size,
            "roles": plan.roles, "batch_size": plan.batch_size, "shuffle_buffer": cfg.data.shuffle_buffer,
            "datasets": [[d.name, d.size] for d in plan.datasets]}


class TrainLoader:
    """This rank's endless stream of ``TrainBatch``es, one per optimizer step, resumable exactly."""

    def __init__(self, cfg: Config, rank: int, world_size: int, tokenizer):
        data = cfg.data
        if data.batch_size % world_size:
            raise ValueError(f"data.batch_size={data.batch_size} is not divisible by the world size {world_size}")
        self.cfg = cfg
        self.num_workers = data.num_workers
        datasets = resolve_train_datasets(data)
        layouts = [DatasetLayout(d.name, require_sizes(d, f"training (data.train_type={data.train_type})"))
                   for d in datasets]
        self.plan = build_plan(data.train_type, layouts, cfg.seed, rank, world_size, max(1, data.num_workers),
                               data.batch_size // world_size)
        caption_aug = (CaptionAugmenter(cfg.transforms.caption_aug, tokenizer)
                       if cfg.transforms.caption_aug.enable else None)
        self._spec = _TrainSpec(self.plan, datasets, ImageTransform(cfg.transforms.train_transforms, cfg.transforms),
                                caption_preparer(cfg.transforms.caption_train), caption_aug, tokenizer,
                                cfg.model.max_length, cfg.seed, data.shuffle_buffer, data.max_bad_sample_warnings)
        self._fingerprint = _fingerprint(cfg, self.plan)
        self._step = 0
        self._cursors = [[[0, 0] for _ in self.plan.source_names] for _ in range(self.plan.roles)]
        self._faults_before: Dict[str, int] = {}  # from DataLoaders already closed
        self._faults_by_worker: Dict[int, Dict[str, int]] = {}
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
        differences = [f"{key}: saved {saved.get(key)!r}, now {value!r}"
                       for key, value in self._fingerprint.items() if _plain(saved.get(key)) != _plain(value)]
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

    def __iter__(self) -> Iterator[TrainBatch]:
        self._close_iterator()
        stream = _TrainStream(self._spec, self._step, [[list(c) for c in role] for role in self._cursors])
        loader = _data_loader(stream, self.num_workers, self.cfg.data.loader_timeout)
        iterator = iter(loader)
        self._iterator = iterator
        return self._batches(iterator)

    def _batches(self, iterator) -> Iterator[TrainBatch]:
        for batch, info in iterator:
            if info.step != self._step:  # would mean the round-robin assumption broke: never yield a wrong step
                raise RuntimeError(f"data loader delivered step {info.step}, expected {self._step}")
            self._cursors[info.role] = [list(c) for c in info.cursors]
            self._faults_by_worker[info.worker] = info.faults
            self._step += 1
            yield batch

    def _close_iterator(self) -> None:
        if self._iterator is not None:
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None
        self._faults_before = self.error_counts()
        self._faults_by_worker = {}

    def close(self) -> None:
        self._close_iterator()


def _plain(value):
    return json.loads(json.dumps(value))


def _data_loader(dataset: IterableDataset, num_workers: int, timeout: float) -> DataLoader:
    if num_workers > 0:
        # Workers are forked after the tokenizer has been used here; its thread pool must not be inherited.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A private generator: the DataLoader otherwise draws its workers' base seed from the caller's global torch
    # generator (the workers seed everything themselves), which would shift the trainer's random stream.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_keep,
                      pin_memory=torch.cuda.is_available(), timeout=timeout if num_workers > 0 else 0,
                      prefetch_factor=2 if num_workers > 0 else None, generator=torch.Generator().manual_seed(0))


def build_train_loader(cfg: Config, rank: int, world_size: int, tokenizer) -> TrainLoader:
    return TrainLoader(cfg, rank, world_size, tokenizer)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@dataclass
class _ValidSpec:
    dataset: ResolvedDataset
    rank: int
    world_size: int
    roles: int
    batch_images: int
    transform: ImageTransform
    prepare_caption: Optional[Callable[[str], str]]  # transforms.caption_eval; None: captions as written
    tokenizer: object
    max_length: int
    seed: int
    max_warnings: int
    json_image_ids: bool  # the dataset's samples carry a json image_id (else: their position is the id)


@dataclass
class _ValidSample:
    image: torch.Tensor
    image_id: int
    captions: List[str]
    caption_ids: List[int]
    key: str


class _ValidStream(IterableDataset):
    def __init__(self, spec: _ValidSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[Tuple[ValidBatch, Dict[str, int], int]]:
        spec = self.spec
        info = get_worker_info()
        role = info.id if info is not None else 0
        faults = FailureCounter(spec.max_warnings)
        fields = FieldLoader()
        pending: List[_ValidSample] = []
        try:
            for index, raw in self._raw_samples(role, faults):
                with _private_torch_rng(spec.transform.uses_torch_rng):
                    try:
                        pending.append(self._decode(raw, index, fields))
                    except SampleSkipped as skipped:
                        faults.add(skipped.reason, str(skipped))
                        continue
                if len(pending) == spec.batch_images:
                    yield self._collate(pending), faults.snapshot(), role
                    pending = []
            if pending:
                yield self._collate(pending), faults.snapshot(), role
            else:
                yield None, faults.snapshot(), role  # no batch, but the counts must reach the caller
        finally:
            fields.close()

    def _raw_samples(self, role: int, faults: FailureCounter) -> Iterator[Tuple[int, RawSample]]:
        """(dataset-wide sample index, raw sample) of this role's share: contiguous when sizes are known, else
        every ``world_size * roles``-th sample of a full read."""
        spec = self.spec
        sizes = spec.dataset.shard_sizes
        if sizes is not None:
            first_index = [sum(sizes[:i]) for i in range(len(sizes))]
            part = validation_part(sizes, spec.rank, spec.world_size, role, spec.roles)
            for raw in _read_part(part, spec.dataset, faults):
                yield first_index[raw.shard] + raw.position, raw
            return
        stride, mine = spec.world_size * spec.roles, spec.rank * spec.roles + role
        index = 0
        for shard_index, path in enumerate(spec.dataset.shards):
            for raw in read_segment(path, shard_index, 0, 1 << 62, _Quiet(faults)):  # type: ignore[arg-type]
                if index % stride == mine:
                    yield index, raw
                index += 1

    def _decode(self, raw: RawSample, index: int, fields: FieldLoader) -> _ValidSample:
        spec = self.spec
        where = _describe(raw)
        data = _load_fields(fields, raw)
        image_bytes = _image_bytes(data, where)
        meta = _json_meta(data, where)
        captions = _captions(meta, data, where)
        if spec.prepare_caption is not None:
            captions = [spec.prepare_caption(caption) for caption in captions]
        if (meta is not None and "image_id" in meta) != spec.json_image_ids:
            raise DataSourceError(_mixed_ids_message(spec.dataset.name, where, spec.json_image_ids))
        image_id = meta.get("image_id", index) if meta is not None else index
        caption_ids = meta.get("caption_ids") if meta is not None else None
        if not _is_int64(image_id):
            raise SampleSkipped(failures.BAD_JSON,
                                f"{where}: json 'image_id' is not a 64-bit integer: {image_id!r:.40}")
        if caption_ids is None:
            caption_ids = [image_id] if len(captions) == 1 else [-1] * len(captions)
        elif (not isinstance(caption_ids, list) or len(caption_ids) != len(captions)
              or not all(_is_int64(c) for c in caption_ids)):
            raise SampleSkipped(failures.BAD_JSON, f"{where}: json 'caption_ids' does not match 'captions' or holds "
                                "an id that is not a 64-bit integer")
        rng = random.Random(derive_seed(spec.seed, _VALID_TAG, index))
        image = _decode_image(spec.transform, image_bytes, rng, where)
        return _ValidSample(image, image_id, captions, list(caption_ids), raw.key)

    def _collate(self, samples: List[_ValidSample]) -> ValidBatch:
        captions = [c for s in samples for c in s.captions]
        input_ids, attention_mask = tokenize(self.spec.tokenizer, captions, self.spec.max_length)
        return ValidBatch(
            images=torch.stack([s.image for s in samples]),
            image_ids=torch.tensor([s.image_id for s in samples], dtype=torch.long),
            input_ids=input_ids, attention_mask=attention_mask,
            caption_ids=torch.tensor([c for s in samples for c in s.caption_ids], dtype=torch.long),
            caption_image_ids=torch.tensor([s.image_id for s in samples for _ in s.captions], dtype=torch.long),
            keys=[s.key for s in samples])


class _Quiet:
    """With sizes unknown a shard is read to its end: its 'missing' samples are not a fault, and a bad shard
    counts once (how many samples it held is unknown)."""

    def __init__(self, inner: FailureCounter):
        self.inner = inner

    def add(self, reason: str, message: str, count: int = 1) -> None:
        if reason == failures.SHORT_SHARD:
            return
        if reason in (failures.UNREADABLE_SHARD, failures.TRUNCATED_SHARD):
            count = 1
        self.inner.add(reason, message, count)


_ID_PROBE_SAMPLES = 100  # samples read at most to find one with readable metadata
_PROBE_MAX_WARNINGS = 20  # the probe runs before the loader, with the default warning limit


def dataset_has_json_image_ids(dataset: ResolvedDataset) -> bool:
    """Whether the dataset's samples carry a json ``image_id``, judged by its first sample with readable metadata.

    Samples without one get their position in the dataset as id, which can equal a real id of another sample
    and merge the two in retrieval metrics; so a dataset must be all one kind. Every rank judges from the same
    first sample, so all ranks agree without communicating."""
    fields = FieldLoader()
    faults = _Quiet(FailureCounter(_PROBE_MAX_WARNINGS))
    seen = 0
    try:
        for shard_index, path in enumerate(dataset.shards):
            for raw in read_segment(path, shard_index, 0, 1 << 62, faults):  # type: ignore[arg-type]
                seen += 1
                try:
                    meta = _json_meta(_load_fields(fields, raw), _describe(raw))
                except SampleSkipped:
                    if seen >= _ID_PROBE_SAMPLES:
                        return False
                    continue
                return meta is not None and "image_id" in meta
    finally:
        fields.close()
    return False


def _mixed_ids_message(name: str, where: str, first_has_id: bool) -> str:
    this, first = ("lacks", "has") if first_has_id else ("has", "lacks")
    return (f"validation dataset {name!r} mixes samples with and without a json 'image_id' ({where} {this} one, "
            f"the dataset's first sample {first} one): position-based ids could equal real ids and merge two "
            "images in the retrieval metrics. Give every sample an image_id (or none), or evaluate the two kinds "
            "as separate datasets")


class ValidLoader:
    """This rank's share of one validation dataset: every sample exactly once over all ranks, no padding."""

    def __init__(self, cfg: Config, name: str, rank: int, world_size: int, tokenizer):
        if cfg.data.batch_size_val % world_size:
            raise ValueError(f"data.batch_size_val={cfg.data.batch_size_val} is not divisible by the world size "
                             f"{world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg = cfg
        self.name = name
        self.dataset = resolve_dataset(cfg.data, name, cfg.data.valid_splits)
        self.num_workers = cfg.data.num_workers
        transform = ImageTransform(cfg.transforms.valid_transforms, cfg.transforms)
        self._spec = _ValidSpec(self.dataset, rank, world_size, max(1, cfg.data.num_workers),
                                max(1, cfg.data.batch_size_val // world_size), transform,
                                caption_preparer(cfg.transforms.caption_eval), tokenizer,
                                cfg.model.max_length, cfg.seed, cfg.data.max_bad_sample_warnings,
                                dataset_has_json_image_ids(self.dataset))
        self._faults: Dict[str, int] = {}

    @property
    def image_size(self) -> int:
        return self._spec.transform.size

    def error_counts(self) -> Dict[str, int]:
        return dict(self._faults)

    def __iter__(self) -> Iterator[ValidBatch]:
        loader = _data_loader(_ValidStream(self._spec), self.num_workers, self.cfg.data.loader_timeout)
        latest: Dict[int, Dict[str, int]] = {}
        before = dict(self._faults)
        for batch, faults, role in loader:
            latest[role] = faults
            self._faults = sum_counts([before, *latest.values()])
            if batch is not None:
                yield batch


def build_valid_loader(cfg: Config, name: str, rank: int, world_size: int, tokenizer) -> ValidLoader:
    return ValidLoader(cfg, name, rank, world_size, tokenizer)
