"""OpenCLIP's own tokenizer behind the Hugging Face call zvl_ds's loaders, evaluation and exports make.

``model.text_encoder.tokenizer: open_clip:<model.open_clip.name>`` (what ``model.arch: open_clip`` sets) gives the
tokenizer of that model: OpenCLIP's BPE ``SimpleTokenizer`` (packaged with open_clip, nothing downloaded) with the
model's ``tokenizer_kwargs``. Ids are padded with 0 and the attention mask is ``ids != 0``, as OpenCLIP pads.
``save_pretrained`` writes ``open_clip_tokenizer.json`` (the settings), from which a folder rebuilds it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

import torch

from zvl_ds.config.model_sources import (OPEN_CLIP_TOKENIZER_PREFIX, check_open_clip_config, import_open_clip,
                                         open_clip_source)

TOKENIZER_SETTINGS_FILE = "open_clip_tokenizer.json"


class OpenClipTokenizer:
    """``tokenizer(texts, padding="max_length", truncation=True, max_length=N, return_tensors="pt")`` ->
    ``{"input_ids", "attention_mask"}``, plus ``decode``, ``vocab_size`` and ``save_pretrained``."""

    def __init__(self, settings: Dict[str, Any]):
        open_clip = import_open_clip()
        self.settings = {"context_length": int(settings.get("context_length", 77)),
                         "tokenizer_kwargs": dict(settings.get("tokenizer_kwargs") or {})}
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.settings["context_length"],
                                                             **self.settings["tokenizer_kwargs"])
        self.vocab_size = int(self.tokenizer.vocab_size)
        self.pad_token_id = 0

    @classmethod
    def from_model_config(cls, model_cfg: Dict[str, Any]) -> "OpenClipTokenizer":
        check_open_clip_config(model_cfg)
        text_cfg = model_cfg.get("text_cfg", {})
        return cls({"context_length": text_cfg.get("context_length", 77),
                    "tokenizer_kwargs": text_cfg.get("tokenizer_kwargs", {})})

    @classmethod
    def from_name(cls, name: str) -> "OpenClipTokenizer":
        """``open_clip:<name>`` (a built-in architecture or ``local-dir:FOLDER``)."""
        return cls.from_model_config(open_clip_source(name[len(OPEN_CLIP_TOKENIZER_PREFIX):], None).model_cfg)

    @classmethod
    def from_folder(cls, folder: str) -> "OpenClipTokenizer":
        with open(os.path.join(folder, TOKENIZER_SETTINGS_FILE), encoding="utf-8") as handle:
            return cls(json.load(handle))

    def __call__(self, texts: Sequence[str], padding: str = "max_length", truncation: bool = True,
                 max_length: int = 0, return_tensors: str = "pt") -> Dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts), context_length=max_length or self.settings["context_length"])
        return {"input_ids": ids.long(), "attention_mask": (ids != self.pad_token_id).long()}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = set(self.tokenizer.all_special_ids) | {self.pad_token_id} if skip_special_tokens else set()
        kept: List[int] = [int(i) for i in ids if int(i) not in special]
        return self.tokenizer.decode(kept).strip()

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, TOKENIZER_SETTINGS_FILE), "w", encoding="utf-8") as handle:
            json.dump(self.settings, handle, indent=2)
            handle.write("\n")


def is_open_clip_tokenizer(name: str) -> bool:
    """A tokenizer name or folder that ``OpenClipTokenizer`` reads."""
    return name.startswith(OPEN_CLIP_TOKENIZER_PREFIX) or os.path.isfile(os.path.join(name, TOKENIZER_SETTINGS_FILE))


def load_open_clip_tokenizer(name: str) -> OpenClipTokenizer:
    if name.startswith(OPEN_CLIP_TOKENIZER_PREFIX):
        return OpenClipTokenizer.from_name(name)
    return OpenClipTokenizer.from_folder(name)
