"""Patch dropout (FLIP): in training, each image keeps a random share of its patch tokens.

The image tower's ``patch_drop`` slot (timm's ViT family: after the position embeddings, before the blocks) gets
timm's ``PatchDropout``, which keeps the prefix tokens (class and register tokens) and a random
``max(1, int(patches * (1 - share)))`` patches per image, and does nothing in eval mode. A new tower supports patch
dropout by having such a ``patch_drop`` module slot.

Why it stays exact under DGA: the kept patches are drawn with ``torch.randn(..., device=tokens.device)``, from the
global generator of the device the tower runs on. The DGA runner (``objective/step.py``) snapshots that generator
(the CPU one and the CUDA one of the step's device) before each chunk of pass 1 and restores it before the chunk's
pass 2, so pass 2 drops exactly the patches of pass 1; the full-batch reference (``objective/exactness.py``) seeds
each rank's chunks as the trainer does and so draws the same masks.
"""
from __future__ import annotations

from torch import nn

from zvl_ds.config import ConfigError


def set_patch_dropout(tower: nn.Module, share: float) -> None:
    """Install patch dropout of ``share`` (in [0, 1); 0 leaves the tower as it is) in ``tower``'s ``patch_drop``."""
    if share == 0.0:
        return
    if not isinstance(getattr(tower, "patch_drop", None), nn.Module):
        raise ConfigError(f"model.image_encoder.patch_dropout={share}: {type(tower).__name__} has no patch_drop slot "
                          "(timm's ViT family has one); use a ViT image tower or set it to 0")
    from timm.layers import PatchDropout

    tower.patch_drop = PatchDropout(share, num_prefix_tokens=int(getattr(tower, "num_prefix_tokens", 1)))
