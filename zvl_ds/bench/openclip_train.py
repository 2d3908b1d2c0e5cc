"""OpenCLIP's own training loop (``open_clip_train``) on the towers of a zvl_ds config, for a side-by-side speed figure.

``write_model_folder`` writes an open_clip ``local-dir:`` model folder holding the same towers as ``cfg.model``:
the timm image tower by name (CLS token, linear projection without bias), the Hugging Face text tower built from
``model.text_encoder.config`` (random weights saved next to its ``config.json``, since open_clip loads an HF tower
with ``from_pretrained``; nothing is downloaded), CLS pooling of the last hidden state, a linear projection, and
``model.max_length`` tokens. ``openclip_train_command`` runs ``open_clip_train.main`` on synthetic data with
``--accum-freq``; ``samples_per_second`` reads the figure its log prints for every optimizer step.

This is OpenCLIP's code as users run it, not the in-repo copy of its step (``openclip_step``, the CPU stand-in).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
from typing import Dict, List, Sequence

import torch

from zvl_ds.config import Config
from zvl_ds.data.transforms import resolve_tokenizer_path

# open_clip's HF poolers by zvl_ds's model.text_encoder.pooling (the pooler's class name in snake case)
_POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}
# open_clip_train's --precision for a zvl_ds precision: mixed precision with fp32 weights, as OpenCLIP trains
OPENCLIP_PRECISION = {"bf16": "amp_bf16", "fp16": "amp", "fp32": "fp32"}
# "Batch (t): 1.234, 5678.9/s, 5678.9/s/gpu" in each of open_clip_train's step lines
_STEP_LINE = re.compile(r"Batch \(t\): ([0-9.]+), ([0-9.eE+]+)/s, ([0-9.eE+]+)/s/gpu")


def openclip_model_config(cfg: Config, text_folder: str) -> Dict[str, object]:
    """open_clip's ``model_cfg`` for the towers of ``cfg.model``, the text tower read from ``text_folder``."""
    image, text = cfg.model.image_encoder, cfg.model.text_encoder
    if image.kwargs:
        raise ValueError(f"model.image_encoder.kwargs={image.kwargs}: open_clip's timm tower takes a model name only")
    if cfg.model.projection.name != "simple":
        raise ValueError(f"model.projection.name={cfg.model.projection.name}: only `simple` (linear) maps onto "
                         "open_clip's projections")
    size = image.img_size or cfg.transforms.input_size
    return {
        "embed_dim": cfg.model.projection.dim,
        "vision_cfg": {"timm_model_name": image.tag, "timm_model_pretrained": False, "timm_pool": "token",
                       "timm_proj": "linear", "timm_proj_bias": False, "image_size": size},
        "text_cfg": {"hf_model_name": text_folder, "hf_tokenizer_name": text_folder, "hf_model_pretrained": False,
                     "hf_proj_type": "linear", "hf_pooler_type": _POOLERS[text.pooling],
                     "context_length": cfg.model.max_length},
    }


def write_model_folder(cfg: Config, folder: str, seed: int = 0) -> str:
    """An open_clip ``local-dir:`` folder with the towers of ``cfg``; returns ``local-dir:FOLDER``."""
    from transformers import AutoConfig, AutoModel  # seconds to import: only the openclip stage's process needs it

    # open_clip takes any weights file in a local-dir folder for the whole model's, so the text tower's weights
    # live in a subfolder; the tokenizer's files stay at the top, where open_clip looks for them
    folder = os.path.abspath(folder)
    text_folder = os.path.join(folder, "text_tower")
    os.makedirs(text_folder, exist_ok=True)
    text = cfg.model.text_encoder
    if not text.config:
        raise ValueError("model.text_encoder.config is empty: the text tower must be built from a config here")
    settings = dict(text.config)
    hf_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    AutoModel.from_config(hf_config).save_pretrained(text_folder)  # random weights: open_clip loads them by name
    if not text.tokenizer:
        raise ValueError("model.text_encoder.tokenizer is not set: open_clip needs the tokenizer's files in the folder")
    tokenizer = resolve_tokenizer_path(text.tokenizer)
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), os.path.join(folder, name))
    with open(os.path.join(folder, "open_clip_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"model_cfg": openclip_model_config(cfg, text_folder),
                   "preprocess_cfg": {"mean": list(cfg.transforms.normalize.mean),
                                      "std": list(cfg.transforms.normalize.std)}}, handle, indent=1)
    return f"local-dir:{folder}"


def openclip_train_command(model: str, logs: str, global_batch: int, chunk: int, steps: int, precision: str,
                           device: str, workers: int, compile_model: bool = False) -> List[str]:
    """``open_clip_train.main`` for ``steps`` optimizer steps of ``global_batch`` in micro-batches of ``chunk``.

    Run through ``python -c`` so that ``zvl_ds`` is imported first (its torchvision shim on CPU machines)."""
    if global_batch % chunk:
        raise ValueError(f"global batch {global_batch} is not a multiple of the chunk {chunk}")
    args = ["--model", model, "--dataset-type", "synthetic", "--train-num-samples", str(global_batch * steps),
            "--batch-size", str(chunk), "--accum-freq", str(global_batch // chunk), "--epochs", "1",
            "--precision", precision, "--device", device, "--workers", str(workers), "--lr", "1e-4",
            "--warmup", "0", "--wd", "0.1", "--save-frequency", "0", "--log-every-n-steps", "1",
            "--logs", logs, "--name", "openclip_train", "--report-to", "", "--seed", "0"]
    if compile_model:
        args.append("--torchcompile")
    launcher = ("import sys, runpy, zvl_ds; sys.argv = ['open_clip_train.main'] + sys.argv[1:]; "
                "runpy.run_module('open_clip_train.main', run_name='__main__')")
    return [sys.executable, "-c", launcher] + args


def step_rates(log_text: str) -> List[float]:
    """samples/s of every optimizer step that open_clip_train logged, in order."""
    return [float(match.group(2)) for match in _STEP_LINE.finditer(log_text)]


def samples_per_second(rates: Sequence[float]) -> float:
    """The steady figure: the median over the steps after the first (which includes warm-up), or the only one."""
    if not rates:
        raise ValueError("open_clip_train logged no training step (no 'Batch (t): ...' line)")
    return statistics.median(rates[1:] if len(rates) > 1 else rates)
