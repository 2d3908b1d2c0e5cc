"""Skipped steps: counted, and too many in a row end the run, since it is diverging and must stop, not spin."""
from __future__ import annotations

from typing import Optional

from zvl_ds.objective.step import StepResult


class TrainingAborted(RuntimeError):
    """Too many consecutive steps were skipped (non-finite loss, fp16 overflow)."""


class SkipPolicy:
    """Counts skipped steps; too many in a row means the run is diverging and must stop, not spin."""

    def __init__(self, max_in_a_row: int, total: int = 0):
        self.max_in_a_row = max_in_a_row
        self.total = total
        self.in_a_row = 0

    def record(self, result: StepResult, step: int, last_checkpoint: Optional[str]) -> None:
        if result.applied:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingAborted(f"{self.in_a_row} consecutive steps skipped up to step {step} "
                                  f"(last: {result.skip_reason}); last good checkpoint: "
                                  f"{last_checkpoint or 'none written yet'}")
