"""Partial locking: freeze a tower except its last N groups of blocks (OpenCLIP's ``--lock-image-unlocked-groups`` and
``--lock-text-unlocked-layers``).

A tower is locked by groups: its parameters in ordered groups of blocks, from the input side to the output side
(``block_groups``). Freezing a group sets ``requires_grad = False`` on its parameters, so they get no gradient and
``runtime.optim`` leaves them out of the optimizer; since the lock is applied when the model is built from its
config, a resumed run (and every ZeRO stage, which partitions only what the optimizer holds) sees the same split.

How a tower tells its groups (the one thing a new tower implements to support locking):

- a tower with a method ``block_groups(self) -> List[List[str]]`` (parameter names relative to the tower, input
  side first, every trainable parameter in one group) is asked first: a wrapper around an HF CLIP/SigLIP or an
  open_clip tower implements this;
- a timm model: timm's own grouping (``group_matcher``, as timm's layer-decay and OpenCLIP use it): for a ViT the
  stem (patch and position embeddings, class token), then each block, the final norm joining the last block;
- a Hugging Face encoder (BERT-like: ``embeddings`` and ``encoder.layer`` or ``encoder.layers``): the embeddings,
  then each layer, then what follows the layers (a final norm or pooler) if the model has anything there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

from torch import nn

from zvl_ds.config import ConfigError


def _timm_groups(tower: nn.Module) -> List[List[str]]:
    from timm.models import group_parameters

    grouped = group_parameters(tower, tower.group_matcher())
    return [list(grouped[index]) for index in sorted(grouped)]


def _encoder_layers(tower: nn.Module) -> Optional[nn.ModuleList]:
    encoder = getattr(tower, "encoder", None)
    for name in ("layer", "layers"):
        layers = getattr(encoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def _hf_encoder_groups(tower: nn.Module) -> List[List[str]]:
    layers = _encoder_layers(tower)
    layer_attr = "layer" if getattr(tower.encoder, "layer", None) is layers else "layers"
    groups = [[f"embeddings.{name}" for name, _ in tower.embeddings.named_parameters()]]
    groups += [[f"encoder.{layer_attr}.{index}.{name}" for name, _ in layer.named_parameters()]
               for index, layer in enumerate(layers)]
    grouped = {name for group in groups for name in group}
    rest = [name for name, _ in tower.named_parameters() if name not in grouped]
    return groups + ([rest] if rest else [])


def block_groups(tower: nn.Module) -> List[List[str]]:
    """The tower's parameter names in ordered groups of blocks, input side first (see the module's docstring)."""
    own: Optional[Callable[[], List[List[str]]]] = getattr(tower, "block_groups", None)
    if callable(own):
        return [list(group) for group in own()]
    if callable(getattr(tower, "group_matcher", None)):
        return _timm_groups(tower)
    if isinstance(getattr(tower, "embeddings", None), nn.Module) and _encoder_layers(tower) is not None:
        return _hf_encoder_groups(tower)
    raise ConfigError(f"{type(tower).__name__} does not tell its groups of blocks (no block_groups() method, no timm "
                      "group_matcher, no Hugging Face embeddings + encoder layers), so it cannot be locked by groups")


@dataclass
class TowerLock:
    """What locking did to one tower: the number of groups, how many stayed unlocked, what is frozen."""

    groups: int
    unlocked: int
    frozen_parameters: List[str] = field(default_factory=list)
    frozen_norm_modules: List[str] = field(default_factory=list)  # kept in eval mode (BatchNorm statistics)


def _norm_parameter_names(tower: nn.Module, kinds) -> set:
    return {f"{module_name}.{name}" if module_name else name
            for module_name, module in tower.named_modules() if isinstance(module, kinds)
            for name, _ in module.named_parameters(recurse=False)}


def lock_tower(tower: nn.Module, unlocked: int, key: str, *, freeze_bn_stats: bool = False,
               keep_layer_norm_trainable: bool = False) -> TowerLock:
    """Freeze every group of ``tower`` but the last ``unlocked``; ``key`` names the config key in errors.

    ``freeze_bn_stats``: BatchNorm layers whose parameters are all frozen are reported in ``frozen_norm_modules``
    (the model keeps them in eval mode, so their running statistics stay). ``keep_layer_norm_trainable``: the
    LayerNorms of frozen groups stay trainable (OpenCLIP's text-tower lock without ``--lock-text-freeze-layer-norm``).
    """
    groups = block_groups(tower)
    if unlocked > len(groups):
        raise ConfigError(f"{key}={unlocked}, but this {type(tower).__name__} has {len(groups)} groups of blocks "
                          f"(at most {len(groups)}; 0 freezes them all)")
    locked = [name for group in groups[:len(groups) - unlocked] for name in group]
    if keep_layer_norm_trainable:
        layer_norms = _norm_parameter_names(tower, nn.LayerNorm)
        locked = [name for name in locked if name not in layer_norms]
    for name in locked:
        tower.get_parameter(name).requires_grad_(False)
    frozen_norms: List[str] = []
    if freeze_bn_stats:
        frozen = set(locked)
        for name, module in tower.named_modules():
            own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and own and all(p in frozen for p in own):
                frozen_norms.append(name)
    return TowerLock(groups=len(groups), unlocked=unlocked, frozen_parameters=locked,
                     frozen_norm_modules=frozen_norms)


def lock_towers(model: nn.Module, model_cfg) -> dict:
    """Apply ``model.image_encoder.unlocked_groups`` and ``model.text_encoder.unlocked_layers`` to a built
    ``DualEncoder``; returns ``{tower attribute: TowerLock}`` for the towers locked. BatchNorm layers whose statistics
    stay frozen are added to ``model.frozen_norm_modules`` (the model keeps them in eval mode)."""
    image, text = model_cfg.image_encoder, model_cfg.text_encoder
    locks = {}
    if image.unlocked_groups is not None:
        locks["image_tower"] = lock_tower(model.image_tower, image.unlocked_groups, "model.image_encoder.unlocked_groups",
                                          freeze_bn_stats=image.freeze_bn_stats)
    if text.unlocked_layers is not None:
        locks["text_tower"] = lock_tower(model.text_tower, text.unlocked_layers, "model.text_encoder.unlocked_layers",
                                         keep_layer_norm_trainable=not text.freeze_layer_norm)
    for tower, lock in locks.items():
        model.frozen_norm_modules.extend(f"{tower}.{name}" for name in lock.frozen_norm_modules)
    return locks
