"""Writing a model folder in zvl_ds's own format, which ``zvl_ds.load_model`` reads back (``zvl_ds.model.inference``
describes the files). ``python -m zvl_ds.export RUN_DIR [--tag TAG] --out MODEL_DIR`` writes it from a run's
checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict

import torch
from safetensors.torch import save_file

import zvl_ds
from zvl_ds.base.atomic_write import atomic_folder, atomic_path
from zvl_ds.config import Config
from zvl_ds.config.presets import SOURCE_ARCHS
from zvl_ds.model.dual_encoder import DualEncoder
from zvl_ds.model.inference import (EXPORT_FORMAT, EXPORT_FORMAT_VERSION, MODEL_CONFIG_FILE, PREPROCESS_FILE,
                                    TOKENIZER_DIR, WEIGHTS_FILE, Preprocessing, offline_model_config)


def exported_model_config(cfg: Config, model: DualEncoder) -> Dict:
    """The model section for a model folder: towers from configs only, the text tower's config embedded."""
    model_cfg = offline_model_config(cfg)
    # the preset and its variant are already merged into the explicit keys (a model source keeps its arch: it
    # names the library the towers come from), and the folder's own weights replace whatever the run was
    # initialised from
    if model_cfg.arch not in SOURCE_ARCHS:
        model_cfg.arch = None
        model_cfg.text_encoder = dataclasses.replace(model_cfg.text_encoder, config=model.text_tower.config.to_dict())
    model_cfg.model_type = None
    model_cfg.load_pretrained, model_cfg.pretrained = False, None
    model_cfg.load_finetuned, model_cfg.finetuned = False, None
    model_cfg.text_encoder = dataclasses.replace(model_cfg.text_encoder, tokenizer=None)
    model_cfg.image_encoder = dataclasses.replace(model_cfg.image_encoder, grad_checkpointing=False)
    model_cfg.text_encoder.grad_checkpointing = False
    model = dataclasses.asdict(model_cfg)
    # how the source folder may be read says nothing about the model (an export has no source folder), and left
    # out, the folder stays readable by zvl_ds versions without the key
    model.pop("allow_outside_files")
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "zvl_ds_version": zvl_ds.__version__,
            "model": model, "loss": _exported_loss_config(cfg)}


def _exported_loss_config(cfg: Config) -> Dict:
    """The loss keys that shape the model: the temperature, and SigLIP's scale and bias (weights in the folder)."""
    loss = {"temperature": dataclasses.asdict(cfg.loss.temperature)}
    if cfg.loss.name == "SigLIP":
        loss.update(name="SigLIP", sigmoid=dataclasses.asdict(cfg.loss.sigmoid))
    return loss


def write_model_folder(out_dir: str, cfg: Config, model: DualEncoder, tokenizer, source: Dict[str, str]) -> str:
    """Write weights, model config, preprocessing and tokenizer; files appear complete or not at all."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(out_dir, WEIGHTS_FILE)) as path:
        save_file(state, path, metadata={"format": EXPORT_FORMAT, **source})
    config = {**exported_model_config(cfg, model), "source": source}
    with atomic_path(os.path.join(out_dir, MODEL_CONFIG_FILE)) as path:
        _write_json(path, config)
    preprocess = dataclasses.asdict(Preprocessing.from_config(cfg))
    with atomic_path(os.path.join(out_dir, PREPROCESS_FILE)) as path:
        _write_json(path, preprocess)
    with atomic_folder(os.path.join(out_dir, TOKENIZER_DIR)) as folder:
        tokenizer.save_pretrained(folder)
    return out_dir


def _write_json(path: str, payload: Dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
