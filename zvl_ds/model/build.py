"""``build_model``: the one place a config becomes a dual encoder, built from tower configs (``towers``) or from
another library's whole model (``sources``: ``hf_clip``, ``open_clip_towers``).

Building imports no optional library: ``open_clip`` is imported when an ``open_clip`` source is built, ``peft`` when
a tower has LoRA adapters (``adapters``: added last, after partial locking).
"""
from __future__ import annotations

import logging

import torch

from zvl_ds.config import ConfigError, LossConfig, ModelConfig
from zvl_ds.config.presets import SOURCE_ARCHS
from zvl_ds.model.adapters import apply_adapters
from zvl_ds.model.dual_encoder import DualEncoder
from zvl_ds.model.hf_clip import build_hf_parts
from zvl_ds.model.locking import lock_towers
from zvl_ds.model.open_clip_towers import build_open_clip_parts
from zvl_ds.model.patch_dropout import set_patch_dropout
from zvl_ds.model.sources import LibraryDualEncoder, SourceParts, temperature_of_scale
from zvl_ds.model.towers import build_image_tower, build_projection, build_text_tower, set_image_attention

logger = logging.getLogger(__name__)


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig) -> DualEncoder:
    """The dual encoder a config describes (``model.arch`` presets are already merged by zvl_ds.config)."""
    if model_cfg.arch in SOURCE_ARCHS:  # another library's whole model: zvl_ds.model.sources
        model = build_sourced_model(model_cfg, loss_cfg)
    else:
        model = build_tower_model(model_cfg, loss_cfg)
    model.tower_locks = lock_towers(model, model_cfg)
    apply_adapters(model, model_cfg)
    return model


def build_tower_model(model_cfg: ModelConfig, loss_cfg: LossConfig) -> DualEncoder:
    """The dual encoder of tower configs: a timm image tower and a Hugging Face text tower."""
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
    return model


def _take_scales(model: LibraryDualEncoder, parts: SourceParts, loss_cfg: LossConfig) -> None:
    """Initialise the learnable temperature, or SigLIP's scale and bias, from the checkpoint's."""
    with torch.no_grad():
        if model.temperature_learnable:
            tau = temperature_of_scale(parts.logit_scale)
            low, high = model.temperature_min, model.temperature_max
            if not low <= tau <= high:
                raise ConfigError(
                    f"the checkpoint's temperature 1/exp(logit_scale) = {tau:.6g} (logit_scale {parts.logit_scale:.6g})"
                    f" is outside loss.temperature.min={low:g} / loss.temperature.max={high:g}, which clamp it at "
                    f"every use; widen the range to hold it (e.g. loss.temperature.min={tau / 2:.3g})")
            model.tau.fill_(tau)
        if model.sigmoid_loss:
            model.logit_scale_log.fill_(parts.logit_scale)
            if parts.logit_bias is not None:
                model.logit_bias.fill_(parts.logit_bias)
            else:
                logger.info("the checkpoint has no logit bias: SigLIP's bias starts at loss.sigmoid.bias_init=%g",
                            loss_cfg.sigmoid.bias_init)


def build_sourced_model(model_cfg: ModelConfig, loss_cfg: LossConfig) -> LibraryDualEncoder:
    """The dual encoder of a ``hf_clip`` / ``hf_siglip`` / ``open_clip`` source."""
    parts = build_open_clip_parts(model_cfg) if model_cfg.arch == "open_clip" else build_hf_parts(model_cfg)
    proj_cfg = model_cfg.projection
    parts.image_projection.requires_grad_(proj_cfg.image_projector_trainable)
    parts.text_projection.requires_grad_(proj_cfg.text_projector_trainable)
    model = LibraryDualEncoder(parts, str(model_cfg.arch), temperature=loss_cfg.temperature,
                               image_trainable=model_cfg.image_encoder.trainable,
                               text_trainable=model_cfg.text_encoder.trainable,
                               sigmoid=loss_cfg.sigmoid if loss_cfg.name == "SigLIP" else None)
    _take_scales(model, parts, loss_cfg)
    return model
