"""Which samples each rank, loader role and optimizer step gets: pure index arithmetic, no I/O.

Vocabulary:
- A *pass* over a dataset visits its shards in an order drawn from ``(seed, dataset, pass)``. Rank ``r`` owns the
  contiguous sample positions ``[r*A, (r+1)*A)`` of that order, ``A = size // world_size`` (the remainder, under
  ``world_size`` samples, sits out that pass; the shard order moves it around). Sample-level slices let every rank
  get the same count whatever the number of shards, even with fewer shards than ranks x workers.
- A *role* is one of the rank's ``R = max(1, num_workers)`` loader workers. Role ``w`` serves the optimizer steps
  ``g`` with ``g % R == w``, in order; the DataLoader hands out its workers' batches round-robin, so the rank
  yields steps 0, 1, 2, ... Roles never share work and never wait for each other.
- A *source* is what a step draws its batch from: one mixed source (``shuffle``) or one per dataset
  (``sequential``, ``debias``). Each role reads, per source, an endless chain of *pieces* (piece ``i`` = epoch
  ``i`` or pass ``i``): contiguous stretches of the rank's slice, buffer-shuffled with their own seed.

The modes (``w_k``: dataset k's weight, ``data.datasets.<name>.weight``, default 1):
- ``shuffle``: an epoch takes ``S = sum(A_k) // b`` steps; dataset k contributes a share of the ``S*b`` samples
  proportional to ``w_k * A_k``, interleaved at random (so every batch is a proportional mix). A dataset's share
  of epoch ``e`` is read from fresh passes: the first ``quota`` positions of its passes ``e*m, e*m+1, ...`` chained
  (``m`` = the passes one epoch's share needs; 1 unless up-weighted), so an up-weighted dataset repeats its samples
  in a new order within the epoch and a down-weighted one leaves the rest of its pass unread.
- ``sequential``: an epoch runs dataset 1's ``A_1 // b`` steps, then dataset 2's, ... (no weights).
- ``debias``: step ``g`` draws one dataset with probability proportional to ``w_k * size_k`` from
  ``numpy.random.default_rng([seed, g])``; every rank draws the same one with no communication. A role's stream of
  a dataset moves to the next pass (new shard order) when its piece of the current pass is used up.

Weights enter as exact fractions (``weighted_sizes``), so the integer shares are the same on every machine, and
with every weight 1 they are the sizes themselves: an unweighted run's stream is what it was before weights.

In shuffle and sequential modes a role's pieces hold exactly the samples of its steps of that epoch, so step
``k*S`` starts epoch ``k`` on the nose (until a fault makes a role take a replacement sample from further on).
"""
from __future__ import annotations

import bisect
import hashlib
import math
import struct
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from zvl_ds.base.errors import UserError

SHUFFLE, SEQUENTIAL, DEBIAS = "shuffle", "sequential", "debias"
MIXED = "mixed"  # TrainBatch.dataset in shuffle mode

_MASK64 = (1 << 64) - 1
# Distinct streams drawn from the same seed.
_ORDER_TAG, _MIX_TAG, _BUFFER_TAG = 0x5A1, 0x5A2, 0x5A3


class SamplingError(UserError, ValueError):
    """A configuration the sampler cannot serve (too little data for the batch or the world size)."""


def name_key(name: str) -> int:
    """A stable integer for a dataset name (its seeds do not change when other datasets are added)."""
    return zlib.crc32(name.encode("utf-8"))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (cheap enough to call once per sample)."""
    packed = struct.pack(f"<{len(parts)}Q", *(int(p) & _MASK64 for p in parts))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def largest_remainder(total: int, weights: Sequence[int]) -> List[int]:
    """Integer shares of ``total`` proportional to ``weights`` (summing to ``total``; ties go to the earlier)."""
    weight_sum = sum(weights)
    if weight_sum <= 0:
        raise ValueError("weights must have a positive sum")
    shares = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    for index in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[: total - sum(shares)]:
        shares[index] += 1
    return shares


def weighted_sizes(sizes: Sequence[int], weights: Sequence[float]) -> List[int]:
    """Integers proportional to ``weight * size`` per dataset, computed exactly. A weight counts as the decimal it
    is written as (0.1 is 1/10, not the nearest binary fraction); with every weight 1 these are the sizes."""
    products = [Fraction(repr(float(weight))) * int(size) for weight, size in zip(weights, sizes)]
    scale = math.lcm(*(product.denominator for product in products))
    return [int(product * scale) for product in products]


def mixture_shares(sizes: Sequence[int], weights: Sequence[float]) -> List[float]:
    """Each dataset's share of the samples (shuffle) or of the steps (debias): ``w_k * size_k / sum``."""
    weighted = weighted_sizes(sizes, weights)
    total = sum(weighted)
    if total <= 0:
        raise SamplingError("the training datasets hold no samples")
    return [float(Fraction(value, total)) for value in weighted]


def role_steps(lo: int, hi: int, role: int, roles: int) -> int:
    """How many steps ``g`` in ``[lo, hi)`` have ``g % roles == role``."""

    def before(x: int) -> int:
        return max(0, (x - role + roles - 1) // roles)

    return before(hi) - before(lo)


# --------------------------------------------------------------------------------------------------
# Positions -> shard segments
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (by position inside the tar) of shard ``shard`` (index into the shard list)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class Part:
    """A contiguous run of one dataset's samples in one pass."""

    dataset: int
    pass_index: int
    segments: Tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(s.stop - s.start for s in self.segments)


@dataclass(frozen=True)
class Piece:
    """What a role reads for one epoch/pass of one source: its parts, read in order (or interleaved by
    ``pattern``, a part index per sample), then shuffled through a buffer seeded by ``shuffle_seed``."""

    parts: Tuple[Part, ...]
    pattern: Optional[np.ndarray]
    shuffle_seed: int

    @property
    def length(self) -> int:
        return sum(p.length for p in self.parts)


def segments_in_range(order: np.ndarray, sizes: np.ndarray, lo: int, hi: int) -> Tuple[Segment, ...]:
    """The shard segments holding positions ``[lo, hi)`` of the shards concatenated in ``order``."""
    ordered = sizes[order]
    ends = np.cumsum(ordered)
    segments: List[Segment] = []
    index = int(np.searchsorted(ends, lo, side="right"))
    while lo < hi and index < len(order):
        first = int(ends[index] - ordered[index])
        start, stop = lo - first, min(hi, int(ends[index])) - first
        if stop > start:
            segments.append(Segment(int(order[index]), start, stop))
        lo = first + stop
        index += 1
    return tuple(segments)


def even_range(total: int, index: int, parts: int) -> Tuple[int, int]:
    """Part ``index`` of ``parts`` near-equal contiguous parts of ``range(total)``."""
    return index * total // parts, (index + 1) * total // parts


# --------------------------------------------------------------------------------------------------
# Training plans
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetLayout:
    name: str
    sizes: Tuple[int, ...]  # samples per shard, in the dataset's shard-list order
    weight: float = 1.0  # multiplies the dataset's share of the mixture (data.datasets.<name>.weight)

    @property
    def size(self) -> int:
        return sum(self.sizes)


class SamplingPlan:
    """Index arithmetic shared by the three modes; subclasses say which source a step uses and what a piece is."""

    mode = ""

    def __init__(self, datasets: Sequence[DatasetLayout], seed: int, rank: int, world_size: int, roles: int,
                 batch_size: int):
        if not datasets:
            raise SamplingError("no training datasets")
        if not 0 <= rank < world_size:
            raise SamplingError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1 or roles < 1:
            raise SamplingError(f"per-rank batch ({batch_size}) and roles ({roles}) must be >= 1")
        self.datasets = list(datasets)
        self.seed = int(seed) & _MASK64
        self.rank, self.world_size, self.roles, self.batch_size = rank, world_size, roles, batch_size
        self.per_rank = [d.size // world_size for d in self.datasets]  # samples of one pass on one rank
        self.weights = [float(d.weight) for d in self.datasets]
        self._sizes = [np.asarray(d.sizes, dtype=np.int64) for d in self.datasets]
        self._orders: Dict[Tuple[int, int], np.ndarray] = {}
        self._steps = 0  # optimizer steps per epoch; each subclass sets it

    @property
    def source_names(self) -> List[str]:
        """One stream per dataset (shuffle mode has a single mixed stream)."""
        return [d.name for d in self.datasets]

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    # ---- what subclasses provide
    def source_of_step(self, step: int) -> int:
        raise NotImplementedError

    def piece(self, source: int, role: int, index: int) -> Piece:
        raise NotImplementedError

    # ---- shared helpers
    def shard_order(self, dataset: int, pass_index: int) -> np.ndarray:
        """The shard order of one pass over one dataset, from (seed, dataset name, pass)."""
        key = (dataset, pass_index)
        if key not in self._orders:
            if len(self._orders) > 64:
                self._orders.clear()
            rng = np.random.default_rng([self.seed, _ORDER_TAG, name_key(self.datasets[dataset].name), pass_index])
            self._orders[key] = rng.permutation(len(self._sizes[dataset]))
        return self._orders[key]

    def rank_part(self, dataset: int, pass_index: int, lo: int, hi: int) -> Part:
        """Positions ``[lo, hi)`` of this rank's slice of one pass over one dataset."""
        offset = self.rank * self.per_rank[dataset]
        segments = segments_in_range(self.shard_order(dataset, pass_index), self._sizes[dataset],
                                     offset + lo, offset + hi)
        return Part(dataset, pass_index, segments)

    def buffer_seed(self, source: int, role: int, index: int) -> int:
        return derive_seed(self.seed, _BUFFER_TAG, source, index, self.rank, self.world_size, role)

    def roles_layout(self, lo: int, hi: int, role: int) -> Tuple[int, int]:
        """Within steps ``[lo, hi)``: (samples served by lower roles, samples served by ``role``)."""
        before = sum(role_steps(lo, hi, v, self.roles) for v in range(role))
        return before * self.batch_size, role_steps(lo, hi, role, self.roles) * self.batch_size

    def _require_steps(self, steps: int, what: str) -> None:
        if steps < 1:
            sizes = ", ".join(f"{d.name}={d.size}" for d in self.datasets)
            raise SamplingError(f"{self.mode}: {what} (datasets {sizes}; {self.world_size} ranks; per-rank batch "
                                f"{self.batch_size}): lower data.batch_size or add data")


class ShufflePlan(SamplingPlan):
    mode = SHUFFLE

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._steps = sum(self.per_rank) // self.batch_size
        self._require_steps(self._steps, "fewer samples per rank than one batch")
        # Every epoch takes the same share from each dataset: the first `quota` samples of its chained passes
        self.quota = largest_remainder(self._steps * self.batch_size, weighted_sizes(self.per_rank, self.weights))
        self.passes_per_epoch = [max(1, -(-quota // size)) if size else 1
                                 for quota, size in zip(self.quota, self.per_rank)]
        self._pattern_epoch = -1
        self._pattern = np.zeros(0, dtype=np.int16)

    @property
    def source_names(self) -> List[str]:
        return [MIXED]

    def source_of_step(self, step: int) -> int:
        return 0

    def mix_pattern(self, epoch: int) -> np.ndarray:
        """The rank's dataset index per sample position of an epoch: a seeded random interleave of the quotas."""
        if epoch != self._pattern_epoch:
            rng = np.random.default_rng([self.seed, _MIX_TAG, epoch, self.rank])
            counts = np.asarray(self.quota)
            self._pattern = rng.permutation(np.repeat(np.arange(len(counts), dtype=np.int16), counts))
            self._pattern_epoch = epoch
        return self._pattern

    def piece(self, source: int, role: int, index: int) -> Piece:
        first_step = index * self._steps
        start, length = self.roles_layout(first_step, first_step + self._steps, role)
        seed = self.buffer_seed(source, role, index)
        if len(self.datasets) == 1:
            return Piece((self.rank_part(0, index, start, start + length),), None, seed)
        pattern = self.mix_pattern(index)
        count = len(self.datasets)
        before = np.bincount(pattern[:start], minlength=count)
        inside = np.bincount(pattern[start:start + length], minlength=count)
        runs = [self.epoch_parts(k, index, int(before[k]), int(before[k] + inside[k])) for k in range(count)]
        parts = tuple(part for run in runs for part in run)
        mix = pattern[start:start + length]
        if len(parts) > count:  # an up-weighted dataset's share spans passes: the pattern names parts, not datasets
            mix = part_pattern(mix, [[part.length for part in run] for run in runs])
        return Piece(parts, mix.copy(), seed)

    def epoch_parts(self, dataset: int, epoch: int, lo: int, hi: int) -> List[Part]:
        """Positions ``[lo, hi)`` of a dataset's share of an epoch: its rank slices of the epoch's passes, chained."""
        size, first_pass = self.per_rank[dataset], epoch * self.passes_per_epoch[dataset]
        if hi <= size:
            return [self.rank_part(dataset, first_pass, lo, hi)]
        parts = []
        while lo < hi:
            later, offset = divmod(lo, size)
            stop = min(hi, (later + 1) * size)
            parts.append(self.rank_part(dataset, first_pass + later, offset, stop - later * size))
            lo = stop
        return parts


class SequentialPlan(SamplingPlan):
    mode = SEQUENTIAL

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if any(weight != 1 for weight in self.weights):
            raise SamplingError("sequential: source weights (data.datasets.<name>.weight) apply to the shuffle and "
                                "debias modes; a sequential epoch reads each dataset once")
        self.dataset_steps = [n // self.batch_size for n in self.per_rank]
        self._first_step = [sum(self.dataset_steps[:k]) for k in range(len(self.datasets))]
        self._steps = sum(self.dataset_steps)
        self._require_steps(self._steps, "no dataset holds one batch per rank")

    def source_of_step(self, step: int) -> int:
        return bisect.bisect_right(self._first_step, step % self._steps) - 1

    def piece(self, source: int, role: int, index: int) -> Piece:
        lo = index * self._steps + self._first_step[source]
        start, length = self.roles_layout(lo, lo + self.dataset_steps[source], role)
        return Piece((self.rank_part(source, index, start, start + length),), None,
                     self.buffer_seed(source, role, index))


class DebiasPlan(SamplingPlan):
    mode = DEBIAS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        small = [d.name for d, n in zip(self.datasets, self.per_rank) if n < 1]
        if small:
            raise SamplingError(f"debias: datasets {small} hold fewer samples than ranks ({self.world_size})")
        self._steps = sum(self.per_rank) // self.batch_size
        self._require_steps(self._steps, "fewer samples per rank than one batch")
        self.probabilities = np.asarray(mixture_shares([d.size for d in self.datasets], self.weights))
        self._cumulative = np.cumsum(self.probabilities)

    def source_of_step(self, step: int) -> int:
        return debias_draw(self.seed, step, self._cumulative)

    def piece(self, source: int, role: int, index: int) -> Piece:
        # The role's share of the pass rotates with the pass, so no role is left without data when a tiny
        # dataset has fewer samples per rank than there are roles.
        lo, hi = even_range(self.per_rank[source], (role + index) % self.roles, self.roles)
        return Piece((self.rank_part(source, index, lo, hi),), None, self.buffer_seed(source, role, index))


def part_pattern(datasets: np.ndarray, part_lengths: Sequence[Sequence[int]]) -> np.ndarray:
    """Per sample, the part it is read from, given per sample its dataset and, per dataset, the lengths of its parts
    in reading order (a dataset's samples use up its parts one after the other)."""
    parts = np.empty(len(datasets), dtype=np.int64)
    first = 0
    for dataset, lengths in enumerate(part_lengths):
        parts[datasets == dataset] = np.repeat(np.arange(first, first + len(lengths)), lengths)
        first += len(lengths)
    return parts


def debias_draw(seed: int, step: int, cumulative: np.ndarray) -> int:
    """The dataset of optimizer step ``step``: a pure function of (seed, step), the same on every rank."""
    u = np.random.default_rng([int(seed) & _MASK64, step]).random() * cumulative[-1]
    return min(int(np.searchsorted(cumulative, u, side="right")), len(cumulative) - 1)


PLANS = {SHUFFLE: ShufflePlan, SEQUENTIAL: SequentialPlan, DEBIAS: DebiasPlan}


def build_plan(mode: str, datasets: Sequence[DatasetLayout], seed: int, rank: int, world_size: int, roles: int,
               batch_size: int) -> SamplingPlan:
    if mode not in PLANS:
        raise SamplingError(f"data.train_type must be one of {sorted(PLANS)}, got {mode!r}")
    return PLANS[mode](datasets, seed, rank, world_size, roles, batch_size)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def validation_part(sizes: Sequence[int], rank: int, world_size: int, role: int, roles: int) -> Part:
    """The contiguous positions (shards in listed order) that one role of one rank evaluates; the parts of all
    ranks and roles tile the dataset exactly once. Some may be empty."""
    total = sum(sizes)
    lo, hi = even_range(total, rank, world_size)
    count = hi - lo
    sub_lo, sub_hi = even_range(count, role, roles)
    order = np.arange(len(sizes))
    return Part(0, 0, segments_in_range(order, np.asarray(sizes, dtype=np.int64), lo + sub_lo, lo + sub_hi))
