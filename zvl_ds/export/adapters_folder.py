"""``python -m zvl_ds.export RUN --adapters-only --out DIR``: a run's LoRA adapters alone, in peft's own layout.

``DIR/adapter_config.json`` and ``DIR/adapter_model.safetensors`` are written by peft itself (``save_pretrained`` of a
``PeftModel`` that took our tensors through ``set_peft_model_state_dict``), so ``PeftModel.from_pretrained(base, DIR)``
loads them. The base they name:

- a run from a Hugging Face CLIP / SigLIP folder (``model.arch: hf_clip`` / ``hf_siglip``): that ``CLIPModel`` /
  ``SiglipModel`` (our ``image_tower`` is its ``vision_model``, ``text_tower`` its ``text_model``, the projections its
  ``visual_projection`` / ``text_projection``, SigLIP's text projection ``text_model.head``);
- any other run: zvl_ds's ``DualEncoder`` of the run's config without ``lora`` (``zvl_ds.model.build.build_model``).

The target modules are listed by full name (each tower may have its own rank, scale and targets: peft's
``rank_pattern`` / ``alpha_pattern`` hold the second tower's). Trained parameters outside the adapters travel as
peft's ``modules_to_save`` (the projections, and what partial locking unlocked), whole modules only: a trained base
weight of an adapted module, or a projection that is a parameter of the tower itself (OpenCLIP's), has no place in
peft's layout and is refused before anything is written (export merged weights instead). The temperature (or SigLIP's
scale and bias) is no module's: ``DIR/zvl_ds_adapters.json`` records it, with the run, the base's identity and the
per-tower options. peft's config holds one dropout: the image tower's when the towers differ (inference ignores it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, List, Tuple

import torch
from torch import nn

from zvl_ds.base.atomic_write import atomic_folder
from zvl_ds.config import Config, LoraOptions
from zvl_ds.export.hf_folder import HF_ARCHS, library_prefixes
from zvl_ds.model.adapters import TOWERS, base_identity, import_peft, is_adapter_parameter
from zvl_ds.model.build import build_model
from zvl_ds.model.hf_clip import hf_classes
from zvl_ds.model.inference import ExportError, offline_model_config

SIDE_FILE = "zvl_ds_adapters.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_SCALARS = ("tau", "logit_scale_log", "logit_bias")  # parameters of the dual encoder itself, not of a module
_OURS = re.compile(r"\.(lora_[A-Za-z_]+?)\.default(?=\.|$)")


def without_adapters(cfg: Config) -> Config:
    """A copy of ``cfg`` whose towers have no ``lora``: the config of a merged model."""
    model = dataclasses.replace(cfg.model)
    model.image_encoder = dataclasses.replace(cfg.model.image_encoder, lora=LoraOptions())
    model.text_encoder = dataclasses.replace(cfg.model.text_encoder, lora=LoraOptions())
    return dataclasses.replace(cfg, model=model)


def _base_for_peft(cfg: Config, model) -> Tuple[nn.Module, Dict[str, str]]:
    """(the model peft wraps, {our name prefix: its name prefix}) for the run's base (module docstring)."""
    arch = getattr(model, "arch", None)
    if arch in HF_ARCHS:
        config_class, model_class = hf_classes(arch)
        return model_class(config_class.from_dict(model.source_config)), library_prefixes(arch)
    plain = without_adapters(cfg)
    return build_model(offline_model_config(plain), plain.loss), {"": ""}


def _renamed(name: str, prefixes: Dict[str, str]) -> str:
    """A parameter or module name of ours as the base peft wraps names it."""
    if f"{name}." in prefixes:  # a whole module the prefix names (a projection)
        return prefixes[f"{name}."][:-1]
    for ours, theirs in prefixes.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ExportError(f"--adapters-only: {name} has no counterpart in the base model peft wraps")


def _modules_to_save(model: nn.Module, trained: List[str]) -> List[str]:
    """The modules (our names) whose trained parameters travel whole, or an ExportError naming one that cannot."""
    modules = sorted({name.rpartition(".")[0] for name in trained})
    for module_name in modules:
        module = model.get_submodule(module_name)
        example = next(name for name in trained if name.rpartition(".")[0] == module_name)
        if module_name in ("", *(tower for tower, _ in TOWERS)):
            raise ExportError(f"--adapters-only: {example} is trained and is a parameter of the whole "
                              f"{module_name or 'model'} (not of one of its modules), which peft's modules_to_save "
                              "cannot carry; export the merged model, or freeze it (e.g. "
                              "model.projection.*_projector_trainable=false)")
        if ".base_layer" in f".{module_name}" or any(is_adapter_parameter(n) for n, _ in module.named_parameters()):
            raise ExportError(f"--adapters-only: {example} is trained and belongs to an adapted module, which peft's "
                              "adapter layout cannot carry; export the merged model (without --adapters-only)")
        frozen = [name for name, p in module.named_parameters(recurse=False) if not p.requires_grad]
        if frozen:
            raise ExportError(f"--adapters-only: {module_name} is partly trained ({frozen[0]} is frozen); peft's "
                              "modules_to_save carries whole modules: export the merged model")
    return modules


def _lora_config(peft, cfg: Config, model, prefixes: Dict[str, str], modules_to_save: List[str]):
    """peft's LoraConfig for the adapted modules by full name; the second tower's rank and scale as patterns."""
    adapted = getattr(model, "adapted_modules", {})
    towers = [(attribute, getattr(cfg.model, section).lora) for attribute, section in TOWERS if adapted.get(attribute)]
    first = towers[0][1]
    targets, ranks, alphas = [], {}, {}
    for attribute, options in towers:
        for name in adapted[attribute]:
            full = _renamed(f"{attribute}.{name}", prefixes)
            targets.append(full)
            if options.r != first.r:
                ranks[re.escape(full)] = options.r
            if options.scale_numerator != first.scale_numerator:
                alphas[re.escape(full)] = options.scale_numerator
    return peft.LoraConfig(r=first.r, lora_alpha=first.scale_numerator, lora_dropout=first.dropout,
                           target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas, bias="none",
                           modules_to_save=[_renamed(name, prefixes) for name in modules_to_save] or None)


def adapter_state(model, prefixes: Dict[str, str], modules_to_save: List[str]) -> Dict[str, torch.Tensor]:
    """The trained adapters and modules_to_save under the names peft saves (``base_model.model.<name>``)."""
    state: Dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if is_adapter_parameter(name):
            state["base_model.model." + _OURS.sub(r".\1", _renamed(name, prefixes))] = param
        elif name.rpartition(".")[0] in modules_to_save:
            state["base_model.model." + _renamed(name, prefixes)] = param
    return {key: value.detach().float().cpu().contiguous().clone() for key, value in state.items()}


def write_adapters_folder(out_dir: str, cfg: Config, model, tokenizer, source: Dict[str, str]) -> str:
    """Write the adapters in peft's layout (module docstring); refused, before anything is written, for a run
    without adapters or with trained parameters peft's layout cannot carry."""
    if not getattr(model, "adapted_modules", None):
        raise ExportError("--adapters-only: this run has no LoRA adapters (model.image_encoder.lora / "
                          "model.text_encoder.lora); export the model without --adapters-only")
    peft = import_peft()
    trained = [name for name, p in model.named_parameters()
               if p.requires_grad and not is_adapter_parameter(name) and name not in _SCALARS]
    modules_to_save = _modules_to_save(model, trained)
    base, prefixes = _base_for_peft(cfg, model)
    config = _lora_config(peft, cfg, model, prefixes, modules_to_save)
    config.base_model_name_or_path = cfg.model.hf_folder if getattr(model, "arch", None) in HF_ARCHS else None
    wrapped = peft.get_peft_model(base, config)
    state = adapter_state(model, prefixes, modules_to_save)
    result = peft.set_peft_model_state_dict(wrapped, state)
    expected = peft.get_peft_model_state_dict(wrapped)
    if getattr(result, "unexpected_keys", None) or set(expected) != set(state):
        raise ExportError(f"--adapters-only: peft does not take the adapters as named: "
                          f"{sorted(set(state) ^ set(expected))[:5]}")
    scalars = {name: float(p.detach().reshape(-1)[0]) for name, p in model.named_parameters() if name in _SCALARS}
    record = {"format": "zvl_ds.adapters", "source": source, "arch": cfg.model.arch,
              "base_model": "library" if getattr(model, "arch", None) in HF_ARCHS else "zvl_ds.DualEncoder",
              "base": base_identity(cfg.model, model),
              "lora": {section: dataclasses.asdict(getattr(cfg.model, section).lora) for _, section in TOWERS},
              "scalars": scalars}
    with atomic_folder(out_dir) as folder:
        wrapped.save_pretrained(folder)
        with open(os.path.join(folder, SIDE_FILE), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
    return out_dir
