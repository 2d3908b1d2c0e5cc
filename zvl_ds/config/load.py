"""Loading a config: YAML (safe loader) with ``_base_`` inheritance, ``key.sub=value`` overrides, model presets, typed
conversion against the schema, and validation of combinations. Config errors name the key path; entry points turn
them into a message and exit code 2.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import typing
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml

from zvl_ds.base.package_paths import is_package_path, resolve_package_path
from zvl_ds.config.compat import (ACCEPTED_WITHOUT_EFFECT, accepted_names, apply_lavis_run_block, lavis_model_hint,
                                  lavis_run_target, report_without_effect, take_accepted_keys)
from zvl_ds.config.keys import code_loading_key, deep_merge, set_path, unknown_choice_message, unknown_key_message
from zvl_ds.config.lavis_datasets import apply_lavis_datasets_block
from zvl_ds.config.model_sources import apply_model_source
from zvl_ds.config.presets import DEFAULT_VARIANT, MODEL_PRESETS, MODEL_VARIANTS
from zvl_ds.config.schema import MODEL_PARTS, Config, ConfigError, ModelConfig, OptimConfig

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


def load_yaml_with_bases(path: str, _chain: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Read a YAML file, resolving ``_base_`` (a path or list of paths, relative to the file) depth-first.

    Each file's LAVIS ``run:`` block is mapped onto zvl_ds keys before the merge, so a child's value wins over its
    base's whichever spelling each of them uses."""
    real = os.path.realpath(path)
    if real in _chain:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(_chain + (real,))}")
    data = _read_yaml(path)
    bases = data.pop("_base_", None)
    data = apply_lavis_run_block(data, where=path)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths")
    merged: Dict[str, Any] = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = deep_merge(merged, load_yaml_with_bases(base_path, _chain + (real,)))
    return deep_merge(merged, data)


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


def _apply_model_preset(raw: Dict[str, Any]) -> Dict[str, Any]:
    """``model.arch`` and ``model.model_type``: the preset, overlaid by its variant, overlaid by the explicit keys.
    The resolved config names the variant used (the default one when ``model_type`` is not given)."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    if model.get("arch") is None:
        if model.get("model_type") is not None:
            raise ConfigError(f"model.model_type={model['model_type']!r} without model.arch: a model_type is a "
                              f"variant of a preset; set model.arch too (presets: {', '.join(MODEL_PRESETS)})")
        return raw
    arch = model["arch"]
    if arch not in MODEL_PRESETS:
        raise ConfigError(unknown_choice_message("model.arch", arch, list(MODEL_PRESETS)))
    variants = MODEL_VARIANTS[arch]
    variant = model.get("model_type")
    variant = DEFAULT_VARIANT[arch] if variant is None else str(variant)  # YAML reads `model_type: 384` as an int
    if variant not in variants:
        raise ConfigError(unknown_choice_message(f"model.model_type (a variant of model.arch={arch})", variant,
                                                 list(variants)))
    raw["model"] = deep_merge(deep_merge(MODEL_PRESETS[arch], variants[variant]), {**model, "model_type": variant})
    return raw


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
# Validation of combinations
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


# scheme://... (http, https, s3, gs, hf, ...) and the hub prefixes other tools take (hf:org/name, hf-hub:org/name)
_REMOTE_LOCATION = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|hf:|hf-hub:)")


def is_remote_location(value: str) -> bool:
    """A URL or hub name rather than a local path: zvl_ds downloads nothing, so such a weights source is refused."""
    return bool(_REMOTE_LOCATION.match(value))


def _validate_whole_model_weights(cfg: Config) -> None:
    """``model.load_pretrained`` / ``model.pretrained`` and ``model.load_finetuned`` / ``model.finetuned``."""
    model = cfg.model
    for switch, key in (("load_pretrained", "pretrained"), ("load_finetuned", "finetuned")):
        value = getattr(model, key)
        if value and is_remote_location(value):
            raise ConfigError(f"model.{key}={value!r}: a URL or hub name; nothing is downloaded, so give a local "
                              "exported model folder, run folder, checkpoint folder or .safetensors file")
        if getattr(model, switch) and not value:
            raise ConfigError(f"model.{switch}=true but model.{key} is not set: give the exported model folder, run "
                              "folder, checkpoint folder or .safetensors file to load")
    if cfg.evaluate and model.load_finetuned and cfg.resume_ckpt_path:
        raise ConfigError(f"evaluate=true with both model.load_finetuned (model.finetuned={model.finetuned!r}) and "
                          f"resume_ckpt_path={cfg.resume_ckpt_path!r}: give the weights to evaluate one way")


def _validate(cfg: Config) -> None:
    data = cfg.data
    for key in ("batch_size", "batch_size_val", "num_workers", "shuffle_buffer"):
        minimum = 0 if key == "num_workers" else 1
        if getattr(data, key) < minimum:
            raise ConfigError(f"data.{key}: must be >= {minimum}, got {getattr(data, key)}")
    if not 0.0 <= data.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction: must be in [0, 1] (1: never stop), got {data.max_skip_fraction}")
    if data.skip_window < 1:
        raise ConfigError(f"data.skip_window: must be >= 1 sample, got {data.skip_window}")
    if data.batch_size_train is not None:
        if data.batch_size_train < 1 or data.batch_size % data.batch_size_train:
            raise ConfigError(f"data.batch_size_train={data.batch_size_train} must divide "
                              f"data.batch_size={data.batch_size}")
    for name, zeroshot in data.zeroshot.items():
        if not zeroshot.path:
            raise ConfigError(f"data.zeroshot.{name}.path: give a class folder, an image,label CSV or a clip_benchmark "
                              "classification folder")
        if name in data.valid_name:
            raise ConfigError(f"data.zeroshot.{name}: the name is also a data.valid_name set; their metrics "
                              "would share eval/<name>/; rename one")
    for name, source in data.datasets.items():
        if source.shards and source.folder:
            raise ConfigError(f"data.datasets.{name}: give its shards one way, `shards` (a shard spec) or "
                              "`folder` (a shard writer's folder read by split), not both")
    for role in ("caption_train", "caption_eval"):
        max_words = getattr(cfg.transforms, role).max_words
        if max_words is not None and max_words < 1:
            raise ConfigError(f"transforms.{role}.max_words: must be >= 1 or null (all words), got {max_words}")
    temp = cfg.loss.temperature
    if not 0 < temp.min <= temp.value <= temp.max:
        raise ConfigError(f"loss.temperature: need 0 < min <= value <= max, got min={temp.min} "
                          f"value={temp.value} max={temp.max}")
    # ZeroVL's keys with no implementation here: refuse a value that would otherwise be silently ignored
    if cfg.loss.smoothing != 0.0:
        raise ConfigError(f"loss.smoothing={cfg.loss.smoothing}: label smoothing is not implemented (ZeroVL leaves "
                          "it at 0.0 too); remove the key or set it to 0.0")
    if cfg.loss.group_size != -1:
        raise ConfigError(f"loss.group_size={cfg.loss.group_size}: only -1 (gather over the whole world) is "
                          "implemented")
    if cfg.loss.chunk_rows < 1:
        raise ConfigError(f"loss.chunk_rows: must be >= 1, got {cfg.loss.chunk_rows}")
    if cfg.loss.chunk_cols < 0:
        raise ConfigError(f"loss.chunk_cols: must be >= 0 (0 = whole rows), got {cfg.loss.chunk_cols}")
    if cfg.loss.name == "SigLIP":
        _validate_sigmoid(cfg)
    if cfg.loss.name == "MixUpNCE" and cfg.loss.mixup.beta <= 0:
        raise ConfigError(f"loss.mixup.beta: must be > 0, got {cfg.loss.mixup.beta}")
    _validate_part_lrs(cfg.optim)
    _validate_whole_model_weights(cfg)
    _validate_tuning_options(cfg.model)
    if len(cfg.optim.param.betas) != 2:
        raise ConfigError(f"optim.param.betas: need two values, got {cfg.optim.param.betas}")
    code_key = code_loading_key(cfg.model.text_encoder.config)
    if code_key:
        raise ConfigError(f"model.text_encoder.config.{code_key}: a key that makes Hugging Face load Python code "
                          "from a model folder is not accepted (configs and model folders are data); use a model "
                          "that transformers implements")
    _validate_run_length_and_intervals(cfg)
    _validate_optimizer_numbers(cfg.optim)
    if not cfg.data.exp_name or "/" in cfg.data.exp_name:
        raise ConfigError(f"data.exp_name: must be a non-empty folder name, got {cfg.data.exp_name!r}")


def _validate_run_length_and_intervals(cfg: Config) -> None:
    """Values that would only fail (or hang, or divide by zero) hours into a run are refused now."""
    for key, value in (("ckpt.keep_last", cfg.ckpt.keep_last), ("ckpt.step_interval", cfg.ckpt.step_interval),
                       ("log.interval_train", cfg.log.interval_train)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    # every wait is bounded: a timeout is a positive number of seconds
    for key, seconds in (("runner.collective_timeout", cfg.runner.collective_timeout),
                         ("runner.preempt_timeout", cfg.runner.preempt_timeout),
                         ("data.loader_timeout", cfg.data.loader_timeout)):
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(f"{key}: must be a finite number of seconds > 0, got {seconds}")
    if cfg.runner.train_steps < -1 or cfg.data.train_steps < -1:
        raise ConfigError(f"runner.train_steps={cfg.runner.train_steps}, data.train_steps={cfg.data.train_steps}: "
                          "> 0 fixes the number of steps; -1 (or 0) leaves it to the other key or to `epoch`")
    steps_fixed = cfg.runner.train_steps > 0 or cfg.data.train_steps > 0
    if not cfg.evaluate and not steps_fixed and cfg.epoch < 1:
        raise ConfigError(f"epoch: must be >= 1 when neither runner.train_steps nor data.train_steps is > 0 (the "
                          f"run would train no step), got {cfg.epoch}")


def _validate_optimizer_numbers(optim: OptimConfig) -> None:
    """A NaN, infinite or negative learning rate (or schedule value) would poison the weights at the first step."""
    lr = optim.lr
    for key, value in (("optim.lr.init", lr.init), ("optim.lr.min_lr", lr.min_lr),
                       ("optim.lr.warmup_lr", lr.warmup_lr), ("optim.lr.lr_decay_rate", lr.lr_decay_rate),
                       ("optim.lr.param.min_lr_scale", lr.param.min_lr_scale),
                       ("optim.lr.param.num_cycles", lr.param.num_cycles),
                       ("optim.param.weight_decay", optim.param.weight_decay), ("optim.param.eps", optim.param.eps),
                       ("optim.param.momentum", optim.param.momentum), ("optim.grad_clip", optim.grad_clip)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key}: must be a finite number >= 0, got {value}")
    if not 0 <= lr.warmup_proportion <= 1:  # NaN fails this too
        raise ConfigError(f"optim.lr.warmup_proportion: must be in [0, 1], got {lr.warmup_proportion}")
    if lr.warmup_steps is not None and lr.warmup_steps < 0:
        raise ConfigError(f"optim.lr.warmup_steps: must be >= 0 or null, got {lr.warmup_steps}")
    for index, beta in enumerate(optim.param.betas):
        if not 0 <= beta < 1:
            raise ConfigError(f"optim.param.betas[{index}]: must be in [0, 1), got {beta}")


def _validate_part_lrs(optim: OptimConfig) -> None:
    for part in MODEL_PARTS:
        mult, absolute = getattr(optim.lr_mult, part), getattr(optim.lr_abs, part)
        if not (math.isfinite(mult) and mult >= 0):
            raise ConfigError(f"optim.lr_mult.{part}: must be >= 0, got {mult}")
        if absolute is None:
            continue
        if not (math.isfinite(absolute) and absolute >= 0):
            raise ConfigError(f"optim.lr_abs.{part}: must be >= 0, got {absolute}")
        if mult != 1.0:
            raise ConfigError(f"optim.lr_abs.{part}={absolute} and optim.lr_mult.{part}={mult}: give the part's "
                              "learning rate one way")
        if optim.lr.init <= 0:
            raise ConfigError(f"optim.lr_abs.{part} is relative to optim.lr.init, which must then be > 0 "
                              f"(got {optim.lr.init})")
    for tower in ("image_tower", "text_tower"):
        decay = getattr(optim.layer_decay, tower)
        if not 0 < decay <= 1:
            raise ConfigError(f"optim.layer_decay.{tower}: must be in (0, 1] (1 = off), got {decay}")


def _validate_tuning_options(model: ModelConfig) -> None:
    """Partial locking, patch dropout and the model EMA (the counts of groups are checked when the towers exist)."""
    for section, count_key, norm_key in (("image_encoder", "unlocked_groups", "freeze_bn_stats"),
                                         ("text_encoder", "unlocked_layers", "freeze_layer_norm")):
        tower = getattr(model, section)
        unlocked = getattr(tower, count_key)
        where = f"model.{section}"
        if unlocked is not None and unlocked < 0:
            raise ConfigError(f"{where}.{count_key}: must be >= 0 (0 freezes every group) or null, got {unlocked}")
        if unlocked is not None and not tower.trainable:
            raise ConfigError(f"{where}.{count_key}={unlocked} with {where}.trainable=false: a frozen tower has "
                              f"nothing to unlock; give one of the two")
        if getattr(tower, norm_key) and unlocked is None:
            raise ConfigError(f"{where}.{norm_key}=true acts on the groups {where}.{count_key} freezes; set "
                              f"{where}.{count_key} too")
    share = model.image_encoder.patch_dropout
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"model.image_encoder.patch_dropout: a share of patches in [0, 1), got {share}")
    if model.ema.decay is not None and not 0.0 < model.ema.decay < 1.0:
        raise ConfigError(f"model.ema.decay: must be in (0, 1) (e.g. 0.999) or null (off), got {model.ema.decay}")
    if model.ema.warmup_steps < 0:
        raise ConfigError(f"model.ema.warmup_steps: must be >= 0, got {model.ema.warmup_steps}")


def _validate_sigmoid(cfg: Config) -> None:
    if cfg.loss.sigmoid.scale_init <= 0:
        raise ConfigError(f"loss.sigmoid.scale_init: must be > 0 (it is learned as its log), got "
                          f"{cfg.loss.sigmoid.scale_init}")
    # With plain gather the gathered texts are constants, and SigLIP has no text->image direction to give the
    # text tower a gradient through its own rows: it would not learn at all.
    if not cfg.loss.nce_loss.gather_backward:
        raise ConfigError("loss.nce_loss.gather_backward=false with loss.name=SigLIP: the text tower would get no "
                          "gradient; use true (exact) or the clip_bsgs runner")
    if cfg.loss.temperature.name == "parameter":
        raise ConfigError("loss.temperature.name=parameter with loss.name=SigLIP: SigLIP learns its own scale "
                          "(loss.sigmoid.scale_init), the temperature would never move; use constant")


def check_world_size(cfg: Config, world_size: int) -> None:
    """Batch sizes are global; they must split evenly over the ranks the launcher started."""
    if cfg.runner.world_size > 0 and cfg.runner.world_size != world_size:
        raise ConfigError(f"runner.world_size={cfg.runner.world_size} but the launcher started {world_size} ranks")
    for key in ("batch_size", "batch_size_val"):
        if getattr(cfg.data, key) % world_size:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)} is not divisible by the world size {world_size}")
    if cfg.chunk_size % world_size:
        raise ConfigError(f"data.batch_size_train={cfg.chunk_size} is not divisible by the world size {world_size}")


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def config_from_dict(raw: Dict[str, Any]) -> Config:
    """Build and validate a Config from a plain (already merged) mapping."""
    raw = copy.deepcopy(raw)
    raw = apply_lavis_run_block(raw)
    raw = apply_lavis_datasets_block(raw)  # after run:, whose valid_splits it reads
    raw = _apply_model_preset(raw)
    raw, _ = apply_model_source(raw)  # after the preset: model.arch names the source
    without_effect = {key: _convert(value, ACCEPTED_WITHOUT_EFFECT[key].type, key)
                      for key, value in take_accepted_keys(raw).items()}
    cfg = _build(Config, raw)
    _resolve_package_paths(cfg)
    if cfg.precision is None:
        cfg.precision = "fp16" if cfg.dist.fp16 else "fp32"
    _validate(cfg)
    report_without_effect(list(without_effect))
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Load ``path`` (with ``_base_``), apply ``key.sub=value`` overrides, return the validated Config."""
    raw = load_yaml_with_bases(path) if path else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        if len(keys) == 2 and keys[0] == "run":  # a LAVIS spelling on the command line wins like any override
            keys, value = lavis_run_target(keys[1], value)
        set_path(raw, keys, value)
    return config_from_dict(raw)
