"""Model presets: ``model.arch: NAME`` fills the ``model:`` section with one of these, explicit keys winning.

Each preset has named variants (``model.model_type``, LAVIS's name for them), overlaid on the preset before the
explicit keys: the preset, then its variant, then what the config says. Leaving ``model_type`` out selects the
preset's default variant (LAVIS's ``default_config``), which is the preset as it is.

Plain mappings (no code), merged into the raw config before it is typed, so a preset or a variant can only set
keys that ``zvl_ds.config.model_section.ModelConfig`` has.
"""
from __future__ import annotations

from typing import Any, Dict

MODEL_PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's model: ViT-B/16 (ImageNet-21k) + BERT-base, [CLS] pooling, 512-d projections.
    "vit_b16_bert_base": {
        "max_length": 25,
        # timm's current name for ZeroVL's vit_base_patch16_224_in21k (the same weights; the old name warns)
        "image_encoder": {"tag": "vit_base_patch16_224.augreg_in21k", "embedding_dim": 768, "img_size": 224},
        "text_encoder": {"tag": "bert-base-uncased", "embedding_dim": 768, "pooling": "cls"},
        "projection": {"name": "simple", "dim": 512},
    },
    # A CPU-sized model built from configs (no weights): a 2-block ViT at 32 px and a 2-layer BERT.
    "tiny": {
        "max_length": 16,
        "image_encoder": {
            "tag": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32, "embedding_dim": 64,
            "kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
        },
        "text_encoder": {
            "tag": "bert", "pretrained": False, "embedding_dim": 64, "pooling": "cls",
            "tokenizer": "zvl_ds:demo_tokenizer",
            # vocab_size = the lines of zvl_ds/assets/demo_tokenizer/vocab.txt (a test checks they agree)
            "config": {"model_type": "bert", "vocab_size": 288, "hidden_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64},
        },
        "projection": {"name": "simple", "dim": 64},
    },
    # Whole models of another library (zvl_ds.model.sources): the towers, projections, tokenizer, caption length,
    # image transforms and loss come from model.hf_folder / model.open_clip (zvl_ds.config.model_sources)
    "hf_clip": {},
    "hf_siglip": {},
    "open_clip": {},
}

# model.arch values whose towers are another library's whole model, not a timm + Hugging Face pair
SOURCE_ARCHS = ("hf_clip", "hf_siglip", "open_clip")

# model.arch preset -> model.model_type variant -> the keys it overlays on the preset (the default variant is {})
MODEL_VARIANTS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "vit_b16_bert_base": {
        "base": {},
        # timm resamples the 224 px weights' position-embedding grid to 24 x 24 when it loads them
        "res384": {"image_encoder": {"img_size": 384}},
    },
    "tiny": {
        "base": {},
        # 64 image tokens at 32 px instead of 16: learns positions and shapes faster (what configs/demo.yaml uses)
        "patch4": {"image_encoder": {"kwargs": {"patch_size": 4}}},
    },
    "hf_clip": {"base": {}},
    "hf_siglip": {"base": {}},
    "open_clip": {"base": {}},
}

# model.arch preset -> the variant used when model.model_type is not given
DEFAULT_VARIANT: Dict[str, str] = {"vit_b16_bert_base": "base", "tiny": "base", "hf_clip": "base",
                                   "hf_siglip": "base", "open_clip": "base"}

# model.arch preset -> model.model_type variant -> one line for the generated presets table
VARIANT_HELP: Dict[str, Dict[str, str]] = {
    "vit_b16_bert_base": {
        "base": "224 px, as the paper",
        "res384": "384 px images (24 x 24 patches; the 224 px weights' position embeddings are resampled); set "
                  "`transforms.input_size` and the crop sizes to 384 too",
    },
    "tiny": {
        "base": "patch 8 (16 image tokens)",
        "patch4": "patch 4 (64 image tokens), as `configs/demo.yaml` sets explicitly",
    },
    "hf_clip": {"base": "the folder's model as it is"},
    "hf_siglip": {"base": "the folder's model as it is"},
    "open_clip": {"base": "the named model as it is"},
}

# model.arch preset -> one line for the generated presets table (python -m zvl_ds.config --presets)
PRESET_HELP: Dict[str, str] = {
    "vit_b16_bert_base": "The paper's model: ViT-B/16 (ImageNet-21k, 224 px) + BERT-base, [CLS] pooling, 512-d "
                         "simple projections, 25 tokens. Needs both models in the local caches.",
    "tiny": "A CPU-sized model built from configs, no weights: a 2-block ViT at 32 px (patch 8, width 64) and a "
            "2-layer BERT (width 64) with the packaged demo tokenizer, 64-d projections, 16 tokens.",
    "hf_clip": "A Hugging Face `CLIPModel` folder (`model.hf_folder`): its vision and text models, projections, "
               "logit scale (the learnable temperature), tokenizer and preprocessing.",
    "hf_siglip": "A Hugging Face `SiglipModel` folder (`model.hf_folder`): its vision model with the attention-pooling "
                 "head, its text model with its head, scale and bias (loss `SigLIP`), tokenizer and preprocessing.",
    "open_clip": "An OpenCLIP model (`model.open_clip.name`, optional `model.open_clip.pretrained`; the `open_clip` "
                 "extra): its image and text towers, logit scale (and bias), tokenizer and preprocessing.",
}
