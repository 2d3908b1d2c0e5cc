"""Optimizer construction: parameter groups with or without weight decay."""
from __future__ import annotations

from typing import Dict, List

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


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    """A torch optimizer instance (handed to DeepSpeed, which avoids its fused-Adam JIT build on CPU)."""
    params = optim_cfg.param
    groups = parameter_groups(model, params.weight_decay, optim_cfg.decay_all)
    if not groups:
        raise ValueError("the model has no trainable parameters (both towers and projections frozen?)")
    lr = optim_cfg.lr.init
    if optim_cfg.name.endswith("AdamW"):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(params.betas), eps=params.eps)
    return torch.optim.SGD(groups, lr=lr, momentum=params.momentum)
