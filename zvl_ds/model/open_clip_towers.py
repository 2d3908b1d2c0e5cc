"""OpenCLIP models as towers (``model.arch: open_clip``; the optional ``open_clip`` extra, imported only here).

The model is built as OpenCLIP's ``CustomTextCLIP`` (its ``visual`` and ``text`` towers as two modules, the form
OpenCLIP itself uses for custom text towers), from the architecture's config: ``model.open_clip.config`` when
recorded (exported models), else the ``local-dir:`` folder's ``open_clip_config.json`` or the built-in config of
the name. Weights: the folder's ``open_clip_model.safetensors`` or ``model.open_clip.pretrained``, read as data
(safetensors, or a weights-only torch file), converted from the plain ``CLIP`` layout as OpenCLIP converts them
and loaded strictly. Each tower projects itself (``visual.proj``, ``text.text_projection``), so our projections
are the identity; ``encode_image`` / ``encode_text`` of the original model are ``visual(x)`` / ``text(ids)``.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List

from torch import nn

from zvl_ds.config import ConfigError, ModelConfig
from zvl_ds.config.model_sources import check_open_clip_config, import_open_clip, open_clip_source
from zvl_ds.model.sources import OPEN_CLIP, SourceParts
from zvl_ds.model.weights_files import read_state_dict

logger = logging.getLogger(__name__)


def build_open_clip_model(model_cfg: Dict[str, Any]) -> nn.Module:
    """OpenCLIP's ``CustomTextCLIP`` of an architecture config, random weights, fp32."""
    open_clip = import_open_clip()
    check_open_clip_config(model_cfg)
    kwargs = copy.deepcopy(model_cfg)
    kwargs.pop("custom_text", None)
    if "timm_model_name" in kwargs.get("vision_cfg", {}):
        kwargs["vision_cfg"]["timm_model_pretrained"] = False  # nothing is downloaded
    try:
        return open_clip.model.CustomTextCLIP(**kwargs)
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"model.open_clip: OpenCLIP cannot build this model config: {error}") from None


def custom_text_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A plain ``CLIP`` state dict in ``CustomTextCLIP``'s layout (the text tower's tensors under ``text.``)."""
    from open_clip.model import convert_to_custom_text_state_dict

    return convert_to_custom_text_state_dict(state)


def build_open_clip_parts(model_cfg: ModelConfig) -> SourceParts:
    options = model_cfg.open_clip
    source = open_clip_source(options.name, options.pretrained, options.config)
    model = build_open_clip_model(source.model_cfg)
    if source.weights:
        try:
            state = custom_text_state(read_state_dict(source.weights))
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.open_clip: {error}") from None
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ConfigError(f"model.open_clip: {source.weights} does not fit {options.name or 'the config'}: "
                              f"{len(missing)} missing tensor(s) {missing[:5]}, {len(unexpected)} unexpected "
                              f"{unexpected[:5]}, {len(wrong)} of another shape {wrong[:5]}")
        model.load_state_dict(state, strict=True)
        logger.info("model.open_clip: weights from %s", source.weights)
    elif not options.config:
        logger.warning("model.open_clip.name=%s: no weights file, the model starts from RANDOM weights", options.name)
    model.train()
    for enabled, tower, key in ((model_cfg.image_encoder.grad_checkpointing, model.visual, "image_encoder"),
                                (model_cfg.text_encoder.grad_checkpointing, model.text, "text_encoder")):
        if enabled:
            if not hasattr(tower, "set_grad_checkpointing"):
                raise ValueError(f"model.{key}.grad_checkpointing: {type(tower).__name__} does not support it")
            tower.set_grad_checkpointing(True)
    bias = None if model.logit_bias is None else float(model.logit_bias.detach().reshape(-1)[0])
    return SourceParts(library=OPEN_CLIP, image_tower=model.visual, text_tower=model.text,
                       image_projection=nn.Identity(), text_projection=nn.Identity(),
                       logit_scale=float(model.logit_scale.detach().reshape(-1)[0]), logit_bias=bias,
                       source_config=copy.deepcopy(source.model_cfg),
                       tower_projections={"image_tower": _projection_names(model.visual, "proj"),
                                          "text_tower": _projection_names(model.text, "text_projection")})


def _projection_names(tower: nn.Module, attribute: str) -> List[str]:
    """The parameters of a tower's own projection (a parameter, or a Linear in some configs); none without one."""
    return [name for name, _ in tower.named_parameters() if name == attribute or name.startswith(f"{attribute}.")]
