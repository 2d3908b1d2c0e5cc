"""Dual encoders whose towers are another library's whole model (``model.arch``: ``hf_clip``, ``hf_siglip``,
``open_clip``): the library's own towers, pooling and projections, its scale (and bias) as our temperature.

The towers pool as the library does, so before any step the normalised embeddings equal the library's own
(transformers' ``get_image_features`` / ``get_text_features``, open_clip's ``encode_image`` / ``encode_text``).
Everything else is the ordinary ``DualEncoder``: the DGA step, mixup, freezing, per-tower learning rates.

The checkpoint's logit scale s becomes the learnable temperature tau = 1 / exp(s) (refused when it falls outside
``loss.temperature.min`` / ``max``, which clamp tau at every use; ``zvl_ds.model.build``); with ``loss.name: SigLIP`` it becomes the log
scale ``logit_scale_log`` and the checkpoint's bias ``logit_bias``. A constant temperature stays the config's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from zvl_ds.model.dual_encoder import DualEncoder

TRANSFORMERS, OPEN_CLIP = "transformers", "open_clip"


@dataclass
class SourceParts:
    """What a source builder hands over: the towers (pooling themselves), projections and the scale (and bias)."""

    library: str  # TRANSFORMERS or OPEN_CLIP: how the towers are called
    image_tower: nn.Module
    text_tower: nn.Module
    image_projection: nn.Module
    text_projection: nn.Module
    logit_scale: float  # log of the multiplier of the similarities
    logit_bias: Optional[float]  # sigmoid models only
    source_config: Dict[str, Any] = field(default_factory=dict)  # what rebuilds the towers (exports record it)
    text_uses_mask: bool = True  # False: the tower reads every token, pads included (SigLIP, as it was trained)
    # projections that are parameters of the towers themselves (OpenCLIP's visual.proj, text.text_projection), by
    # tower attribute: model.projection.*_projector_trainable act on them
    tower_projections: Dict[str, List[str]] = field(default_factory=dict)


class LibraryDualEncoder(DualEncoder):
    """A ``DualEncoder`` over a library's towers, each of which returns its pooled features itself."""

    def __init__(self, parts: SourceParts, arch: str, **kwargs) -> None:
        super().__init__(parts.image_tower, parts.text_tower, parts.image_projection, parts.text_projection,
                         **kwargs)
        self.arch = arch
        self.library = parts.library
        self.source_config = parts.source_config
        self.text_uses_mask = parts.text_uses_mask
        self.tower_projections = parts.tower_projections

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.library == TRANSFORMERS:
            return self.image_tower(pixel_values=images).pooler_output
        return self.image_tower(images)

    def text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.library == TRANSFORMERS:
            mask = attention_mask if self.text_uses_mask else None
            return self.text_tower(input_ids=input_ids, attention_mask=mask).pooler_output
        return self.text_tower(input_ids)  # open_clip: padding is token 0, pooled at the end-of-text token


def temperature_of_scale(logit_scale: float) -> float:
    """tau = 1 / exp(s): the temperature that divides the logits as exp(s) multiplies them."""
    return math.exp(-logit_scale)
