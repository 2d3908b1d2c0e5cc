"""The model folder formats ``python -m zvl_ds.export --format`` writes, by name.

A format is a function ``write(out_dir, cfg, model, tokenizer, source) -> out_dir`` from a consolidated run (its
config, the fp32 ``DualEncoder`` and its tokenizer) to a folder another tool loads. ``zvl_ds`` (the default) is
the folder ``zvl_ds.load_model`` reads; ``hf`` and ``open_clip`` give a model trained from a Hugging Face or OpenCLIP
source back in that source's form. A format that cannot describe a model refuses it with an ``ExportError``
that names the part, before it writes anything.
"""
from __future__ import annotations

from typing import Callable, Dict

from zvl_ds.export.hf_folder import write_hf_folder
from zvl_ds.export.model_folder import write_model_folder
from zvl_ds.export.open_clip_sourced import write_open_clip_sourced_folder

FolderWriter = Callable[..., str]

FORMATS: Dict[str, FolderWriter] = {
    "zvl_ds": write_model_folder,
    # models trained from model.arch hf_clip / hf_siglip: a CLIPModel / SiglipModel folder (from_pretrained)
    "hf": write_hf_folder,
    # models trained from model.arch open_clip: an OpenCLIP local-dir folder
    "open_clip": write_open_clip_sourced_folder,
}
DEFAULT_FORMAT = "zvl_ds"
