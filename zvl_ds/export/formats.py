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

from typing import Callable, Dict

from zvl_ds.export.hf_folder import write_hf_folder
from zvl_ds.export.model_folder import write_model_folder
from zvl_ds.export.open_clip_folder import write_open_clip_folder
from zvl_ds.export.open_clip_sourced import write_open_clip_sourced_folder

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
