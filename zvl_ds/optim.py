"""Optimizer construction: parameter groups with or without weight decay."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from zvl_ds.config import OptimConfig

# Parameters that should not be pulled towards zero: biases and norm gains (all 1-d), the temperature, and the
# ViT's learned tokens and position embeddings. ZeroVL lists the same rule but leaves it commented out.
_NO_DECAY_NAME_PARTS = ("pos_embed", "cls_token", "mask_token", "temperature", "position_embeddings")


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim > 1 and not any(part in name for part in _NO_DECAY_NAME_PARTS)


def parameter_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> List[Dict]:
    """Trainable parameters split into a decay and a no-decay group (one group when ``decay_all``)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_all:
        return [{"params": [p for _, p in trainable], "weight_decay": weight_decay, "group_name": "all"}]
    decay = [p for n, p in trainable if uses_weight_decay(n, p)]
    no_decay = [p for n, p in trainable if not uses_weight_decay(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay, "group_name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "group_name": "no_decay"}]
    return [g for g in groups if g["params"]]


def kernel_options(implementation: str, device: torch.device) -> Dict[str, bool]:
    """torch optimizer flags for ``optim.implementation`` on ``device``.

    ``auto`` keeps CPU runs on the plain loop (bit-for-bit what they always were) and takes the fused kernel on
    CUDA, where one launch per parameter group replaces several per tensor. DeepSpeed hands the optimizer its
    own flat fp32 partitions (ZeRO 1/2) or the module's parameters, all on one device, which both kernels accept.
    """
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "plain"
    if implementation == "fused":
        return {"fused": True}
    if implementation == "foreach":
        return {"foreach": True}
    return {"foreach": False}


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, device: Optional[torch.device] = None
                    ) -> torch.optim.Optimizer:
    """A torch optimizer instance (handed to DeepSpeed, which avoids its fused-Adam JIT build on CPU).

    ``device`` is where the parameters will live once DeepSpeed has placed the model (it picks the kernel).
    """
    kernel = kernel_options(optim_cfg.implementation, device or torch.device("cpu"))
    params = optim_cfg.param
    groups = parameter_groups(model, params.weight_decay, optim_cfg.decay_all)
    if not groups:
        raise ValueError("the model has no trainable parameters (both towers and projections frozen?)")
    lr = optim_cfg.lr.init
    if optim_cfg.name.endswith("AdamW"):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(params.betas), eps=params.eps, **kernel)
    return torch.optim.SGD(groups, lr=lr, momentum=params.momentum, **kernel)
