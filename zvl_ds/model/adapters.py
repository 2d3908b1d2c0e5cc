"""LoRA adapters on the towers through Hugging Face ``peft`` (``model.image_encoder.lora`` /
``model.text_encoder.lora``; the optional ``peft`` extra, imported only when a tower has adapters).

peft injects its LoRA layers into a tower in place (``peft.inject_adapter_in_model``): each target module becomes a
peft layer that keeps the original module as ``base_layer`` and adds ``lora_A`` / ``lora_B``, so its parameter names
gain ``.base_layer`` and ``.lora_A.default`` / ``.lora_B.default``; the tower stays the same module otherwise. The
tower's own parameters are frozen except the groups partial locking unlocks (``unlocked_groups`` /
``unlocked_layers``); the adapters, the projections and the temperature train. peft's LoRA dropout is a
``torch.nn.Dropout`` drawing from the global generator, which the DGA step restores before each chunk's
recomputation, so pass 2 repeats pass 1's masks.

Default targets (``target_modules: null``): the first row of ``DEFAULT_TARGETS`` whose every name matches a module of
the tower. Checkpoints of a run with adapters hold only its trainable tensors; the frozen base is identified by
``base_identity`` (where it came from and the SHA-256 of its frozen tensors) and rebuilt from the config.
``merge_adapters`` folds each adapter into its base weight (W + alpha / r * B A) and puts the base module back, so a
merged model has the names and the forward of a model without adapters (every export format but ``--adapters-only``).
"""
from __future__ import annotations

import hashlib
import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from zvl_ds.config import ConfigError, LoraOptions, ModelConfig

ADAPTER_BASE_FILE = "adapter_base.json"  # in each checkpoint folder of a run with adapters
TOWERS = (("image_tower", "image_encoder"), ("text_tower", "text_encoder"))

# (tower kind, target modules): the default list of the first kind all of whose names the tower has
DEFAULT_TARGETS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("Hugging Face CLIP / SigLIP (attention q, v)", ("q_proj", "v_proj")),
    ("Hugging Face BERT-like encoder (attention q, v)", ("query", "value")),
    ("timm ViT (fused attention q/k/v and its output)", ("attn.qkv", "attn.proj")),
    ("timm EfficientNet / MobileNet (pointwise convolutions)", ("conv_pw", "conv_pwl")),
    ("OpenCLIP transformer (MLP; torch's MultiheadAttention has no module per projection)",
     ("mlp.c_fc", "mlp.c_proj")),
)
_ADAPTER_NAME = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|dropout)\.")


def import_peft():
    """The ``peft`` package, or a config error naming the extra that installs it."""
    try:
        import peft
    except ImportError as error:
        raise ConfigError("model.*.lora needs Hugging Face peft, an optional extra: pip install -e .[peft] "
                          f"(or pip install peft) ({error})") from None
    return peft


def is_adapter_parameter(name: str) -> bool:
    """A LoRA tensor peft added (``...lora_A.default.weight``), as opposed to one of the model's own."""
    return bool(_ADAPTER_NAME.search(f".{name}"))


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter_parameter(name) for name, _ in model.named_parameters())


def adapters_configured(model_cfg: ModelConfig) -> bool:
    return model_cfg.image_encoder.lora.enabled or model_cfg.text_encoder.lora.enabled


# ------------------------------------------------------------------------------------------------ targets

def _adaptable_types() -> Tuple[type, ...]:
    """The module types peft's LoRA wraps (transformers' GPT-2-style Conv1D included)."""
    kinds: List[type] = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding]
    try:
        from transformers.pytorch_utils import Conv1D

        kinds.append(Conv1D)
    except ImportError:
        pass
    return tuple(kinds)


def _inside_multihead_attention(tower: nn.Module) -> set:
    """Modules torch's MultiheadAttention holds but never calls (it reads ``out_proj.weight`` directly)."""
    return {f"{name}.{child}" if name else child for name, module in tower.named_modules()
            if isinstance(module, nn.MultiheadAttention) for child, _ in module.named_children()}


def adaptable_modules(tower: nn.Module) -> List[str]:
    """Names of the tower's modules an adapter can go on."""
    kinds, unreachable = _adaptable_types(), _inside_multihead_attention(tower)
    return [name for name, module in tower.named_modules()
            if name and isinstance(module, kinds) and name not in unreachable]


def matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the whole name, or a suffix after a dot."""
    return name == target or name.endswith(f".{target}")


def module_patterns(names: List[str]) -> str:
    """Module names with their block indices as N, each pattern once: what a message lists."""
    patterns = sorted({re.sub(r"\.\d+(?=\.|$)", ".N", name) for name in names})
    return ", ".join(patterns)


def default_targets(tower: nn.Module) -> Optional[List[str]]:
    names = adaptable_modules(tower)
    for _, targets in DEFAULT_TARGETS:
        if all(any(matches(name, target) for name in names) for target in targets):
            return list(targets)
    return None


def resolve_targets(tower: nn.Module, options: LoraOptions, where: str) -> List[str]:
    """The tower's target list (the default when none is given); a name that matches none of the modules an adapter
    can go on is an error listing those modules."""
    adaptable = adaptable_modules(tower)
    listing = (f"the {type(tower).__name__} modules an adapter can go on (name them whole or by a dotted suffix, "
               f"e.g. the last part): {module_patterns(adaptable)}")
    targets = options.target_modules
    if targets is None:
        targets = default_targets(tower)
        if targets is None:
            raise ConfigError(f"{where}.lora.target_modules: no default list for a {type(tower).__name__} tower; "
                              f"name the modules, from {listing}")
        return targets
    all_names = [name for name, _ in tower.named_modules() if name]
    for target in targets:
        if any(matches(name, target) for name in adaptable):
            continue
        found = [name for name in all_names if matches(name, target)]
        problem = "matches no module of the tower"
        if found:
            why = (", whose weight torch's MultiheadAttention reads directly, so an adapter there would never run"
                   if found[0] in _inside_multihead_attention(tower) else "")
            problem = (f"matches only modules an adapter cannot go on ({module_patterns(found)}: "
                       f"{type(tower.get_submodule(found[0])).__name__}{why})")
        raise ConfigError(f"{where}.lora.target_modules: {target!r} {problem}; {listing}")
    return list(targets)


# ------------------------------------------------------------------------------------------------ adding them

def add_lora(tower: nn.Module, options: LoraOptions, where: str, keep_trainable: bool) -> List[str]:
    """Inject peft's LoRA layers into ``tower`` in place; returns the names of the adapted modules.

    The tower's own parameters are frozen, except those trainable now when ``keep_trainable`` (the groups partial
    locking left unlocked)."""
    peft = import_peft()
    targets = resolve_targets(tower, options, where)
    adaptable = adaptable_modules(tower)
    adapted = [name for name in adaptable if any(matches(name, target) for target in targets)]
    trainable = {name for name, p in tower.named_parameters() if p.requires_grad} if keep_trainable else set()
    config = peft.LoraConfig(r=options.r, lora_alpha=options.scale_numerator, lora_dropout=options.dropout,
                             target_modules=adapted, bias="none")
    try:
        peft.inject_adapter_in_model(config, tower)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ConfigError(f"{where}.lora: peft cannot add adapters to {module_patterns(adapted)}: {error}") from None
    for name, param in tower.named_parameters():
        param.requires_grad_(is_adapter_parameter(name) or name.replace(".base_layer.", ".") in trainable)
    return adapted


def _frozen_batch_norms(tower: nn.Module, prefix: str) -> List[str]:
    """BatchNorm layers of a tower whose own parameters are all frozen (kept in eval mode: ``freeze_bn_stats``)."""
    return [f"{prefix}.{name}" for name, module in tower.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and all(not p.requires_grad for p in module.parameters(recurse=False))]


def apply_adapters(model: nn.Module, model_cfg: ModelConfig) -> Dict[str, List[str]]:
    """Add the configured adapters to a built (and partially locked) dual encoder; returns ``{tower attribute:
    adapted module names}``, which the model keeps as ``adapted_modules``."""
    adapted: Dict[str, List[str]] = {}
    for attribute, section in TOWERS:
        tower_cfg = getattr(model_cfg, section)
        if not tower_cfg.lora.enabled:
            continue
        unlocked = tower_cfg.unlocked_groups if section == "image_encoder" else tower_cfg.unlocked_layers
        tower = getattr(model, attribute)
        adapted[attribute] = add_lora(tower, tower_cfg.lora, f"model.{section}", keep_trainable=unlocked is not None)
        # a projection inside the tower (OpenCLIP's) trains as model.projection says, as a separate one does
        projection_trainable = getattr(model_cfg.projection, f"{section.split('_')[0]}_projector_trainable")
        for name in getattr(model, "tower_projections", {}).get(attribute, []):
            tower.get_parameter(name).requires_grad_(projection_trainable)
        if getattr(tower_cfg, "freeze_bn_stats", False):
            for name in _frozen_batch_norms(tower, attribute):
                if name not in model.frozen_norm_modules:
                    model.frozen_norm_modules.append(name)
    model.adapted_modules = adapted
    model.train(model.training)
    return adapted


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base module back in place (peft's own merge), so the model
    has the names and forward of one without adapters. In place; returns ``model``."""
    if not has_adapters(model):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    model.adapted_modules = {}
    return model


def base_names(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state`` (a model's tensors as named without adapters) under ``model``'s names, where peft moved a module's
    tensors under ``.base_layer``: a weights source for a model with adapters."""
    own = set(model.state_dict())
    renamed = {}
    for key, value in state.items():
        module, _, tensor = key.rpartition(".")
        adapted = f"{module}.base_layer.{tensor}"
        renamed[adapted if key not in own and adapted in own else key] = value
    return renamed


# ------------------------------------------------------------------------------------------------ the base's identity

def frozen_base_sha256(model: nn.Module) -> Tuple[str, int]:
    """(SHA-256, count) of the frozen parameters, names, dtypes, shapes and bytes: what a small checkpoint leaves
    out and a resume rebuilds from the config."""
    digest = hashlib.sha256()
    count = 0
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            continue
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        count += 1
    return digest.hexdigest(), count


def base_paths(model_cfg: ModelConfig) -> List[str]:
    """Where a model's weights come from, as its config says (random weights: the seed)."""
    paths: List[str] = []
    if model_cfg.arch in ("hf_clip", "hf_siglip"):
        paths.append(f"model.hf_folder={model_cfg.hf_folder}")
    elif model_cfg.arch == "open_clip":
        paths.append(f"model.open_clip.name={model_cfg.open_clip.name}")
        if model_cfg.open_clip.pretrained:
            paths.append(f"model.open_clip.pretrained={model_cfg.open_clip.pretrained}")
    else:
        image, text = model_cfg.image_encoder, model_cfg.text_encoder
        paths.append(f"model.image_encoder.pretrained={image.pretrained} ({image.tag})")
        paths.append(f"model.text_encoder.pretrained={text.pretrained} ({text.tag})")
    for switch, key in (("load_pretrained", "pretrained"), ("load_finetuned", "finetuned")):
        if getattr(model_cfg, switch):
            paths.append(f"model.{key}={getattr(model_cfg, key)}")
    return paths


def base_identity(model_cfg: ModelConfig, model: nn.Module) -> Dict[str, object]:
    """What a checkpoint of a run with adapters records about its frozen base (``ADAPTER_BASE_FILE``)."""
    sha256, count = frozen_base_sha256(model)
    return {"paths": base_paths(model_cfg), "frozen_sha256": sha256, "frozen_tensors": count,
            "adapted_modules": {tower: len(names) for tower, names in getattr(model, "adapted_modules", {}).items()}}


def base_change(saved: Dict[str, object], current: Dict[str, object]) -> Optional[str]:
    """Why the base a checkpoint was trained on is not the one built now; None when it is the same."""
    if saved.get("frozen_sha256") == current["frozen_sha256"]:
        return None
    return (f"the frozen base model differs from the one the checkpoint's adapters were trained on (SHA-256 of its "
            f"{saved.get('frozen_tensors')} frozen tensors {str(saved.get('frozen_sha256'))[:16]}..., from "
            f"{'; '.join(map(str, saved.get('paths') or []))}; now {current['frozen_tensors']} tensors "
            f"{str(current['frozen_sha256'])[:16]}..., from {'; '.join(map(str, current['paths']))})")
