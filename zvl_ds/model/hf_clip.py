"""Hugging Face ``CLIPModel`` and ``SiglipModel`` as towers (``model.arch: hf_clip`` / ``hf_siglip``).

The image tower is the library's vision model and the text tower its text model, each pooling as the library
does: CLIP's class token (after ``post_layernorm``) and end-of-text token; SigLIP's attention-pooling head and last
token. CLIP's projections are ``visual_projection`` / ``text_projection``; SigLIP's text head (``text_model.head``)
becomes the text projection and its vision head stays in the tower (it is the pooling), so the image projection
is the identity. SigLIP's text tower reads every token, pads included, as SigLIP was trained (the tokenizer pads
to ``model.max_length``).

Nothing is downloaded and no code from the folder runs (``local_files_only``, ``trust_remote_code=False``).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Tuple

import torch
from safetensors import SafetensorError
from torch import nn

from zvl_ds.config import ConfigError, ModelConfig
from zvl_ds.config.model_sources import hf_model_config, hf_weights_file
from zvl_ds.model.safe_load import UnsafeCheckpointError, load_weights_only
from zvl_ds.model.sources import TRANSFORMERS, SourceParts
from zvl_ds.model.towers import enable_hf_checkpointing

logger = logging.getLogger(__name__)


def hf_classes(arch: str) -> Tuple[type, type]:
    """(config class, model class) of a source arch."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    return (CLIPConfig, CLIPModel) if arch == "hf_clip" else (SiglipConfig, SiglipModel)


def build_hf_library_model(model_cfg: ModelConfig) -> nn.Module:
    """The whole ``CLIPModel`` / ``SiglipModel`` of ``model.hf_config`` or ``model.hf_folder``, in fp32, with the
    folder's weights when it has them (every tensor present) and random weights otherwise."""
    arch, folder = str(model_cfg.arch), model_cfg.hf_folder
    config_dict: Dict[str, Any] = hf_model_config(folder, model_cfg.hf_config, arch)
    config_class, model_class = hf_classes(arch)
    config = config_class.from_dict(config_dict)
    weights = hf_weights_file(folder)
    if weights is None:
        if folder:
            logger.warning("model.hf_folder=%s holds no weights file (model.safetensors or pytorch_model.bin): the "
                           "model starts from RANDOM weights", folder)
        return model_class._from_config(config, attn_implementation=model_cfg.attention, dtype=torch.float32)
    if not weights.endswith(".safetensors"):
        refuse_pickled_code(folder, weights)
    try:
        model, info = model_class.from_pretrained(folder, config=config, local_files_only=True,
                                                  trust_remote_code=False, attn_implementation=model_cfg.attention,
                                                  dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a .safetensors that is not one
        raise ConfigError(f"model.hf_folder={folder!r}: transformers cannot load {weights}: {error}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        raise ConfigError(f"model.hf_folder={folder!r}: {weights} does not fit the folder's config.json: "
                          f"{len(missing)} missing tensor(s) {missing[:5]}, {len(mismatched)} of another shape "
                          f"{[m[0] if isinstance(m, tuple) else m for m in mismatched[:5]]}")
    logger.info("model.hf_folder=%s: weights from %s", folder, weights)
    return model


def refuse_pickled_code(folder: str, weights: str) -> None:
    """A torch pickle is read with the weights-only unpickler first: one that would call code (or holds anything but
    tensors and plain containers) is refused by name, before transformers opens it."""
    try:
        load_weights_only(weights)
    except UnsafeCheckpointError:
        raise ConfigError(f"model.hf_folder={folder!r}: {weights} is a pickle holding more than weights (torch's "
                          "weights-only reader refuses it: it would run code or build objects when opened), so it is "
                          "not loaded; give the folder a model.safetensors (save_pretrained writes one)") from None


def build_hf_parts(model_cfg: ModelConfig) -> SourceParts:
    """The library model split into our parts (see the module docstring)."""
    library_model = build_hf_library_model(model_cfg)
    library_model.train()
    image_tower, text_tower = library_model.vision_model, library_model.text_model
    if model_cfg.arch == "hf_clip":
        image_projection, text_projection = library_model.visual_projection, library_model.text_projection
        bias = None
    else:
        if not getattr(image_tower, "use_head", True):
            raise ConfigError("model.arch=hf_siglip: the folder's vision_config has vision_use_head false: the "
                              "model has no image pooling head to embed images with")
        image_projection, text_projection = nn.Identity(), text_tower.head
        text_tower.head = nn.Identity()
        bias = float(library_model.logit_bias.detach().reshape(-1)[0])
    for enabled, tower, key in ((model_cfg.image_encoder.grad_checkpointing, image_tower, "image_encoder"),
                                (model_cfg.text_encoder.grad_checkpointing, text_tower, "text_encoder")):
        if enabled:
            enable_hf_checkpointing(tower, f"model.{key}.grad_checkpointing")
    return SourceParts(library=TRANSFORMERS, image_tower=image_tower, text_tower=text_tower,
                       image_projection=image_projection, text_projection=text_projection,
                       logit_scale=float(library_model.logit_scale.detach().reshape(-1)[0]), logit_bias=bias,
                       source_config=library_model.config.to_dict(), text_uses_mask=model_cfg.arch == "hf_clip")
