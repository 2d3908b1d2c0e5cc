"""``python -m zvl_ds.export RUN --format open_clip`` for models trained from an OpenCLIP model
(``model.arch: open_clip``): an OpenCLIP folder, ``open_clip_config.json`` + ``open_clip_model.safetensors``, that
``open_clip.create_model_and_transforms('local-dir:DIR')`` loads.

The config is the source's own model config; the weights are in the source's layout (a plain ``CLIP`` keeps its
text tower at the top level, as OpenCLIP's ``convert_to_custom_text_state_dict`` undoes), checked by loading them
strictly into the model OpenCLIP builds from that config before anything is written. The temperature tau becomes
``logit_scale = -log(tau)`` (as clamped in use), SigLIP's log scale and bias ``logit_scale`` and ``logit_bias``.
``preprocess_cfg`` records the run's validation size and normalisation.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict

import torch

from zvl_ds.base.atomic_write import atomic_folder
from zvl_ds.config import Config
from zvl_ds.model.inference import ExportError, as_shapes_of, load_state_strict

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"
# the text tower's tensors a plain CLIP holds at the top level (CustomTextCLIP has them under text.)
PLAIN_CLIP_TEXT_PREFIXES = ("text_projection", "positional_embedding", "token_embedding", "transformer", "ln_final")


def open_clip_state_dict(model, model_cfg: Dict[str, Any], plain_clip: bool) -> Dict[str, torch.Tensor]:
    """Our state dict under OpenCLIP's names, in the layout of the model class the config builds."""
    state: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        for ours, theirs in (("image_tower.", "visual."), ("text_tower.", "text.")):
            if key.startswith(ours):
                name = theirs + key[len(ours):]
                if plain_clip and theirs == "text." and key[len(ours):].startswith(PLAIN_CLIP_TEXT_PREFIXES):
                    name = key[len(ours):]
                state[name] = value.detach().float().cpu().clone()
    with torch.no_grad():
        if model.sigmoid_loss:
            state["logit_scale"] = model.logit_scale_log.detach().float().cpu().reshape(()).clone()
            state["logit_bias"] = model.logit_bias.detach().float().cpu().reshape(()).clone()
        else:
            state["logit_scale"] = torch.tensor(-math.log(float(model.temperature().reshape(-1)[0])))
    return state


def preprocess_config(cfg: Config) -> Dict[str, Any]:
    t = cfg.transforms
    crop = "center_crop" in t.valid_transforms
    return {"size": t.center_crop.size if crop else t.resize.size, "mean": list(t.normalize.mean),
            "std": list(t.normalize.std), "interpolation": "bilinear", "resize_mode": "shortest" if crop else "squash"}


def write_open_clip_sourced_folder(out_dir: str, cfg: Config, model, tokenizer, source: Dict[str, str]) -> str:
    """Write the OpenCLIP folder of a model trained from an OpenCLIP source; other models are refused."""
    if getattr(model, "arch", None) != "open_clip":
        raise ExportError(f"this open_clip writer takes models trained from model.arch open_clip (an OpenCLIP "
                          f"source); this run's model.arch is {cfg.model.arch!r}")
    import open_clip

    model_cfg = dict(model.source_config)
    has_bias = model_cfg.get("init_logit_bias") is not None
    if has_bias != model.sigmoid_loss:
        raise ExportError(f"--format open_clip: the OpenCLIP model {'has' if has_bias else 'has no'} a logit bias but "
                          f"was trained with loss.name={cfg.loss.name}; its scale cannot be written back in the same "
                          "form (use the zvl_ds format)")
    build_cfg = dict(model_cfg)
    plain_clip = not build_cfg.pop("custom_text", False)
    model_class = open_clip.model.CLIP if plain_clip else open_clip.model.CustomTextCLIP
    library = model_class(**build_cfg)
    state = as_shapes_of(library, open_clip_state_dict(model, model_cfg, plain_clip))
    load_state_strict(library, state, f"--format open_clip: the model mapped onto OpenCLIP's {model_class.__name__}")
    from safetensors.torch import save_file

    with atomic_folder(out_dir) as folder:
        save_file(state, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt", **source})
        with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(cfg)}, handle, indent=2)
            handle.write("\n")
    return out_dir
