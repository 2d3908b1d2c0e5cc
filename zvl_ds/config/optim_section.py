"""The ``optim:`` section: the optimizer and its parameters, the learning-rate schedule, each model part's learning
rate (a multiple, an absolute value, layer-wise decay), weight decay groups and gradient clipping; with the checks
that concern this section alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from zvl_ds.base.errors import ConfigError


@dataclass
class OptimParams:
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas `[beta1, beta2]`."""
    eps: float = 1e-6
    """AdamW epsilon."""
    weight_decay: float = 0.001
    """Weight decay of the decay group (all parameters when `decay_all`)."""
    momentum: float = 0.0
    """SGD momentum (SGD only)."""


@dataclass
class LRParams:
    num_cycles: float = 0.5
    """Cosine cycles of the ZeroVL schedule after warm-up (0.5: one half cosine, monotone decay)."""
    min_lr_scale: float = 0.1
    """ZeroVL schedule: the final learning rate is `init * min_lr_scale`."""


LR_SCHEDULES = ("cosine_schedule_with_warmup_min_lr_scale", "linear_warmup_cosine_lr", "linear_warmup_step_lr",
                "constant", "constant_lr")  # constant_lr: LAVIS's name for constant


@dataclass
class LRConfig:
    name: Literal[LR_SCHEDULES] = "cosine_schedule_with_warmup_min_lr_scale"
    """`cosine_schedule_with_warmup_min_lr_scale` (ZeroVL): linear ramp from 0, then cosine down to `init *
    min_lr_scale`; `linear_warmup_cosine_lr` (LAVIS): ramp from `warmup_lr`, cosine to `min_lr`;
    `linear_warmup_step_lr` (LAVIS): ramp, then `init * lr_decay_rate ** epoch` floored at `min_lr`; `constant` (or
    LAVIS's `constant_lr`): `init`. Evaluated per optimizer step.
    """
    init: float = 1e-4
    """Peak learning rate (after warm-up)."""
    warmup_proportion: float = 0.025
    """Warm-up length as a fraction of the run's optimizer steps (unless `warmup_steps` is set)."""
    warmup_steps: Optional[int] = None
    """Warm-up length in optimizer steps; wins over `warmup_proportion`. `null`: use the proportion."""
    min_lr: float = 0.0
    """Final / floor learning rate of the LAVIS schedules."""
    warmup_lr: float = 0.0
    """Learning rate at step 0 of the LAVIS schedules' warm-up."""
    lr_decay_rate: float = 0.9
    """`linear_warmup_step_lr`: factor applied once per epoch."""
    param: LRParams = field(default_factory=LRParams)


MODEL_PARTS = ("image_tower", "text_tower", "projection", "temperature")


@dataclass
class PartLRMultConfig:
    """Each part's learning rate as a multiple of the schedule's (optim.lr)."""

    image_tower: float = 1.0
    """Image tower's learning rate as a multiple of the schedule's (every schedule, every step); 0 freezes it in effect
    but keeps it in the optimizer.
    """
    text_tower: float = 1.0
    """Text tower's learning-rate multiple of the schedule's."""
    projection: float = 1.0
    """Both projections' learning-rate multiple of the schedule's."""
    temperature: float = 1.0
    """The learnable temperature's learning-rate multiple of the schedule's."""


@dataclass
class PartLRAbsConfig:
    """A part's peak learning rate given absolutely: its multiplier becomes value / optim.lr.init."""

    image_tower: Optional[float] = None
    """Image tower's peak learning rate, absolute (multiplier = value / `optim.lr.init`); `null`: use `lr_mult`."""
    text_tower: Optional[float] = None
    """Text tower's peak learning rate, absolute; `null`: use `lr_mult`."""
    projection: Optional[float] = None
    """Projections' peak learning rate, absolute; `null`: use `lr_mult`."""
    temperature: Optional[float] = None
    """Temperature's peak learning rate, absolute; `null`: use `lr_mult`."""


@dataclass
class LayerDecayConfig:
    """Layer-wise LR decay (EVA-CLIP): block i of L gets decay ** (L - i); embeddings decay ** (L + 1)."""

    image_tower: float = 1.0
    """Layer-wise LR decay of a ViT image tower (EVA-CLIP): with L blocks, block i (0-based) gets `decay ** (L - i)`,
    patch/position embeddings and tokens `decay ** (L + 1)`, the final norm and pooling 1; 1.0 = off. Blocks: timm
    `blocks.N` (embeddings `patch_embed`, `pos_embed`, tokens), Hugging Face CLIP/SigLIP `encoder.layers.N`
    (embeddings `embeddings`, `pre_layrnorm`), OpenCLIP `transformer.resblocks.N` (embeddings `conv1`,
    `class_embedding`, `positional_embedding`, `ln_pre`).
    """
    text_tower: float = 1.0
    """The same for the text tower: BERT-like `encoder.layer.N` (embeddings `embeddings`), Hugging Face CLIP/SigLIP
    `encoder.layers.N` (embeddings `embeddings`), OpenCLIP `transformer.resblocks.N` (embeddings `token_embedding`,
    `positional_embedding`); 1.0 = off.
    """


@dataclass
class OptimConfig:
    name: Literal["torch.optim.AdamW", "AdamW", "torch.optim.SGD", "SGD"] = "torch.optim.AdamW"
    """`torch.optim.AdamW` or `AdamW`: AdamW; `torch.optim.SGD` or `SGD`: SGD."""
    param: OptimParams = field(default_factory=OptimParams)
    lr: LRConfig = field(default_factory=LRConfig)
    lr_mult: PartLRMultConfig = field(default_factory=PartLRMultConfig)
    lr_abs: PartLRAbsConfig = field(default_factory=PartLRAbsConfig)
    layer_decay: LayerDecayConfig = field(default_factory=LayerDecayConfig)
    # ZeroVL decays every parameter (its exclusion rules are commented out); decaying norms, biases and the
    # temperature is rarely what users want, so by default they go to a no-decay group.
    decay_all: bool = False
    """`true`: decay every parameter (ZeroVL); `false`: biases, norm gains and other 1-d tensors, the temperature,
    position embeddings and class/mask tokens get no weight decay.
    """
    grad_clip: float = 0.0
    """Maximum global gradient norm (DeepSpeed `gradient_clipping`); 0 = off."""
    implementation: Literal["auto", "plain", "foreach", "fused"] = "auto"
    """Kernel of the torch optimizer: `plain` (a loop over tensors), `foreach` (batched over tensors), `fused` (one
    kernel; CUDA, or CPU where torch supports it); `auto`: `fused` on CUDA, `plain` on CPU. Same update up to
    floating-point rounding.
    """

    def check(self) -> None:
        self._check_part_lrs()
        if len(self.param.betas) != 2:
            raise ConfigError(f"optim.param.betas: need two values, got {self.param.betas}")
        self._check_numbers()

    def _check_part_lrs(self) -> None:
        for part in MODEL_PARTS:
            mult, absolute = getattr(self.lr_mult, part), getattr(self.lr_abs, part)
            if not (math.isfinite(mult) and mult >= 0):
                raise ConfigError(f"optim.lr_mult.{part}: must be >= 0, got {mult}")
            if absolute is None:
                continue
            if not (math.isfinite(absolute) and absolute >= 0):
                raise ConfigError(f"optim.lr_abs.{part}: must be >= 0, got {absolute}")
            if mult != 1.0:
                raise ConfigError(f"optim.lr_abs.{part}={absolute} and optim.lr_mult.{part}={mult}: give the part's "
                                  "learning rate one way")
            if self.lr.init <= 0:
                raise ConfigError(f"optim.lr_abs.{part} is relative to optim.lr.init, which must then be > 0 "
                                  f"(got {self.lr.init})")
        for tower in ("image_tower", "text_tower"):
            decay = getattr(self.layer_decay, tower)
            if not 0 < decay <= 1:
                raise ConfigError(f"optim.layer_decay.{tower}: must be in (0, 1] (1 = off), got {decay}")

    def _check_numbers(self) -> None:
        """A NaN, infinite or negative learning rate (or schedule value) would poison the weights at the first step."""
        lr, param = self.lr, self.param
        for key, value in (("optim.lr.init", lr.init), ("optim.lr.min_lr", lr.min_lr),
                           ("optim.lr.warmup_lr", lr.warmup_lr), ("optim.lr.lr_decay_rate", lr.lr_decay_rate),
                           ("optim.lr.param.min_lr_scale", lr.param.min_lr_scale),
                           ("optim.lr.param.num_cycles", lr.param.num_cycles),
                           ("optim.param.weight_decay", param.weight_decay), ("optim.param.eps", param.eps),
                           ("optim.param.momentum", param.momentum), ("optim.grad_clip", self.grad_clip)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}: must be a finite number >= 0, got {value}")
        if not 0 <= lr.warmup_proportion <= 1:  # NaN fails this too
            raise ConfigError(f"optim.lr.warmup_proportion: must be in [0, 1], got {lr.warmup_proportion}")
        if lr.warmup_steps is not None and lr.warmup_steps < 0:
            raise ConfigError(f"optim.lr.warmup_steps: must be >= 0 or null, got {lr.warmup_steps}")
        for index, beta in enumerate(param.betas):
            if not 0 <= beta < 1:
                raise ConfigError(f"optim.param.betas[{index}]: must be in [0, 1), got {beta}")
