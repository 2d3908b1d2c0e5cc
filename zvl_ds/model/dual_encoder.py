"""The dual encoder: a timm image tower, a Hugging Face text tower, projections, and the temperature (another
library's whole model as towers: ``zvl_ds.model.sources``).

Attributes: ``image_tower`` (timm model, ``num_classes=0``), ``text_tower`` (``transformers.AutoModel``, no
pooler), ``image_projection`` / ``text_projection`` (see ``build_projection``), and the temperature, read
through ``temperature()``: a learnable ``nn.Parameter`` named ``tau`` of shape (1,) for ``parameter`` (never
0-dim: DeepSpeed cannot broadcast 0-dim parameters), or a fresh fp32 tensor of shape (1,) for ``constant``
(not a parameter, not in the state dict, never cast to bf16 by an engine). Either way it is clamped to
``[loss.temperature.min, loss.temperature.max]`` at every use and DIVIDES the logits.

Nothing is downloaded: ``pretrained: true`` only uses weights already in the local Hugging Face / torch-hub
cache, and fails with a message saying where it looked; a path loads that file (``torch.load`` with
``weights_only=True``, or safetensors; ``zvl_ds.model.weights_files``).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import zvl_ds  # noqa: F401  (torchvision shim before timm / transformers)
from zvl_ds.config import (ImageEncoderConfig, LossConfig, ModelConfig, SigmoidConfig, TextEncoderConfig,
                           TemperatureConfig)
from zvl_ds.model.locking import lock_towers
from zvl_ds.model.patch_dropout import set_patch_dropout
from zvl_ds.model.presets import SOURCE_ARCHS
# re-exported: the weights-file helpers lived here before zvl_ds.model.weights_files
from zvl_ds.model.weights_files import (WeightsReport, cached_timm_weights, load_image_weights,  # noqa: F401
                                        read_state_dict)
from zvl_ds.objective.mixup import MixupDraw, mix_images, mix_with_reversed
from zvl_ds.runtime.profile_ranges import profile_range

logger = logging.getLogger(__name__)

# L2 normalisation guard, as ZeroVL's x / (|x| + 1e-8)
_NORM_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Towers and heads
# --------------------------------------------------------------------------------------------------


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


def compile_towers(model: "DualEncoder", mode: str, backend: str = "inductor") -> "DualEncoder":
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


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


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


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig) -> DualEncoder:
    """The dual encoder a config describes (``model.arch`` presets are already merged by zvl_ds.config)."""
    if model_cfg.arch in SOURCE_ARCHS:  # another library's whole model: zvl_ds.model.sources
        from zvl_ds.model.sources import build_sourced_model

        return build_sourced_model(model_cfg, loss_cfg)
    image_cfg, text_cfg, proj_cfg = model_cfg.image_encoder, model_cfg.text_encoder, model_cfg.projection
    image_tower, image_width, report = build_image_tower(image_cfg)
    set_image_attention(image_tower, model_cfg.attention)
    set_patch_dropout(image_tower, image_cfg.patch_dropout)
    text_tower, text_width = build_text_tower(text_cfg, model_cfg.attention)
    image_projection = build_projection(proj_cfg.name, image_width, proj_cfg.dim)
    text_projection = build_projection(proj_cfg.name, text_width, proj_cfg.dim)
    image_projection.requires_grad_(proj_cfg.image_projector_trainable)
    text_projection.requires_grad_(proj_cfg.text_projector_trainable)
    model = DualEncoder(image_tower, text_tower, image_projection, text_projection, loss_cfg.temperature,
                        text_pooling=text_cfg.pooling, target_token_idx=text_cfg.target_token_idx,
                        image_only_cls_token=image_cfg.vit.only_cls_token,
                        image_trainable=image_cfg.trainable, text_trainable=text_cfg.trainable,
                        sigmoid=loss_cfg.sigmoid if loss_cfg.name == "SigLIP" else None)
    model.image_weights_report = report
    model.tower_locks = lock_towers(model, model_cfg)
    return model


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
