"""Files a run appends to (``eval_metrics.jsonl``, ``sample_keys/rank_N.txt``), kept free of duplicate rows.

A run that stops after its last checkpoint has already appended rows for the steps that follow it; a resume
replays those steps and would append them again. Before training continues, rows newer than the resume step
are dropped, so every step appears once and each file matches the checkpoint it continues from.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from zvl_ds.base.atomic_write import write_text_atomic


def keep_rows(path: str, keep: Callable[[str], bool]) -> int:
    """Rewrite ``path`` (atomically) with only the lines ``keep`` accepts; return how many were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and keep(line)]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
    return len(lines) - len(kept)


def sample_keys_step(line: str) -> int:
    """The step of a ``sample_keys`` row: ``<step> <key> <key> ...`` (the step's index, 0-based)."""
    return int(line.split(maxsplit=1)[0])


def metrics_step(line: str) -> int:
    """The step of an ``eval_metrics.jsonl`` row (the number of steps done when it was evaluated)."""
    return int(json.loads(line)["step"])


def drop_rows_after(run_dir: str, step: int, rank: int, main_process: bool) -> None:
    """Forget what the steps after ``step`` appended: this rank's sample keys, and on rank 0 the metrics.

    A half-written last line (the process was killed mid-write) is dropped too: it cannot be parsed.
    """
    def before(parse: Callable[[str], int], limit: int) -> Callable[[str], bool]:
        def keep(line: str) -> bool:
            try:
                return parse(line) < limit
            except (ValueError, KeyError, TypeError, IndexError):
                return False
        return keep

    keep_rows(os.path.join(run_dir, "sample_keys", f"rank_{rank}.txt"), before(sample_keys_step, step))
    if main_process:
        keep_rows(os.path.join(run_dir, "eval_metrics.jsonl"), before(metrics_step, step + 1))
