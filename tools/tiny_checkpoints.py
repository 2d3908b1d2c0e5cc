"""Tiny random checkpoints in the forms users hold, for tests and the CPU fine-tuning demo (nothing downloaded):
a Hugging Face ``CLIPModel`` / ``SiglipModel`` folder (config, weights, tokenizer, preprocessor config) and an
OpenCLIP ``local-dir`` folder (``open_clip_config.json`` + ``open_clip_model.safetensors``).

The towers are 2 blocks of width 32 at 32 px (patch 8) with 16 tokens; the Hugging Face folders carry the packaged
demo word-piece tokenizer (its ``[CLS]`` / ``[SEP]`` are CLIP's start / end tokens), the OpenCLIP folder uses
OpenCLIP's own BPE tokenizer. The logit scale (and SigLIP's bias) are set to values a default init would not give,
so a test can tell that they came from the checkpoint.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict

import torch

import zvl_ds  # noqa: F401  (torchvision shim before transformers / open_clip)

KINDS = ("hf_clip", "hf_siglip", "open_clip")
IMAGE_SIZE, TOKENS, WIDTH = 32, 16, 32
DEMO_VOCAB = 288  # lines of zvl_ds/assets/demo_tokenizer/vocab.txt
CLIP_TEMPERATURE = 0.05  # logit_scale = log(1 / 0.05)
SIGLIP_SCALE, SIGLIP_BIAS = 8.0, -6.0
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.26, 0.27]


def _tower_sizes(dropout: float) -> Dict[str, Any]:
    return {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_hidden_layers": 2, "num_attention_heads": 2,
            "attention_dropout": dropout}


def tiny_hf_config(kind: str, dropout: float = 0.0):
    """A ``CLIPConfig`` / ``SiglipConfig`` with tiny towers (``attention_dropout`` = ``dropout``)."""
    from transformers import CLIPConfig, SiglipConfig

    text = {**_tower_sizes(dropout), "vocab_size": DEMO_VOCAB, "max_position_embeddings": TOKENS}
    vision = {**_tower_sizes(dropout), "image_size": IMAGE_SIZE, "patch_size": 8}
    text.update(pad_token_id=0, bos_token_id=2, eos_token_id=3)  # the demo tokenizer's [PAD], [CLS], [SEP]
    if kind == "hf_clip":
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return SiglipConfig(text_config=text, vision_config=vision)


def write_tiny_hf_folder(out_dir: str, kind: str = "hf_clip", weights: bool = True, dropout: float = 0.0,
                         seed: int = 0) -> str:
    """A Hugging Face folder as ``save_pretrained`` writes it; without ``weights`` no weights file."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, SiglipImageProcessor, SiglipModel

    from zvl_ds.data.transforms import resolve_tokenizer_path

    os.makedirs(out_dir, exist_ok=True)
    config = tiny_hf_config(kind, dropout)
    torch.manual_seed(seed)
    model = (CLIPModel if kind == "hf_clip" else SiglipModel)(config)
    with torch.no_grad():
        # trained checkpoints have no zero biases (transformers initialises them to zero): a key bias of zero gets
        # only rounding noise as its gradient, so comparisons against a reference would measure noise
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
        if kind == "hf_clip":
            model.logit_scale.fill_(math.log(1.0 / CLIP_TEMPERATURE))
        else:
            model.logit_scale.fill_(math.log(SIGLIP_SCALE))
            model.logit_bias.fill_(SIGLIP_BIAS)
    if weights:
        model.save_pretrained(out_dir)
    else:
        config.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_path("zvl_ds:demo_tokenizer"), local_files_only=True)
    tokenizer.save_pretrained(out_dir)
    if kind == "hf_clip":
        processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, do_center_crop=True,
                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                       image_mean=MEAN, image_std=STD)
    else:
        processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=MEAN,
                                         image_std=STD)
    processor.save_pretrained(out_dir)
    return out_dir


def tiny_open_clip_config(patch_dropout: float = 0.0) -> Dict[str, Any]:
    """An OpenCLIP model config (``model_cfg``) with tiny towers."""
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": WIDTH, "head_width": 16, "patch_size": 8,
                           "patch_dropout": patch_dropout},
            "text_cfg": {"context_length": TOKENS, "vocab_size": 49408, "width": WIDTH, "heads": 2, "layers": 2}}


def write_tiny_open_clip_folder(out_dir: str, weights: bool = True, patch_dropout: float = 0.0, seed: int = 0) -> str:
    """An OpenCLIP ``local-dir`` folder of a plain ``CLIP`` model, as OpenCLIP's hub exports lay it out."""
    import open_clip
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    model_cfg = tiny_open_clip_config(patch_dropout)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**model_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / CLIP_TEMPERATURE))
    with open(os.path.join(out_dir, "open_clip_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": {"mean": MEAN, "std": STD}}, handle, indent=2)
    if weights:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out_dir, "open_clip_model.safetensors"))
    return out_dir


def write_tiny_checkpoint(kind: str, out_dir: str, weights: bool = True) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    if kind == "open_clip":
        return write_tiny_open_clip_folder(out_dir, weights)
    return write_tiny_hf_folder(out_dir, kind, weights)
