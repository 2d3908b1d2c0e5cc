"""Skipped steps: counted, and too many in a row end the run, since it is diverging and must stop, not spin."""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

from zvl_ds.objective.step import StepResult


class TrainingAborted(RuntimeError):
    """Too many consecutive steps were skipped (non-finite loss, fp16 overflow)."""


class NonFiniteWeights(TrainingAborted):
    """A step left a weight infinite or NaN (an infinite learning rate, an overflowing update)."""


def held_values(parameter: torch.nn.Parameter) -> torch.Tensor:
    """The values of ``parameter`` this rank holds: all of it, or at ZeRO-3 its partition (``ds_tensor``) without
    the padding that rounds the last partitions up to equal sizes. DeepSpeed never writes that padding (it is
    ``torch.empty`` memory), so it may hold any bits, NaN included; a frozen parameter's padding stays so."""
    partition = getattr(parameter, "ds_tensor", None)
    if partition is None:
        return parameter.detach()
    rank = torch.distributed.get_rank(getattr(parameter, "ds_process_group", None)) \
        if torch.distributed.is_initialized() else 0
    start = partition.numel() * rank
    valid = max(0, min(partition.numel(), parameter.ds_numel - start))
    return partition.detach().narrow(0, 0, valid)


def local_weights_finite(module: torch.nn.Module) -> bool:
    """Whether every weight this rank holds is finite (at ZeRO-3: its partition of each parameter).

    One max-norm per dtype group (a NaN or inf anywhere makes it non-finite) and one host sync, so it can run
    after every step; the trainer agrees on the answer over ranks before a checkpoint may be written.
    """
    groups = defaultdict(list)
    for parameter in module.parameters():
        held = held_values(parameter)
        if held.numel():
            groups[(held.device, held.dtype)].append(held)
    if not groups:
        return True
    flags = [torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all()
             for tensors in groups.values()]
    return bool(torch.stack(flags).all())


def non_finite_weights_message(step: int, last_checkpoint: Optional[str]) -> str:
    return (f"step {step} left non-finite weights (NaN or inf; e.g. too high a learning rate or an overflowing "
            f"update): the run stops before any checkpoint is written from them. Last good checkpoint: "
            f"{last_checkpoint or 'none written yet'}; resume from it with a lower optim.lr.init or "
            "optim.grad_clip set")


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
