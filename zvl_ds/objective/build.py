"""One way to build a training step from a config, used by the trainer, ``verify_exactness`` and the benchmarks.

A configured step is the runner (``runner.name``: DGA or single pass), its options (the per-rank chunk, the loss
with its tiling, how images reach the device), the mixup partner map, and the per-step draws: the global RNG's
seed (``runner.stable_random: step``) and the mixup draw. Building them in one place keeps every caller's step
identical to the trainer's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from zvl_ds.objective.losses import build_loss
from zvl_ds.objective.mixup import MixupDraw, draw_mixup, partner_index
from zvl_ds.objective.step import RUNNERS, StepBatch, StepOptions, StepResult, step_seed


@dataclass
class Step:
    """A step as the config describes it; ``step(engine, batch, index)`` runs optimizer step ``index``."""

    runner: Callable[..., StepResult]
    options: StepOptions
    partner: Optional[torch.Tensor]  # the mixup partner map over the global batch; None without mixup
    seed: int
    rank: int
    mixup_beta: Optional[float]  # Beta(beta, beta) of the mixup draw; None when the loss has no mixup
    reseed_each_step: bool  # runner.stable_random == "step"

    def mixup(self, index: int) -> Optional[MixupDraw]:
        """Step ``index``'s mixup draw: the same on every rank and on a resumed run."""
        return draw_mixup(self.seed, index, self.mixup_beta) if self.mixup_beta is not None else None

    def seed_rng(self, index: int) -> None:
        """Seed the global RNG for step ``index`` on this rank (``runner.stable_random: step``; else nothing)."""
        if self.reseed_each_step:
            torch.manual_seed(step_seed(self.seed, index, self.rank))

    def __call__(self, engine, batch: StepBatch, index: int, timer=None) -> StepResult:
        self.seed_rng(index)
        return self.runner(engine, batch, self.options, self.mixup(index), self.partner, timer)


def build_step(cfg, world_size: int, rank: int, device: torch.device = torch.device("cpu"),
               prepare_images: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Step:
    """The step of ``cfg`` (a ``Config``) on one of ``world_size`` ranks."""
    chunk = cfg.per_rank_chunk(world_size)
    mixup = cfg.loss.name == "MixUpNCE"
    options = StepOptions(chunk=chunk, loss=build_loss(cfg.loss), prepare_images=prepare_images, device=device)
    # the model mixes inside each forward, so the partner map pairs samples within each per-rank chunk
    partner = partner_index(cfg.data.batch_size, world_size, chunk).to(device) if mixup else None
    return Step(runner=RUNNERS[cfg.runner.name], options=options, partner=partner, seed=cfg.seed, rank=rank,
                mixup_beta=cfg.loss.mixup.beta if mixup else None,
                reseed_each_step=cfg.runner.stable_random == "step")
