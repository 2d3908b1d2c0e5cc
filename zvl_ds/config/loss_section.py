"""The ``loss:`` section: InfoNCE, ZeroVL's mixup NCE or SigLIP, the temperature, the gather and the logits tiling;
with the checks that concern this section alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from zvl_ds.base.errors import ConfigError


@dataclass
class NCELossOptions:
    gather_backward: bool = True
    """`clip` runner only. `true`: gradients flow back through the gathered embeddings (the exact full-batch gradient);
    `false`: ZeroVL's plain gather (gathered embeddings are constants). `clip_bsgs` is always exact.
    """


@dataclass
class TemperatureConfig:
    name: Literal["constant", "parameter"] = "constant"
    """`constant`: a fixed tau; `parameter`: a learnable tau (the model parameter `tau`, saved with the weights)."""
    value: float = 0.02
    """tau (fixed, or the learnable one's initial value); the logits are DIVIDED by it."""
    min: float = 0.001
    """Lower clamp of tau at every use (need 0 < min <= value <= max)."""
    max: float = 0.5
    """Upper clamp of tau at every use."""

    def check(self) -> None:
        if not 0 < self.min <= self.value <= self.max:
            raise ConfigError(f"loss.temperature: need 0 < min <= value <= max, got min={self.min} "
                              f"value={self.value} max={self.max}")


@dataclass
class MixupConfig:
    beta: float = 0.1
    """`MixUpNCE` only: lambda ~ Beta(beta, beta), drawn once per step from `(seed, step)`; must be > 0."""


@dataclass
class SigmoidConfig:
    scale_init: float = 10.0
    """`SigLIP` only: initial scale t multiplying the similarities (learned as log t, parameter `logit_scale_log`);
    must be > 0.
    """
    bias_init: float = -10.0
    """`SigLIP` only: initial bias b added to every logit (parameter `logit_bias`)."""


@dataclass
class LossConfig:
    name: Literal["NCE", "MixUpNCE", "SigLIP"] = "NCE"
    """`NCE`: symmetric InfoNCE over the global batch; `MixUpNCE`: ZeroVL's coin-flip mixup (each step mixes either
    images or texts with a partner, soft targets); `SigLIP`: the pairwise sigmoid loss (see Choosing a loss).
    """
    group_size: int = -1
    """Accepted for ZeroVL configs; only -1 (gather over the whole world) is implemented, another value is an error."""
    smoothing: float = 0.0
    """Accepted for ZeroVL configs; only 0.0 is implemented (no label smoothing), another value is an error."""
    nce_loss: NCELossOptions = field(default_factory=NCELossOptions)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    chunk_rows: int = 1024
    """Rows of the logits matrix computed at once (memory knob); the result is exact whatever the value."""
    chunk_cols: int = 0
    """Columns of a logits tile: > 0 holds chunk_rows x chunk_cols logits whatever the batch (online log-sum-exp; with
    gather-backward both softmax directions come from the same tiles, 4 matmuls per tile instead of 6 for two row
    passes); 0: whole rows (chunk_rows x B).
    """
    sigmoid: SigmoidConfig = field(default_factory=SigmoidConfig)

    def check(self) -> None:
        self.temperature.check()
        # ZeroVL's keys with no implementation here: refuse a value that would otherwise be silently ignored
        if self.smoothing != 0.0:
            raise ConfigError(f"loss.smoothing={self.smoothing}: label smoothing is not implemented (ZeroVL leaves "
                              "it at 0.0 too); remove the key or set it to 0.0")
        if self.group_size != -1:
            raise ConfigError(f"loss.group_size={self.group_size}: only -1 (gather over the whole world) is "
                              "implemented")
        if self.chunk_rows < 1:
            raise ConfigError(f"loss.chunk_rows: must be >= 1, got {self.chunk_rows}")
        if self.chunk_cols < 0:
            raise ConfigError(f"loss.chunk_cols: must be >= 0 (0 = whole rows), got {self.chunk_cols}")
        if self.name == "SigLIP":
            self._check_sigmoid()
        if self.name == "MixUpNCE" and self.mixup.beta <= 0:
            raise ConfigError(f"loss.mixup.beta: must be > 0, got {self.mixup.beta}")

    def _check_sigmoid(self) -> None:
        if self.sigmoid.scale_init <= 0:
            raise ConfigError(f"loss.sigmoid.scale_init: must be > 0 (it is learned as its log), got "
                              f"{self.sigmoid.scale_init}")
        # With plain gather the gathered texts are constants, and SigLIP has no text->image direction to give the
        # text tower a gradient through its own rows: it would not learn at all.
        if not self.nce_loss.gather_backward:
            raise ConfigError("loss.nce_loss.gather_backward=false with loss.name=SigLIP: the text tower would get no "
                              "gradient; use true (exact) or the clip_bsgs runner")
        if self.temperature.name == "parameter":
            raise ConfigError("loss.temperature.name=parameter with loss.name=SigLIP: SigLIP learns its own scale "
                              "(loss.sigmoid.scale_init), the temperature would never move; use constant")
