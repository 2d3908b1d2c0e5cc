"""One way to build a training step from a config, used by the trainer, ``verify_exactness`` and the benchmarks.

A configured step (``step.Step``) is the runner (``runner.name``: DGA or single pass), its options (the per-rank
chunk, the loss with its tiling, how images reach the device and are normalised there), the mixup partner map, and
the per-step draws: the global RNG's seed (``runner.stable_random: step``) and the mixup draw. Building them in one
place keeps every caller's step identical to the trainer's.
"""
from __future__ import annotations

import torch

from zvl_ds.config import Config
from zvl_ds.objective.losses import build_loss
from zvl_ds.objective.mixup import partner_index
from zvl_ds.objective.step import RUNNERS, ImagePreparation, Step, StepOptions


def build_step(cfg: Config, world_size: int, rank: int, device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float32) -> Step:
    """The step of ``cfg`` on one of ``world_size`` ranks, for an engine on ``device`` computing in ``dtype``."""
    chunk = cfg.per_rank_chunk(world_size)
    mixup = cfg.loss.name == "MixUpNCE"
    options = StepOptions(chunk=chunk, loss=build_loss(cfg.loss),
                          prepare_images=ImagePreparation(cfg.transforms.normalize, device, dtype), device=device)
    # the model mixes inside each forward, so the partner map pairs samples within each per-rank chunk
    partner = partner_index(cfg.data.batch_size, world_size, chunk).to(device) if mixup else None
    return Step(runner=RUNNERS[cfg.runner.name], options=options, partner=partner, seed=cfg.seed, rank=rank,
                mixup_beta=cfg.loss.mixup.beta if mixup else None,
                reseed_each_step=cfg.runner.stable_random == "step")
