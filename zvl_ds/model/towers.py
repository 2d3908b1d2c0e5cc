"""The parts of a dual encoder built from configs: a timm image tower, a Hugging Face text tower, projections.

Nothing is downloaded: ``pretrained: true`` only uses weights already in the local Hugging Face / torch-hub
cache, and fails with a message saying where it looked; a path loads that file (``torch.load`` with
``weights_only=True``, or safetensors; ``zvl_ds.model.weights_files``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch.nn as nn

# any zvl_ds import runs zvl_ds/__init__.py first, which installs the torchvision shim timm needs
from zvl_ds.config import ImageEncoderConfig, TextEncoderConfig
from zvl_ds.model.weights_files import WeightsReport, cached_timm_weights, load_image_weights


def build_image_tower(cfg: ImageEncoderConfig) -> Tuple[nn.Module, int, Optional[WeightsReport]]:
    """A timm model without classifier; returns (tower, feature width, how its weights were loaded)."""
    import timm

    kwargs: Dict[str, Any] = dict(cfg.kwargs)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size

    def create(state: Optional[Dict] = None) -> nn.Module:
        if state is None:
            return timm.create_model(cfg.tag, pretrained=False, num_classes=0, **kwargs)
        # timm's pretrained path with an in-memory state dict: applies the model's checkpoint filter
        model = timm.create_model(cfg.tag, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"state_dict": state, "source": ""}, **kwargs)
        for attr in ("pretrained_cfg", "default_cfg"):
            if isinstance(getattr(model, attr, None), dict):
                getattr(model, attr).pop("state_dict", None)  # do not keep a second copy of the weights
        return model

    try:
        tower = create()
    except Exception as error:
        raise ValueError(f"model.image_encoder: timm cannot build {cfg.tag!r} with {kwargs}: {error}") from error
    report = None
    if cfg.pretrained is True:
        tower, report = load_image_weights(tower, cached_timm_weights(tower, cfg.tag), create)
    elif isinstance(cfg.pretrained, str) and cfg.pretrained:
        tower, report = load_image_weights(tower, cfg.pretrained, create)
    if cfg.grad_checkpointing:
        if not hasattr(tower, "set_grad_checkpointing"):
            raise ValueError(f"model.image_encoder.grad_checkpointing: timm model {cfg.tag!r} does not support it")
        tower.set_grad_checkpointing(True)
    return tower, int(tower.num_features), report


def _text_config(cfg: TextEncoderConfig):
    from transformers import AutoConfig

    fields = dict(cfg.config)
    if "model_type" in fields:
        return AutoConfig.for_model(**fields)
    try:
        config = AutoConfig.from_pretrained(cfg.tag, local_files_only=True, trust_remote_code=False)
    except OSError as error:
        raise FileNotFoundError(
            f"model.text_encoder: no config for {cfg.tag!r} in the local cache and no model_type in "
            f"model.text_encoder.config; nothing is downloaded ({error})") from error
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def _without_pooler(factory: Callable[..., nn.Module], *args, **kwargs) -> nn.Module:
    """BERT-like models take ``add_pooling_layer``; the pooler is unused (ZeroVL drops it too)."""
    try:
        return factory(*args, add_pooling_layer=False, **kwargs)
    except TypeError as error:
        if "add_pooling_layer" not in str(error):
            raise
        return factory(*args, **kwargs)


def build_text_tower(cfg: TextEncoderConfig, attention: str = "sdpa") -> Tuple[nn.Module, int]:
    """A Hugging Face ``AutoModel`` (local directory or already-cached name, or built from a config), with
    ``attention`` (``sdpa`` or ``eager``) as its attention implementation."""
    from transformers import AutoModel

    try:
        if cfg.pretrained is False:
            tower = _without_pooler(AutoModel.from_config, _text_config(cfg), attn_implementation=attention)
        else:
            source = cfg.pretrained if isinstance(cfg.pretrained, str) and cfg.pretrained else cfg.tag
            overrides = {k: v for k, v in cfg.config.items() if k != "model_type"}
            try:
                tower = _without_pooler(AutoModel.from_pretrained, source, local_files_only=True,
                                        trust_remote_code=False, attn_implementation=attention, **overrides)
            except OSError as error:
                raise FileNotFoundError(
                    f"model.text_encoder: cannot load {source!r} from a local directory or the local Hugging Face "
                    f"cache; nothing is downloaded ({error})") from error
    except ValueError as error:
        if "attn_implementation" not in str(error) and "sdpa" not in str(error).lower():
            raise
        raise ValueError(f"model.attention={attention}: the text tower does not support it ({error}); "
                         "use model.attention=eager") from error
    width = next((getattr(tower.config, name) for name in ("hidden_size", "d_model", "dim")
                  if isinstance(getattr(tower.config, name, None), int)), None)
    if width is None:
        raise ValueError(f"model.text_encoder: cannot tell the hidden width of {type(tower).__name__}")
    if cfg.grad_checkpointing:
        enable_hf_checkpointing(tower, "model.text_encoder.grad_checkpointing")
    return tower, int(width)


def enable_hf_checkpointing(tower: nn.Module, key: str) -> None:
    """Activation checkpointing in a transformers model; non-reentrant: works with frozen inputs and replays the
    dropout RNG state in the recompute."""
    if not getattr(tower, "supports_gradient_checkpointing", False):
        raise ValueError(f"{key}: {type(tower).__name__} does not support it")
    if hasattr(tower, "activation_checkpointing_enable"):  # transformers >= 5.x name
        tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_image_attention(tower: nn.Module, attention: str) -> None:
    """timm attention blocks read ``fused_attn`` at every call: ``sdpa`` turns on
    ``F.scaled_dot_product_attention`` explicitly instead of relying on timm's environment default."""
    for module in tower.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = attention == "sdpa"


def compile_towers(model: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` each tower in place (``mode`` from ``model.compile``; ``none`` leaves them eager).

    In place (``nn.Module.compile``), so parameter names, state dicts and checkpoints are unchanged. Only the
    towers are compiled: the projections, mixup and temperature are small, and the profiler ranges around the
    model stay outside the compiled graphs. Random ops inside a compiled tower draw their seeds from torch's
    global generator, so DGA's replay of a chunk's RNG state repeats dropout in pass 2. ``backend`` is
    torch.compile's (tests use ``aot_eager``: the same graph capture without inductor's code generation).
    """
    if mode == "none":
        return model
    for tower in (model.image_tower, model.text_tower):
        tower.compile(mode=None if mode == "default" or backend != "inductor" else mode, backend=backend)
    return model


def build_projection(kind: str, width: int, dim: int) -> nn.Module:
    """``simple``: Linear(width, dim, bias=False) as ZeroVL. ``mlp``: Linear(width, width) - GELU -
    Linear(width, dim, bias=False), a small non-linear head (not ZeroVL's unused, broken ``complex`` head)."""
    if kind == "simple":
        return nn.Linear(width, dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim, bias=False))
    raise ValueError(f"model.projection.name: unknown projection {kind!r} (valid: simple, mlp)")
