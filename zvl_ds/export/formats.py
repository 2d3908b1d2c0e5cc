"""The model folder formats ``python -m zvl_ds.export --format`` writes, by name.

A format is a function ``write(out_dir, cfg, model, tokenizer, source) -> out_dir`` from a consolidated run (its
config, the fp32 ``DualEncoder`` and its tokenizer) to a folder another tool loads. ``zvl_ds`` (the default) is
the folder ``zvl_ds.load_model`` reads; ``open_clip`` the folder open_clip loads as ``local-dir:DIR``
(``export/open_clip_folder.py``). A format that cannot describe a model refuses it with an ``ExportError``
that names the part, before it writes anything.
"""
from __future__ import annotations

from typing import Callable, Dict

from zvl_ds.export.model_folder import write_model_folder
from zvl_ds.export.open_clip_folder import write_open_clip_folder

FolderWriter = Callable[..., str]

FORMATS: Dict[str, FolderWriter] = {
    "zvl_ds": write_model_folder,
    "open_clip": write_open_clip_folder,
}
DEFAULT_FORMAT = "zvl_ds"
