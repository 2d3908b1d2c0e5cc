"""Optimizer construction: parameter groups by weight decay and by learning-rate scale.

Each group carries ``lr_scale``: the multiple of the schedule's learning rate it receives
(``engine.set_learning_rate``). The scale of a parameter is its part's multiplier (``optim.lr_mult`` /
``optim.lr_abs``) times, inside a tower with blocks (timm ViT ``blocks.N``, BERT ``encoder.layer.N``, Hugging Face
CLIP/SigLIP ``encoder.layers.N``, OpenCLIP ``transformer.resblocks.N``) with ``optim.layer_decay`` < 1, ``decay ** (L + 1 - layer)``
with layer 0 the embeddings, layer i + 1 block i and layer L + 1 what follows the last block (EVA-CLIP's rule).
Parameters with equal decay and scale share a group, so the default config keeps ZeroVL's two groups.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from zvl_ds.config import ConfigError, OptimConfig

# Parameters that should not be pulled towards zero: biases and norm gains (all 1-d), the temperature, and the
# ViT's learned tokens and position embeddings. ZeroVL lists the same rule but leaves it commented out.
# Hugging Face CLIP/SigLIP call theirs position_embedding, OpenCLIP positional_embedding and class_embedding.
_NO_DECAY_NAME_PARTS = ("pos_embed", "cls_token", "mask_token", "temperature", "position_embedding",
                        "positional_embedding", "class_embedding")


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


# parameter-name prefix -> the part whose learning rate it follows
_PART_OF_PREFIX = {"image_tower.": "image_tower", "text_tower.": "text_tower", "image_projection.": "projection",
                   "text_projection.": "projection", "tau": "temperature"}

# per tower: (name prefix of layer 0, pattern of the blocks with their index, how to count the blocks)
_VIT_EMBEDDINGS = ("cls_token", "reg_token", "mask_token", "pos_embed", "patch_embed.")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_BERT_EMBEDDINGS = ("embeddings.",)
_BERT_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.")
# Hugging Face CLIP / SigLIP vision and text models (model.arch hf_clip / hf_siglip)
_HF_CLIP_EMBEDDINGS = ("embeddings.", "pre_layrnorm.")
_HF_CLIP_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.")
# OpenCLIP's vision and text transformers (model.arch open_clip)
_OPEN_CLIP_EMBEDDINGS = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "token_embedding.")
_OPEN_CLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def model_part(name: str) -> Optional[str]:
    """The part (``optim.lr_mult`` key) a parameter belongs to; None for anything else (scale 1)."""
    for prefix, part in _PART_OF_PREFIX.items():
        if name.startswith(prefix):
            return part
    return None


def part_lr_scales(optim_cfg: OptimConfig) -> Dict[str, float]:
    """Each part's multiple of the schedule's learning rate; an absolute LR counts relative to ``lr.init``."""
    scales = {}
    for part in ("image_tower", "text_tower", "projection", "temperature"):
        absolute = getattr(optim_cfg.lr_abs, part)
        scales[part] = absolute / optim_cfg.lr.init if absolute is not None else getattr(optim_cfg.lr_mult, part)
    return scales


def _tower_layout(tower: nn.Module) -> Optional[Tuple[Tuple[str, ...], "re.Pattern", int]]:
    """(layer-0 prefixes, block pattern, number of blocks) of a ViT or BERT-like tower; None otherwise."""
    blocks = getattr(tower, "blocks", None)
    if hasattr(tower, "patch_embed") and isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return _VIT_EMBEDDINGS, _VIT_BLOCK, len(blocks)
    layers = getattr(getattr(tower, "encoder", None), "layer", None)
    if hasattr(tower, "embeddings") and isinstance(layers, nn.ModuleList):
        return _BERT_EMBEDDINGS, _BERT_BLOCK, len(layers)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if hasattr(tower, "embeddings") and isinstance(layers, nn.ModuleList):
        return _HF_CLIP_EMBEDDINGS, _HF_CLIP_BLOCK, len(layers)
    resblocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if isinstance(resblocks, nn.ModuleList):
        return _OPEN_CLIP_EMBEDDINGS, _OPEN_CLIP_BLOCK, len(resblocks)
    return None


def layer_id(name: str, embedding_prefixes: Tuple[str, ...], block: "re.Pattern", num_blocks: int) -> int:
    """0 for the embeddings, i + 1 for block i, ``num_blocks + 1`` for the rest (final norm, pooling)."""
    if name.startswith(embedding_prefixes):
        return 0
    match = block.match(name)
    return int(match.group(1)) + 1 if match else num_blocks + 1


def layer_decay_scales(model: nn.Module, optim_cfg: OptimConfig) -> Dict[str, float]:
    """``{parameter name: decay ** (L + 1 - layer)}`` for the towers with ``optim.layer_decay`` < 1."""
    scales: Dict[str, float] = {}
    for tower_name in ("image_tower", "text_tower"):
        decay = getattr(optim_cfg.layer_decay, tower_name)
        if decay == 1.0:
            continue
        tower = getattr(model, tower_name, None)
        layout = _tower_layout(tower) if tower is not None else None
        if layout is None:
            kind = "ViT (timm blocks.N)" if tower_name == "image_tower" else "BERT-like (encoder.layer.N)"
            raise ConfigError(f"optim.layer_decay.{tower_name}={decay} needs a {kind}, Hugging Face CLIP/SigLIP "
                              f"(encoder.layers.N) or OpenCLIP (transformer.resblocks.N) tower; this "
                              f"{type(tower).__name__} has no such blocks (set it to 1.0)")
        prefixes, block, num_blocks = layout
        for name, _ in tower.named_parameters():
            depth = num_blocks + 1 - layer_id(name, prefixes, block, num_blocks)
            scales[f"{tower_name}.{name}"] = decay ** depth
    return scales


def optimizer_groups(model: nn.Module, optim_cfg: OptimConfig) -> List[Dict]:
    """The trainer's optimizer groups: ``parameter_groups`` split further by learning-rate scale.

    Every group has ``lr_scale``; with every scale 1 the result is exactly ``parameter_groups``. Groups come in a
    fixed order (by weight decay, then by first parameter), so a resumed run rebuilds the same groups.
    """
    params = optim_cfg.param
    base = parameter_groups(model, params.weight_decay, optim_cfg.decay_all)
    parts = part_lr_scales(optim_cfg)
    layers = layer_decay_scales(model, optim_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups: List[Dict] = []
    for group in base:
        by_scale: Dict[float, List[nn.Parameter]] = {}
        for param in group["params"]:
            name = names[id(param)]
            part = model_part(name)
            scale = (parts[part] if part else 1.0) * layers.get(name, 1.0)
            by_scale.setdefault(scale, []).append(param)
        for scale, members in by_scale.items():
            suffix = "" if scale == 1.0 else f"@lr_x{scale:.6g}"
            groups.append({**group, "params": members, "lr_scale": scale, "group_name": group["group_name"] + suffix})
    return groups


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
    groups = optimizer_groups(model, optim_cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters (both towers and projections frozen?)")
    lr = optim_cfg.lr.init
    if optim_cfg.name.endswith("AdamW"):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(params.betas), eps=params.eps, **kernel)
    return torch.optim.SGD(groups, lr=lr, momentum=params.momentum, **kernel)
