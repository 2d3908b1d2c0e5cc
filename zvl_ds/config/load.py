"""Loading a config: YAML (safe loader) with ``_base_`` inheritance and ``key.sub=value`` overrides (layers, each
mapped onto zvl_ds keys on its own before they are merged: ``zvl_ds.config.layers``), model presets, the mixture file
``data.manifest``, typed conversion against the schema, then ``Config.check`` (each section's checks beside its
dataclass, and the rules that span sections, in ``zvl_ds.config.schema``). Config errors name the key path; entry
points turn them into a message and exit code 2.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml

from zvl_ds.base.package_paths import is_package_path, resolve_package_path
from zvl_ds.config.compat import (ACCEPTED_WITHOUT_EFFECT, accepted_names, apply_lavis_run_block, lavis_model_hint,
                                  report_without_effect, take_accepted_keys)
from zvl_ds.config.data_section import DatasetSource
from zvl_ds.config.keys import COMMAND_LINE, deep_merge, set_path, unknown_choice_message, unknown_key_message
from zvl_ds.config.lavis_datasets import apply_lavis_datasets_block
from zvl_ds.config.layers import apply_model_preset, stack
from zvl_ds.config.model_sources import apply_model_source
from zvl_ds.config.schema import Config, ConfigError

# --------------------------------------------------------------------------------------------------
# YAML loading
# --------------------------------------------------------------------------------------------------


# Nodes a YAML document may stand for once its aliases are expanded. A config has hundreds; an alias bomb (each
# level a list of aliases to the level below) stands for billions, and walking it (validation, printing) never ends.
MAX_EXPANDED_YAML_NODES = 100_000


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``!!python/tuple`` (ZeroVL writes ``betas: !!python/tuple [0.9, 0.98]``) and
    refuses a document whose aliases expand beyond ``MAX_EXPANDED_YAML_NODES`` nodes or refer to themselves."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            check_alias_expansion(node, str(getattr(self, "name", "YAML")))
        return node


def _children(node: yaml.Node) -> List[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_alias_expansion(root: yaml.Node, source: str, limit: int = MAX_EXPANDED_YAML_NODES) -> None:
    """Raise ConfigError when the composed document stands for more than ``limit`` nodes with its aliases expanded
    (each shared node counted once per use), or when an alias refers to a node that contains it. Linear in the
    document's own size: a shared node's expanded size is computed once."""
    expanded: Dict[int, int] = {}
    on_path = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            expanded[key] = 1 + sum(expanded[id(child)] for child in _children(node))
            if expanded[key] > limit:
                raise ConfigError(f"{source}: YAML aliases (*name) expand this document to more than {limit} values "
                                  f"(line {node.start_mark.line + 1}); write the values out instead of nesting "
                                  "aliases of aliases")
            continue
        if key in expanded:
            continue
        if key in on_path:
            raise ConfigError(f"{source}: a YAML alias at line {node.start_mark.line + 1} refers to a value that "
                              "contains it (a recursive structure)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in expanded)


_SafeLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                            lambda loader, node: list(loader.construct_sequence(node)))


def _read_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to read") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _yaml_layers(path: str, _chain: Tuple[str, ...] = ()) -> List[Tuple[str, Dict[str, Any]]]:
    """The files of a config from the bottom up: each ``_base_`` (a path or list of paths, relative to the file)
    with its own bases before it, depth-first, then the file; as (path, its mapping without ``_base_``)."""
    real = os.path.realpath(path)
    if real in _chain:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(_chain + (real,))}")
    data = _read_yaml(path)
    bases = data.pop("_base_", None)
    if bases is None:
        bases = []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths")
    layers: List[Tuple[str, Dict[str, Any]]] = []
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        layers += _yaml_layers(base_path, _chain + (real,))
    return layers + [(path, data)]


def load_yaml_with_bases(path: str) -> Dict[str, Any]:
    """Read a YAML file with its ``_base_`` files under it (``zvl_ds.config.layers``: each file's blocks and preset
    are mapped onto zvl_ds keys on their own, then merged, so a file's values win over its bases' whichever spelling
    each of them uses)."""
    merged: Dict[str, Any] = {}
    for where, data in _yaml_layers(path):
        merged = stack(merged, data, where)
    return merged


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """The command line's ``key.sub=value`` overrides, the top layer of the config: mapped as a file is (a LAVIS
    ``run.<key>`` or ``datasets.*`` spelling, a preset) and merged over ``raw``, each key it names replaced whole."""
    layer: Dict[str, Any] = {}
    replaced = []
    for text in overrides:
        keys, value = parse_override(text)
        set_path(layer, keys, value)
        if keys[0] not in ("run", "datasets"):  # LAVIS's spellings are mapped onto the keys they name
            replaced.append(tuple(keys))
    return stack(raw, layer, COMMAND_LINE, replaced) if overrides else raw


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``data.batch_size=4096`` -> (["data", "batch_size"], 4096); values are YAML-typed."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=_SafeLoader) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.split("."), value


# --------------------------------------------------------------------------------------------------
# Typed conversion
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section), got {value!r}")
        return _build(tp, value, path)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as error:
                errors.append(error)
        # a choice error is more useful than a type error when a Literal is among the options
        for error in errors:
            if "invalid choice" in str(error):
                raise error
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
    if origin is Literal:
        choices = list(typing.get_args(tp))
        if len(choices) == 1 and isinstance(choices[0], tuple):
            choices = list(choices[0])
        if value not in choices:
            raise ConfigError(unknown_choice_message(path, value, choices))
        return value
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
        (item_type,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected a mapping")
        _, value_type = typing.get_args(tp)
        return {str(k): _convert(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected float")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected str")
    raise ConfigError(f"{path}: unsupported config type {tp!r}")


def _build(cls: type, data: Dict[str, Any], path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key = str(key)
        full = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(unknown_key_message(full, key, names + accepted_names(path)) + lavis_model_hint(full))
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# data.manifest
# --------------------------------------------------------------------------------------------------

# Keys of data.datasets.<name> that name files: in a manifest they are relative to the manifest's folder. Every string
# key of DatasetSource is either here or not a path (tests/unit/test_manifest.py holds the two lists to the fields).
MANIFEST_PATH_KEYS = ("shards", "folder", "parquet")


def apply_manifest(raw: Dict[str, Any]) -> Dict[str, Any]:
    """``data.manifest``: the file's sources under ``data.datasets`` (the config's own keys win, key by key), and
    ``data.train_name`` set to them in the file's order."""
    data = raw.get("data")
    path = data.get("manifest") if isinstance(data, dict) else None
    if not path:
        return raw
    if not isinstance(path, str):
        raise ConfigError(f"data.manifest: expected the path of a mixture file, got {path!r}")
    sources = read_manifest(path)
    inline = data.get("datasets") or {}
    if not isinstance(inline, dict):
        raise ConfigError(f"data.datasets: got {inline!r} ({type(inline).__name__}), expected a mapping")
    return {**raw, "data": {**data, "datasets": deep_merge(sources, inline), "train_name": list(sources)}}


def read_manifest(path: str) -> Dict[str, Dict[str, Any]]:
    """A manifest's sources by name, checked like ``data.datasets.<name>`` (unknown keys named with their likely
    meaning, wrong types), with their paths made absolute against the manifest's folder."""
    where = f"data.manifest {path}"
    try:
        entries = _read_yaml(path)
    except ConfigError as error:
        raise ConfigError(f"data.manifest: {error}") from None
    if not entries:
        raise ConfigError(f"{where}: lists no sources (expected a mapping `name -> {{shards, size, weight, ...}}`)")
    folder = os.path.dirname(os.path.abspath(path))
    sources: Dict[str, Dict[str, Any]] = {}
    for name, entry in entries.items():
        name = str(name)
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: source {name}: expected a mapping of data.datasets.<name> keys "
                              f"({', '.join(f.name for f in dataclasses.fields(DatasetSource))}), got {entry!r}")
        try:
            _build(DatasetSource, entry, name)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        sources[name] = {key: _under_folder(folder, value, f"{where}: {name}.{key}")
                         if key in MANIFEST_PATH_KEYS and isinstance(value, str) else value
                         for key, value in entry.items()}
    return sources


def _under_folder(folder: str, spec: str, where: str) -> str:
    """A path or ``::``-joined shard spec of a manifest, its relative local entries joined to the manifest's folder.
    A manifest is a file that travels with data: like a shard list file, it may not run a shell command."""
    entries = []
    for entry in spec.split("::"):
        entry = entry.strip()
        if entry.startswith("pipe:"):
            raise ConfigError(f"{where}: a manifest cannot name a `pipe:` shard (it would run the shell command "
                              f"{entry[len('pipe:'):]!r}); write `pipe:` entries in the config or on the command line "
                              "(data.datasets.<name>.shards) instead")
        entries.append(entry if not entry or "://" in entry or os.path.isabs(entry) else os.path.join(folder, entry))
    return "::".join(entries)


# --------------------------------------------------------------------------------------------------
# pkg: paths
# --------------------------------------------------------------------------------------------------


def _resolve_package_paths(cfg: Config) -> None:
    """``pkg:<package>/<path>`` in the towers' weight, tag and tokenizer keys -> the path inside the package."""
    for section, key, where in ((cfg.model.image_encoder, "pretrained", "model.image_encoder"),
                                (cfg.model.text_encoder, "tag", "model.text_encoder"),
                                (cfg.model.text_encoder, "tokenizer", "model.text_encoder"),
                                (cfg.model, "pretrained", "model"), (cfg.model, "finetuned", "model")):
        value = getattr(section, key)
        if is_package_path(value):
            try:
                setattr(section, key, resolve_package_path(value))
            except FileNotFoundError as error:
                raise ConfigError(f"{where}.{key}: {error}") from None


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def config_from_dict(raw: Dict[str, Any]) -> Config:
    """Build and validate a Config from a plain (already merged) mapping."""
    raw = copy.deepcopy(raw)
    raw = apply_lavis_run_block(raw)
    raw = apply_lavis_datasets_block(raw)  # after run:, whose valid_splits it reads
    raw = apply_manifest(raw)  # after LAVIS's datasets:, which may define sources the config's keys then refine
    raw = apply_model_preset(raw)
    raw, _ = apply_model_source(raw)  # after the preset: model.arch names the source
    without_effect = {key: _convert(value, ACCEPTED_WITHOUT_EFFECT[key].type, key)
                      for key, value in take_accepted_keys(raw).items()}
    cfg = _build(Config, raw)
    _resolve_package_paths(cfg)
    if cfg.precision is None:
        cfg.precision = "fp16" if cfg.dist.fp16 else "fp32"
    cfg.check()
    report_without_effect(list(without_effect))
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Load ``path`` (with ``_base_``), apply ``key.sub=value`` overrides, return the validated Config."""
    raw = load_yaml_with_bases(path) if path else {}
    return config_from_dict(apply_overrides(raw, overrides or []))
