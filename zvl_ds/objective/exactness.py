"""A plain-PyTorch full-batch reference for the distributed step, and the comparison against it.

The reference shares nothing with ``objective/step.py`` or the loss kernels: one process holds the whole global
batch, one autograd graph spans every chunk of every rank, and the loss is ``dense_reference``'s symmetric InfoNCE with
soft targets (or its dense pairwise sigmoid loss for a SigLIP model). Dropout is replayed by seeding each rank's
chunks as the trainer does (``runner.stable_random: step``), so masks are identical and the two computations
must agree to rounding. The per-rank, per-step seeds are derived here from their documented definition, not
through the trainer's ``step_seed``: a seeding fault in the trainer (every rank drawing the same masks, say)
makes the two disagree instead of agreeing with itself. Patch dropout
(``model.image_encoder.patch_dropout``) draws its kept patches from the same generator, so the reference drops the
patches the distributed step dropped in both of its passes. With distillation, the teacher's embeddings of the
whole batch (computed by the caller, in one process) enter ``dense_reference``'s distillation term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from zvl_ds.model.mixing import MixupDraw
from zvl_ds.objective.dense_reference import (dense_contrastive_loss, dense_sigmoid_distillation, dense_sigmoid_loss,
                                              dense_softmax_distillation)


@dataclass
class ReferenceDistillation:
    """The distillation term of the reference: the teacher's embeddings of the whole global batch, in rank order,
    and the weights, scale and bias of ``distill:``."""

    image: torch.Tensor  # [B, d_T]
    text: torch.Tensor  # [B, d_T]
    scale: float
    bias: Optional[float]
    weight: float
    contrastive_weight: float
    sigmoid_target: str = "bce"

    def combined(self, own: torch.Tensor, image: torch.Tensor, text: torch.Tensor, temperature: Optional[torch.Tensor],
                 scale_bias: Optional[torch.Tensor]) -> torch.Tensor:
        teacher_image, teacher_text = self.image.to(image), self.text.to(image)
        if scale_bias is not None:
            distilled = dense_sigmoid_distillation(image, text, scale_bias[0], scale_bias[1], teacher_image,
                                                   teacher_text, self.scale, self.bias, self.sigmoid_target)
        else:
            distilled = dense_softmax_distillation(image, text, temperature, teacher_image, teacher_text, self.scale)
        return self.contrastive_weight * own + self.weight * distilled


def reference_rank_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of ``rank`` at optimizer step ``step``, as `runner.stable_random: step` defines it: the first 64 bits that numpy's
    ``SeedSequence`` draws from the entropy ``(seed, step, rank)``, top bit cleared (torch takes a signed 64-bit
    seed). Assembled from two 32-bit words, low word first, as SeedSequence lays out its 64-bit state."""
    low, high = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32).tolist()
    return ((high & 0x7FFFFFFF) << 32) | low


def reference_partner(global_batch: int, world_size: int, chunk: int) -> torch.Tensor:
    """Each sample's mixup partner: the mirror position inside its rank's chunk, written out by loops."""
    per_rank = global_batch // world_size
    partner = torch.empty(global_batch, dtype=torch.long)
    for rank in range(world_size):
        for chunk_start in range(0, per_rank, chunk):
            for offset in range(chunk):
                partner[rank * per_rank + chunk_start + offset] = rank * per_rank + chunk_start + chunk - 1 - offset
    return partner


def reference_loss(model: nn.Module, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   *, world_size: int, chunk: int, seed: int, step: int, mixup: Optional[MixupDraw],
                   replay_rng: bool = True, distillation: Optional[ReferenceDistillation] = None) -> torch.Tensor:
    """Full-batch loss with autograd through every chunk; ``images`` are already normalised floats (the student's
    view). ``distillation``: the teacher's term added with its weights."""
    per_rank = images.shape[0] // world_size
    image_parts: List[torch.Tensor] = []
    text_parts: List[torch.Tensor] = []
    temperature = scale_bias = None
    for rank in range(world_size):
        if replay_rng:
            torch.manual_seed(reference_rank_seed(seed, step, rank))
        for start in range(rank * per_rank, (rank + 1) * per_rank, chunk):
            out = model(images=images[start:start + chunk], input_ids=input_ids[start:start + chunk],
                        attention_mask=attention_mask[start:start + chunk], mixup=mixup)
            image_parts.append(out["image_embeds"].float())
            text_parts.append(out["text_embeds"].float())
            temperature = out["temperature"].float() if temperature is None else temperature
            if scale_bias is None and out.get("logit_scale_bias") is not None:
                scale_bias = out["logit_scale_bias"].float()
    image, text = torch.cat(image_parts), torch.cat(text_parts)
    if scale_bias is not None:  # a model built for SigLIP
        own = dense_sigmoid_loss(image, text, scale_bias[0], scale_bias[1])
    else:
        partner = reference_partner(images.shape[0], world_size, chunk) if mixup is not None else None
        own = dense_contrastive_loss(image, text, temperature, None if mixup is None else mixup.lam, partner)
    if distillation is None:
        return own
    return distillation.combined(own, image, text, temperature, scale_bias)


@dataclass
class GroupDifference:
    group: str
    max_abs_diff: float
    reference_max: float

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.reference_max, MAGNITUDE_FLOOR)


def parameter_group(name: str) -> str:
    """Coarse groups for the report: image tower, text tower, projections, temperature, sigmoid scale/bias, other."""
    for key, group in (("logit_scale_log", "sigmoid scale/bias"), ("logit_bias", "sigmoid scale/bias"),
                       ("tau", "temperature"), ("temperature", "temperature"), ("image_projection", "image projection"),
                       ("text_projection", "text projection"), ("image", "image tower"), ("text", "text tower")):
        if key in name:
            return group
    return "other"


# Some tensors are zero in exact arithmetic (attention key biases receive no gradient: softmax ignores a shift
# of every key by the same vector), so their "largest magnitude" is rounding noise near 1e-12; they are compared
# against this absolute floor instead.
MAGNITUDE_FLOOR = 1e-4


def compare_tensors(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per tensor: max |actual - expected| / max(max |expected|, MAGNITUDE_FLOOR)."""
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise KeyError(f"tensors missing from the result: {missing[:5]}")
    return {name: float((actual[name].float() - ref.float()).abs().max()
                        / max(float(ref.abs().max()), MAGNITUDE_FLOOR))
            for name, ref in expected.items()}


def compare_by_group(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> List[GroupDifference]:
    groups: Dict[str, GroupDifference] = {}
    for name, ref in expected.items():
        diff = float((actual[name].float() - ref.float()).abs().max())
        group = groups.setdefault(parameter_group(name), GroupDifference(parameter_group(name), 0.0, 0.0))
        group.max_abs_diff = max(group.max_abs_diff, diff)
        group.reference_max = max(group.reference_max, float(ref.abs().max()))
    return sorted(groups.values(), key=lambda g: g.group)
