"""``python -m zvl_ds.export RUN --format hf``: a model trained from a Hugging Face CLIP or SigLIP folder
(``model.arch: hf_clip`` / ``hf_siglip``) back out as a folder ``CLIPModel`` / ``SiglipModel.from_pretrained`` loads.

The folder holds ``config.json`` and ``model.safetensors`` (written by the library's own ``save_pretrained`` from a
model that took every tensor strictly), the tokenizer files and ``preprocessor_config.json`` (the run's validation
transforms and normalisation). Our parameters map back one to one: the towers are the library's vision and text
models, CLIP's projections its ``visual_projection`` / ``text_projection`` and SigLIP's text projection its
``text_model.head``; the temperature tau becomes ``logit_scale = -log(tau)`` (as clamped in use), SigLIP's log
scale and bias its ``logit_scale`` and ``logit_bias``. Nothing here imports DeepSpeed.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from zvl_ds.base.atomic_write import atomic_folder
from zvl_ds.config import Config
from zvl_ds.model.hf_clip import hf_classes
from zvl_ds.model.inference import ExportError, as_shapes_of, load_state_strict

HF_ARCHS = ("hf_clip", "hf_siglip")


def library_prefixes(arch: str) -> Dict[str, str]:
    """{our name prefix: the ``CLIPModel`` / ``SiglipModel`` one} for the towers and projections."""
    return {"image_tower.": "vision_model.", "text_tower.": "text_model.", "image_projection.": "visual_projection.",
            "text_projection.": "text_projection." if arch == "hf_clip" else "text_model.head."}


def library_state_dict(model, arch: str) -> Dict[str, torch.Tensor]:
    """Our state dict under the names of ``CLIPModel`` / ``SiglipModel``."""
    state: Dict[str, torch.Tensor] = {}
    renames = library_prefixes(arch)
    for key, value in model.state_dict().items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix is not None:
            state[renames[prefix] + key[len(prefix):]] = value.detach().float().cpu().clone()
    with torch.no_grad():
        if arch == "hf_clip":
            state["logit_scale"] = torch.tensor(-math.log(float(model.temperature().reshape(-1)[0])))
        else:
            state["logit_scale"] = model.logit_scale_log.detach().float().cpu().clone().reshape(1)
            state["logit_bias"] = model.logit_bias.detach().float().cpu().clone().reshape(1)
    return state


def image_processor(cfg: Config, arch: str):
    """The run's validation transforms as the library's image processor."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    t = cfg.transforms
    crop = "center_crop" in t.valid_transforms
    common = {"image_mean": list(t.normalize.mean), "image_std": list(t.normalize.std)}
    if arch == "hf_clip":
        return CLIPImageProcessor(size={"shortest_edge": t.resize.size}, do_center_crop=crop,
                                  crop_size={"height": t.center_crop.size, "width": t.center_crop.size}, **common)
    side = t.center_crop.size if crop else t.resize.size
    return SiglipImageProcessor(size={"height": side, "width": side}, **common)


def check_exportable(cfg: Config, model) -> str:
    """The source arch, or an ExportError naming why the model has no Hugging Face CLIP / SigLIP form."""
    arch = getattr(model, "arch", None)
    if arch not in HF_ARCHS:
        raise ExportError(f"--format hf writes Hugging Face CLIPModel / SiglipModel folders of models trained from "
                          f"model.arch hf_clip or hf_siglip; this run's model.arch is {cfg.model.arch!r} (use the "
                          f"zvl_ds format)")
    if arch == "hf_clip" and model.sigmoid_loss:
        raise ExportError("--format hf: this CLIP model was trained with loss.name=SigLIP, whose bias CLIPModel "
                          "cannot hold; use the zvl_ds format")
    if arch == "hf_siglip" and not model.sigmoid_loss:
        raise ExportError(f"--format hf: this SigLIP model was trained with loss.name={cfg.loss.name}, a "
                          "temperature SiglipModel cannot hold (it has a sigmoid scale and bias); use the zvl_ds "
                          "format")
    return arch


def write_hf_folder(out_dir: str, cfg: Config, model, tokenizer, source: Dict[str, str]) -> str:
    """Write a folder ``from_pretrained`` loads; refused (before anything is written) for other models."""
    arch = check_exportable(cfg, model)
    config_class, model_class = hf_classes(arch)
    library = model_class(config_class.from_dict(model.source_config))
    load_state_strict(library, as_shapes_of(library, library_state_dict(model, arch)),
                      f"--format hf: the model mapped onto {model_class.__name__}")
    with atomic_folder(out_dir) as folder:
        library.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        image_processor(cfg, arch).save_pretrained(folder)
    return out_dir
