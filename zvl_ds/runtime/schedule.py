"""Learning-rate schedules as pure functions of the global optimizer step (nothing to checkpoint)."""
from __future__ import annotations

import math

from zvl_ds.config import LRConfig


def warmup_steps(lr_cfg: LRConfig, total_steps: int) -> int:
    """Explicit ``warmup_steps`` wins; otherwise ZeroVL's ``int(total * warmup_proportion)``."""
    if lr_cfg.warmup_steps is not None:
        return max(0, lr_cfg.warmup_steps)
    return int(total_steps * lr_cfg.warmup_proportion)


def cosine_schedule_with_warmup_min_lr_scale(step: int, total_steps: int, warmup: int, num_cycles: float,
                                             min_lr_scale: float) -> float:
    """ZeroVL's multiplier: linear ramp from 0, then cosine from 1 down to ``min_lr_scale`` (docs/method.md)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    scale = min_lr_scale + (1.0 - min_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress))
    return max(0.0, scale)


def linear_warmup_cosine_lr(step: int, total_steps: int, warmup: int, init_lr: float, min_lr: float,
                            warmup_lr: float) -> float:
    """LAVIS's schedule, evaluated per step rather than per epoch: warm up from ``warmup_lr``, then cosine to
    ``min_lr`` over the whole run."""
    if step < warmup:
        return warmup_lr + (init_lr - warmup_lr) * step / max(1, warmup)
    progress = min(1.0, step / max(1, total_steps))
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_warmup_step_lr(step: int, steps_per_epoch: int, warmup: int, init_lr: float, min_lr: float,
                          warmup_lr: float, decay_rate: float) -> float:
    """LAVIS's step decay: ``init_lr * decay_rate ** epoch`` (floored at ``min_lr``) after a linear warm-up."""
    if step < warmup:
        return warmup_lr + (init_lr - warmup_lr) * step / max(1, warmup)
    epoch = step // max(1, steps_per_epoch)
    return max(min_lr, init_lr * decay_rate ** epoch)


def learning_rate(lr_cfg: LRConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate to use for optimizer step ``step`` (0-based)."""
    warmup = warmup_steps(lr_cfg, total_steps)
    if lr_cfg.name == "cosine_schedule_with_warmup_min_lr_scale":
        return lr_cfg.init * cosine_schedule_with_warmup_min_lr_scale(
            step, total_steps, warmup, lr_cfg.param.num_cycles, lr_cfg.param.min_lr_scale)
    if lr_cfg.name == "linear_warmup_cosine_lr":
        return linear_warmup_cosine_lr(step, total_steps, warmup, lr_cfg.init, lr_cfg.min_lr, lr_cfg.warmup_lr)
    if lr_cfg.name == "linear_warmup_step_lr":
        return linear_warmup_step_lr(step, steps_per_epoch, warmup, lr_cfg.init, lr_cfg.min_lr, lr_cfg.warmup_lr,
                                     lr_cfg.lr_decay_rate)
    return lr_cfg.init  # "constant" / "constant_lr"
