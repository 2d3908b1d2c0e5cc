"""The model folder formats ``python -m zvl_ds.export --format`` writes, by name.

A format is a function ``write(out_dir, cfg, model, tokenizer, source) -> out_dir`` from a consolidated run (its
config, the fp32 ``DualEncoder`` and its tokenizer) to a folder another tool loads:

- ``zvl_ds`` (the default): the folder ``zvl_ds.load_model`` reads, for every model;
- ``open_clip``: the folder open_clip loads as ``local-dir:DIR``. A model trained from an OpenCLIP source goes back
  in its own form (``export/open_clip_sourced.py``); timm + Hugging Face towers are described with open_clip's
  timm and HF tower configs (``export/open_clip_folder.py``);
- ``hf``: a model trained from a Hugging Face CLIP or SigLIP folder, back as a ``CLIPModel`` / ``SiglipModel``
  folder (``from_pretrained``).

A format that cannot describe a model refuses it with an ``ExportError`` that names the part, before it writes
anything.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

from zvl_ds.data import load_tokenizer
from zvl_ds.export.adapters_folder import without_adapters, write_adapters_folder
from zvl_ds.export.hf_folder import write_hf_folder
from zvl_ds.export.model_folder import write_model_folder
from zvl_ds.export.open_clip_folder import write_open_clip_folder
from zvl_ds.export.open_clip_sourced import write_open_clip_sourced_folder
from zvl_ds.model.adapters import has_adapters, merge_adapters
from zvl_ds.model.inference import ExportError
from zvl_ds.model.init_weights import initialise_from_config
from zvl_ds.model.saved_run import load_run

FolderWriter = Callable[..., str]


def write_open_clip(out_dir: str, cfg, model, tokenizer, source: Dict[str, str]) -> str:
    """An OpenCLIP-sourced model in its own form; any other model through open_clip's timm and HF towers."""
    if getattr(model, "arch", None) == "open_clip":
        return write_open_clip_sourced_folder(out_dir, cfg, model, tokenizer, source)
    return write_open_clip_folder(out_dir, cfg, model, tokenizer, source)


FORMATS: Dict[str, FolderWriter] = {
    "zvl_ds": write_model_folder,
    "open_clip": write_open_clip,
    "hf": write_hf_folder,
}
DEFAULT_FORMAT = "zvl_ds"


def export_model(run_dir: str, out_dir: str, tag: Optional[str] = None, trust_checkpoint: bool = False,
                 folder_format: str = "zvl_ds", ema: bool = False, adapters_only: bool = False) -> str:
    """Consolidate ``RUN_DIR``'s checkpoint (``tag`` or the latest) into a model folder ``out_dir`` in
    ``folder_format`` (``export.formats.FORMATS``); ``ema``: its model EMA instead of the trained weights.

    A run with LoRA adapters is written merged (each adapter folded into its base weight: a model without adapters,
    in any format), or with ``adapters_only`` as the adapters alone in peft's layout (``export.adapters_folder``)."""
    if folder_format not in FORMATS:
        raise ExportError(f"unknown export format {folder_format!r}; choose one of {sorted(FORMATS)}")
    cfg, model, tag = load_run(run_dir, tag, trust_checkpoint, ema, initialise=initialise_from_config)
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    source = {"run_dir": os.path.abspath(run_dir), "tag": tag, "weights": "ema" if ema else "trained"}
    return write_folder(out_dir, cfg, model, tokenizer, source, folder_format, adapters_only)


def write_folder(out_dir: str, cfg, model, tokenizer, source: Dict[str, str], folder_format: str = DEFAULT_FORMAT,
                 adapters_only: bool = False) -> str:
    """Write a consolidated model in ``folder_format``: with its adapters merged (in place), or its adapters alone."""
    if adapters_only:
        return write_adapters_folder(out_dir, cfg, model, tokenizer, source)
    if has_adapters(model):
        merge_adapters(model)
        cfg = without_adapters(cfg)
    return FORMATS[folder_format](out_dir, cfg, model, tokenizer, source)
