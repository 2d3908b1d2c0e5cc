"""The dual encoder: a timm image tower, a Hugging Face text tower, projections, and the temperature (another
library's whole model as towers: ``zvl_ds.model.sources``).

Attributes: ``image_tower`` (timm model, ``num_classes=0``), ``text_tower`` (``transformers.AutoModel``, no
pooler), ``image_projection`` / ``text_projection`` (see ``build_projection``), and the temperature, read
through ``temperature()``: a learnable ``nn.Parameter`` named ``tau`` of shape (1,) for ``parameter`` (never
0-dim: DeepSpeed cannot broadcast 0-dim parameters), or a fresh fp32 tensor of shape (1,) for ``constant``
(not a parameter, not in the state dict, never cast to bf16 by an engine). Either way it is clamped to
``[loss.temperature.min, loss.temperature.max]`` at every use and DIVIDES the logits.

Nothing is downloaded: ``pretrained: true`` only uses weights already in the local Hugging Face / torch-hub
cache, and fails with a message saying where it looked; a path loads that file (``torch.load`` with
``weights_only=True``, or safetensors).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import zvl_ds  # noqa: F401  (torchvision shim before timm / transformers)
from zvl_ds.config import (ImageEncoderConfig, LossConfig, ModelConfig, SigmoidConfig, TextEncoderConfig,
                           TemperatureConfig)
from zvl_ds.model.presets import SOURCE_ARCHS
from zvl_ds.objective.mixup import MixupDraw, mix_images, mix_with_reversed
from zvl_ds.runtime.profile_ranges import profile_range

logger = logging.getLogger(__name__)

# L2 normalisation guard, as ZeroVL's x / (|x| + 1e-8)
_NORM_EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------------


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
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
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


def _cached_timm_weights(tower: nn.Module, tag: str) -> str:
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


# --------------------------------------------------------------------------------------------------
# Towers and heads
# --------------------------------------------------------------------------------------------------


def build_image_tower(cfg: ImageEncoderConfig) -> Tuple[nn.Module, int, Optional[WeightsReport]]:
    """A timm model without classifier; returns (tower, feature width, how its weights were loaded)."""
    import timm

    kwargs: Dict[str, Any] = dict(cfg.kwargs)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size

    def create(state: Optional[Dict] = None) -> nn.Module:
        if state is None:
            return timm.create_model(cfg.tag, pretrained=False, num_classes=0, **kwargs)
        # timm's pretrained path with an in-memory state dict: applies the model's checkpoint filter
        model = timm.create_model(cfg.tag, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"state_dict": state, "source": ""}, **kwargs)
        for attr in ("pretrained_cfg", "default_cfg"):
            if isinstance(getattr(model, attr, None), dict):
                getattr(model, attr).pop("state_dict", None)  # do not keep a second copy of the weights
        return model

    try:
        tower = create()
    except Exception as error:
        raise ValueError(f"model.image_encoder: timm cannot build {cfg.tag!r} with {kwargs}: {error}") from error
    report = None
    if cfg.pretrained is True:
        tower, report = load_image_weights(tower, _cached_timm_weights(tower, cfg.tag), create)
    elif isinstance(cfg.pretrained, str) and cfg.pretrained:
        tower, report = load_image_weights(tower, cfg.pretrained, create)
    if cfg.grad_checkpointing:
        if not hasattr(tower, "set_grad_checkpointing"):
            raise ValueError(f"model.image_encoder.grad_checkpointing: timm model {cfg.tag!r} does not support it")
        tower.set_grad_checkpointing(True)
    return tower, int(tower.num_features), report


def _text_config(cfg: TextEncoderConfig):
    from transformers import AutoConfig

    fields = dict(cfg.config)
    if "model_type" in fields:
        return AutoConfig.for_model(**fields)
    try:
        config = AutoConfig.from_pretrained(cfg.tag, local_files_only=True, trust_remote_code=False)
    except OSError as error:
        raise FileNotFoundError(
            f"model.text_encoder: no config for {cfg.tag!r} in the local cache and no model_type in "
            f"model.text_encoder.config; nothing is downloaded ({error})") from error
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def _without_pooler(factory: Callable[..., nn.Module], *args, **kwargs) -> nn.Module:
    """BERT-like models take ``add_pooling_layer``; the pooler is unused (ZeroVL drops it too)."""
    try:
        return factory(*args, add_pooling_layer=False, **kwargs)
    except TypeError as error:
        if "add_pooling_layer" not in str(error):
            raise
        return factory(*args, **kwargs)


def build_text_tower(cfg: TextEncoderConfig, attention: str = "sdpa") -> Tuple[nn.Module, int]:
    """A Hugging Face ``AutoModel`` (local directory or already-cached name, or built from a config), with
    ``attention`` (``sdpa`` or ``eager``) as its attention implementation."""
    from transformers import AutoModel

    try:
        if cfg.pretrained is False:
            tower = _without_pooler(AutoModel.from_config, _text_config(cfg), attn_implementation=attention)
        else:
            source = cfg.pretrained if isinstance(cfg.pretrained, str) and cfg.pretrained else cfg.tag
            overrides = {k: v for k, v in cfg.config.items() if k != "model_type"}
            try:
                tower = _without_pooler(AutoModel.from_pretrained, source, local_files_only=True,
                                        trust_remote_code=False, attn_implementation=attention, **overrides)
            except OSError as error:
                raise FileNotFoundError(
                    f"model.text_encoder: cannot load {source!r} from a local directory or the local Hugging Face "
                    f"cache; nothing is downloaded ({error})") from error
    except ValueError as error:
        if "attn_implementation" not in str(error) and "sdpa" not in str(error).lower():
            raise
        raise ValueError(f"model.attention={attention}: the text tower does not support it ({error}); "
                         "use model.attention=eager") from error
    width = next((getattr(tower.config, name) for name in ("hidden_size", "d_model", "dim")
                  if isinstance(getattr(tower.config, name, None), int)), None)
    if width is None:
        raise ValueError(f"model.text_encoder: cannot tell the hidden width of {type(tower).__name__}")
    if cfg.grad_checkpointing:
        enable_hf_checkpointing(tower, "model.text_encoder.grad_checkpointing")
    return tower, int(width)


def enable_hf_checkpointing(tower: nn.Module, key: str) -> None:
    """Activation checkpointing in a transformers model; non-reentrant: works with frozen inputs and replays the
    dropout RNG state in the recompute."""
    if not getattr(tower, "supports_gradient_checkpointing", False):
        raise ValueError(f"{key}: {type(tower).__name__} does not support it")
    if hasattr(tower, "activation_checkpointing_enable"):  # transformers >= 5.x name
        tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_image_attention(tower: nn.Module, attention: str) -> None:
    """timm attention blocks read ``fused_attn`` at every call: ``sdpa`` turns on
    ``F.scaled_dot_product_attention`` explicitly instead of relying on timm's environment default."""
    for module in tower.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = attention == "sdpa"


def compile_towers(model: "DualEncoder", mode: str, backend: str = "inductor") -> "DualEncoder":
    """``torch.compile`` each tower in place (``mode`` from ``model.compile``; ``none`` leaves them eager).

    In place (``nn.Module.compile``), so parameter names, state dicts and checkpoints are unchanged. Only the
    towers are compiled: the projections, mixup and temperature are small, and the profiler ranges around the
    model stay outside the compiled graphs. Random ops inside a compiled tower draw their seeds from torch's
    global generator, so DGA's replay of a chunk's RNG state repeats dropout in pass 2. ``backend`` is
    torch.compile's (tests use ``aot_eager``: the same graph capture without inductor's code generation).
    """
    if mode == "none":
        return model
    for tower in (model.image_tower, model.text_tower):
        tower.compile(mode=None if mode == "default" or backend != "inductor" else mode, backend=backend)
    return model


def build_projection(kind: str, width: int, dim: int) -> nn.Module:
    """``simple``: Linear(width, dim, bias=False) as ZeroVL. ``mlp``: Linear(width, width) - GELU -
    Linear(width, dim, bias=False), a small non-linear head (not ZeroVL's unused, broken ``complex`` head)."""
    if kind == "simple":
        return nn.Linear(width, dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim, bias=False))
    raise ValueError(f"model.projection.name: unknown projection {kind!r} (valid: simple, mlp)")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def _key_padding_mask(text_tower: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask handed to the text tower: for SDPA, the boolean [n, 1, 1, length] mask transformers would build.

    From a 2-d mask, transformers first asks whether any token is padded (``mask.all()``) to skip the mask: a
    host-device synchronisation in every forward of every chunk. A 4-d mask is taken as it is.
    """
    if getattr(getattr(text_tower, "config", None), "_attn_implementation", None) != "sdpa":
        return attention_mask
    return attention_mask[:, None, None, :].bool()


class DualEncoder(nn.Module):
    """Image and text towers with projections to a shared, L2-normalised space, plus the temperature."""

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, image_projection: nn.Module,
                 text_projection: nn.Module, temperature: TemperatureConfig, *, text_pooling: str = "cls",
                 target_token_idx: int = 0, image_only_cls_token: bool = True,
                 image_trainable: bool = True, text_trainable: bool = True,
                 sigmoid: Optional[SigmoidConfig] = None) -> None:
        super().__init__()
        if text_pooling not in ("cls", "mean"):
            raise ValueError(f"model.text_encoder.pooling: unknown pooling {text_pooling!r} (valid: cls, mean)")
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_projection = image_projection
        self.text_projection = text_projection
        self.text_pooling = text_pooling
        self.target_token_idx = target_token_idx
        self.image_only_cls_token = image_only_cls_token
        self.temperature_min = float(temperature.min)
        self.temperature_max = float(temperature.max)
        self.temperature_learnable = temperature.name == "parameter"
        if self.temperature_learnable:
            self.tau = nn.Parameter(torch.full((1,), float(temperature.value)))
        else:
            self.temperature_constant = float(temperature.value)
        # SigLIP's scale (learned as its log, so it stays positive) and bias; shape (1,) like tau, for DeepSpeed
        self.sigmoid_loss = sigmoid is not None
        if self.sigmoid_loss:
            self.logit_scale_log = nn.Parameter(torch.full((1,), math.log(sigmoid.scale_init)))
            self.logit_bias = nn.Parameter(torch.full((1,), float(sigmoid.bias_init)))
        # LiT-style locked towers: no gradients, and kept in eval mode (fixed BatchNorm statistics, no dropout)
        self.frozen_towers = [name for name, trainable in (("image_tower", image_trainable),
                                                            ("text_tower", text_trainable)) if not trainable]
        for name in self.frozen_towers:
            getattr(self, name).requires_grad_(False)
        self.image_weights_report: Optional[WeightsReport] = None
        self.train(True)

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        for name in getattr(self, "frozen_towers", []):
            getattr(self, name).eval()
        return self

    def temperature(self) -> torch.Tensor:
        """tau, shape (1,), clamped to the configured range; differentiable when learnable."""
        if self.temperature_learnable:
            return self.tau.clamp(self.temperature_min, self.temperature_max)
        device = next(self.parameters()).device
        value = min(max(self.temperature_constant, self.temperature_min), self.temperature_max)
        return torch.full((1,), value, dtype=torch.float32, device=device)

    def logit_scale_bias(self) -> Optional[torch.Tensor]:
        """(t, b) of the sigmoid loss, shape (2,), differentiable; None when the model has no sigmoid loss."""
        if not self.sigmoid_loss:
            return None
        return torch.cat([self.logit_scale_log.exp(), self.logit_bias])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled features [n, width], before projection."""
        features = self.image_tower(images)
        if features.dim() == 3:  # a tower that returns tokens: ZeroVL's vit.only_cls_token takes token 0
            features = features[:, 0] if self.image_only_cls_token else features.mean(dim=1)
        return features

    def text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The text tower's pooled features [n, width], before projection: token ``target_token_idx`` (cls) or
        the attention-masked mean of the last hidden states (mean)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_tower(input_ids=input_ids,
                                 attention_mask=_key_padding_mask(self.text_tower, attention_mask)).last_hidden_state
        if self.text_pooling == "cls":
            return hidden[:, self.target_token_idx]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def encode_image(self, images: torch.Tensor, mixup: Optional[MixupDraw] = None) -> torch.Tensor:
        """L2-normalised image embeddings [n, dim]; an image-side mixup mixes the pixels of THIS batch with its
        reverse first."""
        if mixup is not None and mixup.side == "image":
            images = mix_images(images, mixup.lam)
        return F.normalize(self.image_projection(self.image_features(images)), dim=-1, eps=_NORM_EPS)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    mixup: Optional[MixupDraw] = None) -> torch.Tensor:
        """L2-normalised text embeddings [n, dim]; a text-side mixup mixes the projected embeddings of THIS
        batch with their reverse, before normalisation ("manifold" mixup, as ZeroVL)."""
        projected = self.text_projection(self.text_features(input_ids, attention_mask))
        if mixup is not None and mixup.side == "text":
            projected = mix_with_reversed(projected, mixup.lam)
        return F.normalize(projected, dim=-1, eps=_NORM_EPS)

    def forward(self, images: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, mixup: Optional[MixupDraw] = None
                ) -> Dict[str, Optional[torch.Tensor]]:
        """``{"image_embeds", "text_embeds", "temperature", "logit_scale_bias"}``; a modality not given is None,
        and so is ``logit_scale_bias`` for the softmax losses."""
        with profile_range("zvl.model_forward"):  # the engine's own work around it shows as the difference
            return {
                "image_embeds": None if images is None else self.encode_image(images, mixup),
                "text_embeds": None if input_ids is None else self.encode_text(input_ids, attention_mask, mixup),
                "temperature": self.temperature(),
                "logit_scale_bias": self.logit_scale_bias(),
            }


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig) -> DualEncoder:
    """The dual encoder a config describes (``model.arch`` presets are already merged by zvl_ds.config)."""
    if model_cfg.arch in SOURCE_ARCHS:  # another library's whole model: zvl_ds.model.sources
        from zvl_ds.model.sources import build_sourced_model

        return build_sourced_model(model_cfg, loss_cfg)
    image_cfg, text_cfg, proj_cfg = model_cfg.image_encoder, model_cfg.text_encoder, model_cfg.projection
    image_tower, image_width, report = build_image_tower(image_cfg)
    set_image_attention(image_tower, model_cfg.attention)
    text_tower, text_width = build_text_tower(text_cfg, model_cfg.attention)
    image_projection = build_projection(proj_cfg.name, image_width, proj_cfg.dim)
    text_projection = build_projection(proj_cfg.name, text_width, proj_cfg.dim)
    image_projection.requires_grad_(proj_cfg.image_projector_trainable)
    text_projection.requires_grad_(proj_cfg.text_projector_trainable)
    model = DualEncoder(image_tower, text_tower, image_projection, text_projection, loss_cfg.temperature,
                        text_pooling=text_cfg.pooling, target_token_idx=text_cfg.target_token_idx,
                        image_only_cls_token=image_cfg.vit.only_cls_token,
                        image_trainable=image_cfg.trainable, text_trainable=text_cfg.trainable,
                        sigmoid=loss_cfg.sigmoid if loss_cfg.name == "SigLIP" else None)
    model.image_weights_report = report
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_summary(model: DualEncoder) -> Dict[str, Dict[str, int]]:
    """Parameter counts per part (total and trainable), for logs."""
    parts = {"image_tower": model.image_tower, "text_tower": model.text_tower,
             "image_projection": model.image_projection, "text_projection": model.text_projection}
    summary = {name: {"total": count_parameters(m), "trainable": count_parameters(m, True)}
               for name, m in parts.items()}
    summary["all"] = {"total": count_parameters(model), "trainable": count_parameters(model, True)}
    return summary
