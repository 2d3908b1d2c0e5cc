"""Tiny random checkpoints in the forms users hold, for tests and the CPU fine-tuning demo (nothing downloaded):
a Hugging Face ``CLIPModel`` / ``SiglipModel`` folder (config, weights, tokenizer, preprocessor config) and an
OpenCLIP ``local-dir`` folder (``open_clip_config.json`` + ``open_clip_model.safetensors``).

The towers are 2 blocks of width 32 at 32 px (patch 8) with 16 tokens; the Hugging Face folders carry the packaged
demo word-piece tokenizer (its ``[CLS]`` / ``[SEP]`` are CLIP's start / end tokens), the OpenCLIP folder uses
OpenCLIP's own BPE tokenizer. ``write_tiny_teacher_folder`` writes a distillation teacher that differs from the
``tiny`` student in both inputs: 48 px images and a tokenizer of its own (whole words, other ids, 20 tokens). The
logit scale (and SigLIP's bias) are set to values a default init would not give, so a test can tell that they came
from the checkpoint.
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


def tiny_hf_config(kind: str, dropout: float = 0.0, image_size: int = IMAGE_SIZE, tokens: int = TOKENS,
                   vocab_size: int = DEMO_VOCAB):
    """A ``CLIPConfig`` / ``SiglipConfig`` with tiny towers (``attention_dropout`` = ``dropout``)."""
    from transformers import CLIPConfig, SiglipConfig

    text = {**_tower_sizes(dropout), "vocab_size": vocab_size, "max_position_embeddings": tokens}
    vision = {**_tower_sizes(dropout), "image_size": image_size, "patch_size": 8}
    text.update(pad_token_id=0, bos_token_id=2, eos_token_id=3)  # the demo tokenizer's [PAD], [CLS], [SEP]
    if kind == "hf_clip":
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return SiglipConfig(text_config=text, vision_config=vision)


def write_tiny_hf_folder(out_dir: str, kind: str = "hf_clip", weights: bool = True, dropout: float = 0.0,
                         seed: int = 0, image_size: int = IMAGE_SIZE, tokenizer=None, mean=MEAN, std=STD) -> str:
    """A Hugging Face folder as ``save_pretrained`` writes it; without ``weights`` no weights file. ``tokenizer``:
    the folder's tokenizer (default: the demo tokenizer), whose size and length the text tower takes."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, SiglipImageProcessor, SiglipModel

    from zvl_ds.data.transforms import resolve_tokenizer_path

    os.makedirs(out_dir, exist_ok=True)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_path("zvl_ds:demo_tokenizer"),
                                                  local_files_only=True)
        tokens = TOKENS
    else:
        tokens = tokenizer.model_max_length
    config = tiny_hf_config(kind, dropout, image_size, tokens, len(tokenizer))
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
    tokenizer.save_pretrained(out_dir)
    if kind == "hf_clip":
        processor = CLIPImageProcessor(size={"shortest_edge": image_size}, do_center_crop=True,
                                       crop_size={"height": image_size, "width": image_size},
                                       image_mean=mean, image_std=std)
    else:
        processor = SiglipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=mean,
                                         image_std=std)
    processor.save_pretrained(out_dir)
    return out_dir


TEACHER_IMAGE_SIZE, TEACHER_TOKENS = 48, 20
TEACHER_MEAN, TEACHER_STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def teacher_tokenizer():
    """A tokenizer of its own for the tiny teacher: the demo vocabulary's whole words in reverse order (so every word
    has another id than in the demo tokenizer), split on whitespace and punctuation, lower-cased, between ``<s>`` and
    ``</s>``, padded with ``<pad>`` to 20 tokens. Its special ids (pad 0, start 2, end 3) are the tiny towers'."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from zvl_ds.data.transforms import resolve_tokenizer_path

    with open(os.path.join(resolve_tokenizer_path("zvl_ds:demo_tokenizer"), "vocab.txt"), encoding="utf-8") as handle:
        words = [line.strip() for line in handle if line.strip() and not line.startswith(("[", "##"))]
    special = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(special + words[::-1])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=TEACHER_TOKENS)


def write_tiny_teacher_folder(out_dir: str, kind: str = "hf_clip", seed: int = 1) -> str:
    """A tiny Hugging Face CLIP (or SigLIP) teacher that differs from the ``tiny`` student in both inputs: 48 px
    images with their own normalisation, and ``teacher_tokenizer``'s token ids, 20 per caption."""
    return write_tiny_hf_folder(out_dir, kind, seed=seed, image_size=TEACHER_IMAGE_SIZE, tokenizer=teacher_tokenizer(),
                                mean=TEACHER_MEAN, std=TEACHER_STD)


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
