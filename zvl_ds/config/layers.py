"""The inheritance rule: a config is a stack of layers (each ``_base_`` file under the file built on it, the command
line on top), and an upper layer's values win over the lower ones whatever block or spelling either uses.

Each layer is mapped onto zvl_ds keys on its own, before the layers are merged: its LAVIS ``run:`` and ``datasets:``
blocks (``zvl_ds.config.compat``, ``zvl_ds.config.lavis_datasets``) and its preset. So the ordinary deep merge lets
the upper layer win, and two spellings of one value can only disagree inside one layer, where they are an error
naming both.

A model source (``model.arch: hf_clip`` / ``hf_siglip`` / ``open_clip``, ``zvl_ds.config.model_sources``) spells the
keys it sets (tokenizer, caption length, image transforms, loss) too: a layer that names the source (its arch, its
folder or its OpenCLIP name) wins over the lower layers' explicit values of those keys, which the source then fills,
while its own explicit keys still override the source. A dataset's files are spelt one of three ways (``shards``,
``folder``, ``parquet``): a layer naming one replaces the lower layers' other two.

A preset is spelt by naming it: a layer that names ``model.arch`` sets every key a preset sets (those its preset
leaves out fall back to their defaults, so nothing of another preset stays behind), and a layer that names only
``model.model_type`` (its preset named below it) sets the keys the preset's variants set. Inside the layer, its own
``model:`` keys override its preset, as documented for presets.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

from zvl_ds.config.compat import apply_lavis_run_block
from zvl_ds.config.keys import deep_merge, get_path, unknown_choice_message
from zvl_ds.config.lavis_datasets import map_lavis_datasets_block
from zvl_ds.config.model_section import ModelConfig
from zvl_ds.config.model_sources import model_source_keys
from zvl_ds.config.presets import DEFAULT_VARIANT, MODEL_PRESETS, MODEL_VARIANTS
from zvl_ds.config.schema import ConfigError

Path = Tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# The keys a preset or a variant spells
# --------------------------------------------------------------------------------------------------


def _preset_paths(tree: Dict[str, Any], cls: Any, prefix: Path) -> List[Path]:
    """The keys a preset mapping sets, down to the schema's values: a mapping-valued key (``kwargs``, ``config``)
    is one value, replaced as a whole when another preset is named."""
    hints = typing.get_type_hints(cls)
    paths: List[Path] = []
    for key, value in tree.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(hints.get(key)):
            paths += _preset_paths(value, hints[key], prefix + (key,))
        else:
            paths.append(prefix + (key,))
    return paths


def _overlay_paths(tree: Dict[str, Any], prefix: Path) -> List[Path]:
    """The keys a variant's overlay sets, down to the values inside a mapping-valued key (a variant changes one
    timm argument, not the tower's whole ``kwargs``)."""
    paths: List[Path] = []
    for key, value in tree.items():
        paths += _overlay_paths(value, prefix + (key,)) if isinstance(value, dict) and value else [prefix + (key,)]
    return paths


def _unique(paths: Sequence[Path]) -> List[Path]:
    return sorted(set(paths))


# every key some preset or variant sets, and model_type, which naming a preset always sets
PRESET_PATHS: List[Path] = _unique([("model", "model_type")] + [
    path for arch, preset in MODEL_PRESETS.items() for overlay in [{}, *MODEL_VARIANTS[arch].values()]
    for path in _preset_paths(deep_merge(preset, overlay), ModelConfig, ("model",))])
# per preset: the keys its variants set
VARIANT_PATHS: Dict[str, List[Path]] = {
    arch: _unique([path for overlay in variants.values() for path in _overlay_paths(overlay, ("model",))])
    for arch, variants in MODEL_VARIANTS.items()}


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _variant(arch: str, model_type: Any, where: str) -> str:
    """The variant ``model_type`` names (the preset's default one for null), checked."""
    if arch not in MODEL_PRESETS:
        raise ConfigError(_prefix(where) + unknown_choice_message("model.arch", arch, list(MODEL_PRESETS)))
    variants = MODEL_VARIANTS[arch]
    variant = DEFAULT_VARIANT[arch] if model_type is None else str(model_type)  # YAML reads `384` as an int
    if variant not in variants:
        raise ConfigError(_prefix(where) + unknown_choice_message(
            f"model.model_type (a variant of model.arch={arch})", variant, list(variants)))
    return variant


def _no_preset_error(model_type: Any, where: str) -> ConfigError:
    return ConfigError(f"{_prefix(where)}model.model_type={model_type!r} without model.arch: a model_type is a "
                       f"variant of a preset; set model.arch too (presets: {', '.join(MODEL_PRESETS)})")


def apply_model_preset(raw: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """``model.arch`` and ``model.model_type``: the preset, overlaid by its variant, overlaid by the explicit keys.
    The resolved config names the variant used (the default one when ``model_type`` is not given)."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    if model.get("arch") is None:
        if model.get("model_type") is not None:
            raise _no_preset_error(model["model_type"], where)
        return raw
    arch = model["arch"]
    variant = _variant(arch, model.get("model_type"), where)
    raw["model"] = deep_merge(deep_merge(MODEL_PRESETS[arch], MODEL_VARIANTS[arch][variant]),
                              {**model, "model_type": variant})
    return raw


def _layer_preset(layer: Dict[str, Any], below: Dict[str, Any], where: str) -> Tuple[Dict[str, Any], List[Path]]:
    """Spell out the preset a layer names; returns (the layer, the keys it takes over from the layers below)."""
    model = layer.get("model")
    if not isinstance(model, dict):
        return layer, []
    if "arch" in model:  # a preset, or none (null): every key a preset sets is this layer's
        return apply_model_preset(layer, where), PRESET_PATHS
    if "model_type" not in model:
        return layer, []
    present, arch = get_path(below, ["model", "arch"])
    if not present or arch is None:
        if model["model_type"] is None:
            return layer, []
        raise _no_preset_error(model["model_type"], where)
    variant = _variant(arch, model["model_type"], where)
    spelt = deep_merge(MODEL_PRESETS[arch], MODEL_VARIANTS[arch][variant])
    values: Dict[str, Any] = {}
    for path in VARIANT_PATHS[arch]:
        found, value = get_path({"model": spelt}, list(path))
        if found:
            _set(values, path, value)
    layer["model"] = deep_merge(values.get("model", {}), {**model, "model_type": variant})
    return layer, VARIANT_PATHS[arch]


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _set(tree: Dict[str, Any], path: Path, value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = copy.deepcopy(value)


def _drop(tree: Dict[str, Any], path: Path) -> None:
    """Remove ``path`` from ``tree`` (in place) when it is there."""
    for part in path[:-1]:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return
    if isinstance(tree, dict):
        tree.pop(path[-1], None)


def map_layer(layer: Dict[str, Any], below: Dict[str, Any], where: str) -> Tuple[Dict[str, Any], List[Path]]:
    """One layer's blocks and spellings onto zvl_ds keys (``below``: the merged layers under it, which a layer
    naming only ``model.model_type`` takes its preset from); returns (the layer, the keys it takes over whole)."""
    layer = apply_lavis_run_block(layer, where=where)
    layer = map_lavis_datasets_block(layer, where=where)  # leaves the block's dataset names, for after the merge
    return _layer_preset(layer, below, where)


# the keys that name a model source: a layer setting one of them names the source anew
SOURCE_NAMING_KEYS = (("model", "arch"), ("model", "hf_folder"), ("model", "open_clip", "name"))
# the three spellings of a dataset's files (data.datasets.<name>.*): naming one replaces the others
DATASET_FILE_KEYS = ("shards", "folder", "parquet")


def _source_paths(layer: Dict[str, Any], below: Dict[str, Any]) -> List[Path]:
    """The keys the model source sets that ``layer`` leaves out, when ``layer`` names the source: the lower layers'
    values of those keys give way, and the source fills them after the merge."""
    if not any(get_path(layer, list(path))[0] for path in SOURCE_NAMING_KEYS):
        return []
    try:
        keys = model_source_keys(deep_merge(copy.deepcopy(below), layer))
    except ConfigError:
        return []  # the source is not whole yet (its folder named by a layer above): that layer takes the keys over
    return [tuple(key.split(".")) for key in keys if not get_path(layer, key.split("."))[0]]


def _dataset_file_paths(layer: Dict[str, Any]) -> List[Path]:
    """The other spellings of each dataset's files that ``layer`` names one of."""
    datasets = (layer.get("data") or {}).get("datasets") if isinstance(layer.get("data"), dict) else None
    paths: List[Path] = []
    for name, source in (datasets or {}).items():
        if isinstance(source, dict) and any(key in source for key in DATASET_FILE_KEYS):
            paths += [("data", "datasets", name, key) for key in DATASET_FILE_KEYS if key not in source]
    return paths


def stack(below: Dict[str, Any], layer: Dict[str, Any], where: str,
          replaced: Optional[List[Path]] = None) -> Dict[str, Any]:
    """``layer`` mapped and merged over ``below``: its values win; ``replaced`` keys (and those its preset, its
    model source or its dataset files take over) are replaced as a whole rather than merged key by key."""
    layer, taken = map_layer(copy.deepcopy(layer), below, where)
    merged = copy.deepcopy(below)
    for path in [*taken, *(replaced or []), *_source_paths(layer, below), *_dataset_file_paths(layer)]:
        _drop(merged, path)
    return deep_merge(merged, layer)
