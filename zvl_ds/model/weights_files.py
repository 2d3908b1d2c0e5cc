"""Weights files for the towers: reading them without running code, and matching a file to a timm image tower (by
name, with timm resizing what differs, or by position when only the names differ).

Nothing is downloaded: ``pretrained: true`` only uses weights already in the local Hugging Face / torch-hub cache
(``cached_timm_weights``), and fails with a message saying where it looked.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


@dataclass
class WeightsReport:
    """How a weights file was matched to a tower; kept on the model as ``image_weights_report``."""

    source: str
    mode: str  # "by_name", "by_name_adapted" (timm resized some tensors) or "by_position"
    loaded: int  # tensors taken from the file
    ignored: List[str] = field(default_factory=list)  # file tensors with no place in the tower (e.g. a classifier)
    adapted: List[str] = field(default_factory=list)  # tower tensors timm adapted (e.g. resampled position embeddings)
    renamed_examples: List[Tuple[str, str]] = field(default_factory=list)  # (file key, tower key), by_position only


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch pickle read with ``weights_only=True``.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"module": ...}`` and a ``module.`` prefix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except SafetensorError as error:  # not a safetensors file, or a damaged one
            raise ValueError(f"cannot read {path} as a safetensors file: {error}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a pickle with code in it, or not a torch file at all
            raise ValueError(f"cannot read {path} as a weights-only torch file: {error}") from error
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _load_by_position(tower: nn.Module, state: Dict[str, torch.Tensor], source: str) -> WeightsReport:
    """Match tensors in order when names differ but shapes agree one-to-one (e.g. lukemelas EfficientNet
    files into timm). Trailing file tensors the tower lacks (a classifier with ``num_classes=0``) are ignored."""
    own = [(k, v) for k, v in tower.state_dict().items() if not _is_counter(k)]
    src = [(k, v) for k, v in state.items() if not _is_counter(k)]
    if len(src) < len(own):
        raise ValueError(f"{source}: key names do not match the timm model and the file has fewer tensors "
                         f"({len(src)}) than the model ({len(own)}), so they cannot be matched by position")
    for (own_key, own_value), (src_key, src_value) in zip(own, src):
        if own_value.shape != src_value.shape:
            raise ValueError(f"{source}: key names do not match the timm model, and matching by position fails "
                             f"at model tensor {own_key} {tuple(own_value.shape)} vs file tensor {src_key} "
                             f"{tuple(src_value.shape)}")
    remapped = {own_key: src_value for (own_key, _), (_, src_value) in zip(own, src)}
    tower.load_state_dict(remapped, strict=False)
    pairs = [(src_key, own_key) for (own_key, _), (src_key, _) in zip(own, src)]
    report = WeightsReport(source=source, mode="by_position", loaded=len(own),
                           ignored=[k for k, _ in src[len(own):]], renamed_examples=pairs[:3] + pairs[-2:])
    logger.warning("loaded %d tensors from %s BY POSITION (names differ, shapes match one-to-one, e.g. %s -> %s); "
                   "ignored trailing file tensors: %s", len(own), source, pairs[0][0], pairs[0][1],
                   ", ".join(report.ignored) or "none")
    return report


def load_image_weights(tower: nn.Module, path: str, rebuild_with_state: Callable[[Dict], nn.Module]
                       ) -> Tuple[nn.Module, WeightsReport]:
    """Load a weights file into a timm tower; returns the (possibly rebuilt) tower and a report.

    Names match: copied directly; where some shapes differ (another ``img_size``), the tower is rebuilt
    through timm's own pretrained loader, which resamples position embeddings. Names differ: matched by
    position (see ``_load_by_position``). Anything else raises, naming the first tensor that does not fit.
    """
    state = read_state_dict(path)
    own = tower.state_dict()
    wanted = [k for k in own if not _is_counter(k)]
    missing = [k for k in wanted if k not in state]
    if len(missing) == len(wanted) or (missing and len(missing) > len(wanted) // 2):
        return tower, _load_by_position(tower, state, path)
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the model's tensors are missing from the file, e.g. "
                         f"{', '.join(missing[:5])}")
    ignored = sorted(k for k in state if k not in own and not _is_counter(k))
    reshaped = [k for k in wanted if state[k].shape != own[k].shape]
    if not reshaped:
        tower.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
        return tower, WeightsReport(source=path, mode="by_name", loaded=len(wanted), ignored=ignored)
    tower = rebuild_with_state(state)
    rebuilt = tower.state_dict()
    unchanged = [k for k in wanted if k not in reshaped]
    if any(not torch.equal(rebuilt[k], state[k].to(rebuilt[k].dtype)) for k in unchanged):
        raise ValueError(f"{path}: timm's loader did not take the file's tensors (tried because of shape "
                         f"differences in {', '.join(reshaped[:5])})")
    return tower, WeightsReport(source=path, mode="by_name_adapted", loaded=len(wanted), ignored=ignored,
                                adapted=reshaped)


def cached_timm_weights(tower: nn.Module, tag: str) -> str:
    """The local file holding a timm model's default pretrained weights, found in the caches only."""
    cfg = dict(getattr(tower, "pretrained_cfg", None) or {})
    looked: List[str] = []
    if cfg.get("file"):
        looked.append(str(cfg["file"]))
        if os.path.isfile(cfg["file"]):
            return str(cfg["file"])
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else [
            "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
        for name in names:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            looked.append(f"Hugging Face cache {repo}/{name}")
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.get("url"):
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg["url"]))
        looked.append(cached)
        if os.path.isfile(cached):
            return cached
    raise FileNotFoundError(
        f"model.image_encoder.pretrained=true but no weights of {tag!r} are in the local cache (looked at: "
        f"{'; '.join(looked) or 'timm lists no weights for this model'}). Nothing is downloaded: put the file "
        f"there, or set model.image_encoder.pretrained to a weights file path, or to false.")
