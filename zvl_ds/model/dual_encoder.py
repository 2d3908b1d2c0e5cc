"""The dual encoder: image and text towers, projections to a shared L2-normalised space, and the temperature.

Attributes: ``image_tower`` (timm model, ``num_classes=0``), ``text_tower`` (``transformers.AutoModel``, no
pooler), ``image_projection`` / ``text_projection`` (``towers.build_projection``), and the temperature, read
through ``temperature()``: a learnable ``nn.Parameter`` named ``tau`` of shape (1,) for ``parameter`` (never
0-dim: DeepSpeed cannot broadcast 0-dim parameters), or a fresh fp32 tensor of shape (1,) for ``constant``
(not a parameter, not in the state dict, never cast to bf16 by an engine). Either way it is clamped to
``[loss.temperature.min, loss.temperature.max]`` at every use and DIVIDES the logits. Another library's whole
model as towers is ``zvl_ds.model.sources``; ``zvl_ds.model.build.build_model`` builds either from a config.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zvl_ds.config import SigmoidConfig, TemperatureConfig
from zvl_ds.model.mixing import MixupDraw, mix_images, mix_with_reversed
from zvl_ds.model.weights_files import WeightsReport
from zvl_ds.observe.profile_ranges import profile_range

# L2 normalisation guard, as ZeroVL's x / (|x| + 1e-8)
_NORM_EPS = 1e-8


def _key_padding_mask(text_tower: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask handed to the text tower: for SDPA, the boolean [n, 1, 1, length] mask transformers would build.

    From a 2-d mask, transformers first asks whether any token is padded (``mask.all()``) to skip the mask: a
    host-device synchronisation in every forward of every chunk. A 4-d mask is taken as it is.
    """
    if getattr(getattr(text_tower, "config", None), "_attn_implementation", None) != "sdpa":
        return attention_mask
    return attention_mask[:, None, None, :].bool()


class DualEncoder(nn.Module):
    """Image and text towers with projections to a shared, L2-normalised space, plus the temperature."""

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, image_projection: nn.Module,
                 text_projection: nn.Module, temperature: TemperatureConfig, *, text_pooling: str = "cls",
                 target_token_idx: int = 0, image_only_cls_token: bool = True,
                 image_trainable: bool = True, text_trainable: bool = True,
                 sigmoid: Optional[SigmoidConfig] = None) -> None:
        super().__init__()
        if text_pooling not in ("cls", "mean"):
            raise ValueError(f"model.text_encoder.pooling: unknown pooling {text_pooling!r} (valid: cls, mean)")
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_projection = image_projection
        self.text_projection = text_projection
        self.text_pooling = text_pooling
        self.target_token_idx = target_token_idx
        self.image_only_cls_token = image_only_cls_token
        self.temperature_min = float(temperature.min)
        self.temperature_max = float(temperature.max)
        self.temperature_learnable = temperature.name == "parameter"
        if self.temperature_learnable:
            self.tau = nn.Parameter(torch.full((1,), float(temperature.value)))
        else:
            self.temperature_constant = float(temperature.value)
        # SigLIP's scale (learned as its log, so it stays positive) and bias; shape (1,) like tau, for DeepSpeed
        self.sigmoid_loss = sigmoid is not None
        if self.sigmoid_loss:
            self.logit_scale_log = nn.Parameter(torch.full((1,), math.log(sigmoid.scale_init)))
            self.logit_bias = nn.Parameter(torch.full((1,), float(sigmoid.bias_init)))
        # LiT-style locked towers: no gradients, and kept in eval mode (fixed BatchNorm statistics, no dropout)
        self.frozen_towers = [name for name, trainable in (("image_tower", image_trainable),
                                                            ("text_tower", text_trainable)) if not trainable]
        for name in self.frozen_towers:
            getattr(self, name).requires_grad_(False)
        # BatchNorm layers of partly locked towers whose statistics stay fixed (model.locking, freeze_bn_stats)
        self.frozen_norm_modules: List[str] = []
        self.image_weights_report: Optional[WeightsReport] = None
        self.train(True)

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        for name in getattr(self, "frozen_towers", []) + getattr(self, "frozen_norm_modules", []):
            self.get_submodule(name).eval()
        return self

    def temperature(self) -> torch.Tensor:
        """tau, shape (1,), clamped to the configured range; differentiable when learnable."""
        if self.temperature_learnable:
            return self.tau.clamp(self.temperature_min, self.temperature_max)
        device = next(self.parameters()).device
        value = min(max(self.temperature_constant, self.temperature_min), self.temperature_max)
        return torch.full((1,), value, dtype=torch.float32, device=device)

    def logit_scale_bias(self) -> Optional[torch.Tensor]:
        """(t, b) of the sigmoid loss, shape (2,), differentiable; None when the model has no sigmoid loss."""
        if not self.sigmoid_loss:
            return None
        return torch.cat([self.logit_scale_log.exp(), self.logit_bias])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled features [n, width], before projection."""
        features = self.image_tower(images)
        if features.dim() == 3:  # a tower that returns tokens: ZeroVL's vit.only_cls_token takes token 0
            features = features[:, 0] if self.image_only_cls_token else features.mean(dim=1)
        return features

    def text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The text tower's pooled features [n, width], before projection: token ``target_token_idx`` (cls) or
        the attention-masked mean of the last hidden states (mean)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_tower(input_ids=input_ids,
                                 attention_mask=_key_padding_mask(self.text_tower, attention_mask)).last_hidden_state
        if self.text_pooling == "cls":
            return hidden[:, self.target_token_idx]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def encode_image(self, images: torch.Tensor, mixup: Optional[MixupDraw] = None) -> torch.Tensor:
        """L2-normalised image embeddings [n, dim]; an image-side mixup mixes the pixels of THIS batch with its
        reverse first."""
        if mixup is not None and mixup.side == "image":
            images = mix_images(images, mixup.lam)
        return F.normalize(self.image_projection(self.image_features(images)), dim=-1, eps=_NORM_EPS)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    mixup: Optional[MixupDraw] = None) -> torch.Tensor:
        """L2-normalised text embeddings [n, dim]; a text-side mixup mixes the projected embeddings of THIS
        batch with their reverse, before normalisation ("manifold" mixup, as ZeroVL)."""
        projected = self.text_projection(self.text_features(input_ids, attention_mask))
        if mixup is not None and mixup.side == "text":
            projected = mix_with_reversed(projected, mixup.lam)
        return F.normalize(projected, dim=-1, eps=_NORM_EPS)

    def forward(self, images: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, mixup: Optional[MixupDraw] = None
                ) -> Dict[str, Optional[torch.Tensor]]:
        """``{"image_embeds", "text_embeds", "temperature", "logit_scale_bias"}``; a modality not given is None,
        and so is ``logit_scale_bias`` for the softmax losses."""
        with profile_range("zvl.model_forward"):  # the engine's own work around it shows as the difference
            return {
                "image_embeds": None if images is None else self.encode_image(images, mixup),
                "text_embeds": None if input_ids is None else self.encode_text(input_ids, attention_mask, mixup),
                "temperature": self.temperature(),
                "logit_scale_bias": self.logit_scale_bias(),
            }


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_summary(model: DualEncoder) -> Dict[str, Dict[str, int]]:
    """Parameter counts per part (total and trainable), for logs."""
    parts = {"image_tower": model.image_tower, "text_tower": model.text_tower,
             "image_projection": model.image_projection, "text_projection": model.text_projection}
    summary = {name: {"total": count_parameters(m), "trainable": count_parameters(m, True)}
               for name, m in parts.items()}
    summary["all"] = {"total": count_parameters(model), "trainable": count_parameters(model, True)}
    return summary
