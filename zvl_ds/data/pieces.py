"""Reading the sampling plan's parts and pieces as raw samples, through the sample-level shuffle buffer.

A part is read segment by segment, in order (a segment is a stretch of a tar shard or of a Parquet row group); a
piece reads its parts (in order, or interleaved by its pattern) and shuffles them through a buffer seeded by the
piece, so re-reading a piece gives the same order (exact resume).
``SourceStream`` is one training role's endless chain of pieces of one source, with its resumable cursor.
"""
from __future__ import annotations

import random
from typing import Iterator, List, Optional, Sequence

from zvl_ds.data.failures import FailureCounter
from zvl_ds.data.parquet_reader import read_row_group
from zvl_ds.data.reader import RawSample, read_segment
from zvl_ds.data.sampling import Part, Piece, SamplingPlan
from zvl_ds.data.sources import ResolvedDataset


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


def read_unit(dataset: ResolvedDataset, unit: int, start: int, stop: int, faults: FailureCounter
              ) -> Iterator[RawSample]:
    """Samples ``[start, stop)`` of one unit of a dataset: a tar shard, or a Parquet row group."""
    if dataset.parquet is not None:
        return read_row_group(dataset.shards[unit], unit, dataset.parquet, start, stop, faults)
    return read_segment(dataset.shards[unit], unit, start, stop, faults)


def _read_part(part: Part, dataset: ResolvedDataset, faults: FailureCounter) -> Iterator[RawSample]:
    for segment in part.segments:
        for raw in read_unit(dataset, segment.shard, segment.start, segment.stop, faults):
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
