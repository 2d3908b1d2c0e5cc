"""The mixup that happens inside a forward (ZeroVL ``MixUpNCE``): a batch mixed with its own reverse.

Images mix in pixel space (after augmentation and normalisation); texts mix as projected embeddings, before L2
normalisation ("manifold" mixup). One ``MixupDraw`` per optimizer step says which side and by how much; drawing it
and the matching contrastive targets are the objective's (``zvl_ds.objective.mixup``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MixupSide = Literal["image", "text"]


@dataclass(frozen=True)
class MixupDraw:
    """One step's mixup: the weight on the clean sample and which modality is mixed."""

    lam: float
    side: MixupSide

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"MixupDraw.lam must lie in [0, 1], got {self.lam}")
        if self.side not in ("image", "text"):
            raise ValueError(f"MixupDraw.side must be 'image' or 'text', got {self.side!r}")


def mix_with_reversed(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * x + (1 - lam) * x.flip(0)``: each row mixed with its mirror row of the same batch."""
    return lam * x + (1.0 - lam) * x.flip(0)


def mix_images(images: torch.Tensor, lam: float) -> torch.Tensor:
    """Pixel-space image mixup with the batch-reversed partner (after augmentation and normalisation)."""
    if images.dim() != 4:
        raise ValueError(f"mix_images expects a batch of images [n, C, H, W], got shape {tuple(images.shape)}")
    return mix_with_reversed(images, lam)
