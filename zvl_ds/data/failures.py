"""Why samples are skipped, and how skips are counted: one vocabulary for the shard writer and the loaders.

A reason is a short snake_case name; it appears as a key in the writer's stats json, in ``data/skipped_<reason>``
monitor values and in messages, so the strings here are part of the on-disk format and must not change.
Code that cannot use a sample raises ``SampleSkipped(reason, message)``; the loop around it catches that, adds
it to a ``FailureCounter`` and carries on. Counts from several workers or ranks are added with ``sum_counts``.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from zvl_ds.base.errors import UserError

LOG = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # examples kept per reason

# Shard writer, per caption row of an annotation CSV.
EMPTY_CAPTION = "empty_caption"
INVALID_ID = "invalid_id"
MALFORMED_ROW = "malformed_row"  # wrong number of fields; pandas skips the line
INVALID_UTF8 = "invalid_utf8"  # also a per-image reason when the file name is not UTF-8
PATH_OUTSIDE_IMAGES = "path_outside_images"  # an absolute or `..` path, or a link out (unless allowed explicitly)

# Shard writer, per image.
NO_VALID_CAPTION = "no_valid_caption"  # every caption row of the image was skipped
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
NOT_A_REGULAR_FILE = "not_a_regular_file"  # a FIFO, device, socket or folder named like an image
FILE_TOO_LARGE = "file_too_large"  # larger than make_shards --max-file-mb (a sparse or runaway file)
NOT_AN_IMAGE = "not_an_image"
FLOAT_IMAGE = "float_image"  # floating-point pixels (a float TIFF): no defined 0..255 range to convert from
OTHER_ERROR = "other_error"

# Both: image bytes that cannot be decoded, or that exceed the pixel limit (a decompression bomb).
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"

# Loaders, per sample of a shard.
MISSING_IMAGE = "missing_image"  # no jpg/jpeg/png/webp member
MISSING_CAPTION = "missing_caption"  # no usable caption in .json or .txt
BAD_JSON = "bad_json"  # .json member that is not valid UTF-8 JSON of the expected shape
TRUNCATED_SHARD = "truncated_shard"  # planned samples lost because the tar ends early (cut mid-way)
UNREADABLE_SHARD = "unreadable_shard"  # planned samples lost because the shard cannot be opened at all
SHORT_SHARD = "short_shard"  # planned samples absent from a complete tar (its size entry overstates it)
ROW_GROUP_TOO_LARGE = "row_group_too_large"  # a Parquet row group declaring more bytes than a loader reads at once


class SampleSkipped(Exception):
    """One sample (or image to be written) cannot be used; ``reason`` is the name it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class FailureCounter:
    """Counts by reason plus the first ``MAX_EXAMPLES`` examples of each.

    With ``max_warnings`` set (the loaders) the first ``max_warnings`` skips of each reason are also logged as
    warnings, then one line saying further ones are only counted; the writer leaves it unset and reports at the
    end instead."""

    def __init__(self, max_warnings: Optional[int] = None):
        self.max_warnings = max_warnings
        self.counts: Dict[str, int] = {}
        self.examples: Dict[str, List[str]] = {}
        self._warned: Dict[str, int] = {}

    def add(self, reason: str, example: str, count: int = 1) -> None:
        if count <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + count
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES and example not in kept:  # a shard read again fails the same way
            kept.append(example)
        if self.max_warnings is not None:
            self._warn(reason, example, count, self.max_warnings)

    def _warn(self, reason: str, example: str, count: int, max_warnings: int) -> None:
        warned = self._warned.get(reason, 0)
        if warned < max_warnings:
            LOG.warning("data: skipped %d sample(s) [%s]: %s", count, reason, example)
        elif warned == max_warnings:
            LOG.warning("data: further [%s] warnings are not shown (still counted)", reason)
        self._warned[reason] = warned + 1

    def merge(self, other: "FailureCounter") -> None:
        """Add ``other``'s counts and as many of its examples as there is room for."""
        self.counts = sum_counts([self.counts, other.counts])
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[: MAX_EXAMPLES - len(kept)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> Dict[str, int]:
        """A copy of the counts (what crosses process boundaries: small and picklable by value)."""
        return dict(self.counts)

    def to_json(self) -> Dict[str, Dict[str, object]]:
        return {reason: {"count": self.counts[reason], "examples": self.examples.get(reason, [])}
                for reason in sorted(self.counts)}

    @classmethod
    def from_json(cls, payload: Mapping[str, Mapping[str, object]]) -> "FailureCounter":
        counter = cls()
        for reason, item in payload.items():
            counter.counts[reason] = int(item["count"])  # type: ignore[call-overload]
            counter.examples[reason] = list(item.get("examples", []))[:MAX_EXAMPLES]  # type: ignore[call-overload]
        return counter


def sum_counts(parts: Iterable[Optional[Mapping[str, int]]]) -> Dict[str, int]:
    """Reason-wise sum of count dicts (per worker, per rank, before and after a loader restart)."""
    total: Dict[str, int] = {}
    for part in parts:
        for reason, count in (part or {}).items():
            total[reason] = total.get(reason, 0) + count
    return total


class DataLossError(UserError):
    """Too many samples of one reason were skipped within the window (``SkipBudget``): the run would go on with a
    fraction of its data. Every rank raises it at the same step (the counts are summed over ranks first), so the
    trainer can save a last checkpoint of the good state before the job exits with code 2."""


class SkipBudget:
    """At most ``max_fraction`` of the samples read within the last ``window`` samples (good ones and skipped ones
    of every reason) may be skipped for any one reason.

    ``check`` is given cumulative figures (samples delivered, skips by reason) at intervals; the window runs from
    the newest earlier check that lies at least ``window`` samples back (the start, until that many were read),
    so it covers at least ``window`` samples once the run has read them. Before that the allowance is
    ``max_fraction * window`` skips, so a run is not stopped by its first few bad samples."""

    def __init__(self, max_fraction: float, window: int):
        self.max_fraction, self.window = max_fraction, window
        self._checks: Deque[Tuple[int, Dict[str, int]]] = deque([(0, {})])  # (samples read, skips), oldest first

    def over_budget(self, delivered: int, counts: Mapping[str, int]) -> List[Tuple[str, int, int]]:
        """(reason, skipped in the window, samples read in the window) of every reason above the budget."""
        read = delivered + sum(counts.values())
        self._checks.append((read, dict(counts)))
        while len(self._checks) > 1 and self._checks[1][0] <= read - self.window:
            self._checks.popleft()
        start_read, start_counts = self._checks[0]
        window_read = read - start_read
        allowed = self.max_fraction * max(self.window, window_read)
        return [(reason, count - start_counts.get(reason, 0), window_read) for reason, count in sorted(counts.items())
                if count - start_counts.get(reason, 0) > allowed]


def shards_named(examples: Iterable[str], shards_by_dataset: Mapping[str, Sequence[str]]) -> Dict[str, List[str]]:
    """The shards that skip examples name (every example starts with its shard's path), by dataset."""
    named: Dict[str, List[str]] = {}
    for example in examples:
        for dataset, shards in shards_by_dataset.items():
            shard = next((s for s in shards if example.startswith(s) and example[len(s):len(s) + 1] in (":", " ", "")),
                         None)
            if shard is not None:
                found = named.setdefault(dataset, [])
                if shard not in found:
                    found.append(shard)
                break
    return named
