"""The validation loader: this rank's share of one validation dataset, every sample exactly once over all ranks.

With shard sizes known each DataLoader worker reads a contiguous run of the rank's share, else each worker reads
every shard and keeps every ``world_size * workers``-th sample. A sample that cannot be used (``reader.py``'s
reasons) is skipped and counted; counts reach the caller through ``error_counts()``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

import zvl_ds.data.failures as failures
from zvl_ds.config import Config
from zvl_ds.data.decode import (_captions, _data_loader, _decode_image, _describe, _image_bytes, _is_int64, _json_meta,
                                _load_fields, _private_torch_rng)
from zvl_ds.data.failures import FailureCounter, SampleSkipped, sum_counts
from zvl_ds.data.pieces import _read_part
from zvl_ds.data.reader import FieldLoader, RawSample, read_segment
from zvl_ds.data.sampling import derive_seed, validation_part
from zvl_ds.data.sources import DataSourceError, ResolvedDataset, resolve_dataset
from zvl_ds.data.transforms import ImageTransform, caption_preparer, tokenize

_VALID_TAG = 0x7152


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
    if dataset.parquet is not None:  # rows carry no json: their position is their id
        return False
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
