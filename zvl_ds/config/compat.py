"""Configs written for ZeroVL and LAVIS load as written: LAVIS's ``run:`` block, and ZeroVL's keys without effect here.

* ``run:`` (LAVIS's runtime options) is mapped onto our own keys by ``LAVIS_RUN_MAP``, file by file before
  ``_base_`` merging (so the child wins whichever spelling each file uses); a value one file gives both ways must
  agree. LAVIS's ``model:`` options that act here have the same names in ``model:`` (``LAVIS_MODEL_OPTIONS`` says
  what each does, for the table in docs/lavis-zerovl.md); the others stay unknown keys, whose message names the
  zvl_ds key doing their job (``LAVIS_MODEL_COUNTERPARTS``).
* ``ACCEPTED_WITHOUT_EFFECT`` lists ZeroVL keys that this code has no use for (an apex option, a checkpoint file
  name DeepSpeed chooses itself, ...). They are not part of the schema (``zvl_ds.config.schema`` and its section
  modules), which holds only the keys that act; a config may still set them, their values are type-checked, and
  each one a config sets is reported once per process with a warning saying it has no effect.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import typing
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Literal, Optional, Set, Tuple

from zvl_ds.config.keys import get_path, same_layer, set_path, unknown_key_message
from zvl_ds.config.schema import Config, ConfigError

LOG = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# LAVIS `run:` options -> our keys
# --------------------------------------------------------------------------------------------------


# LAVIS key -> (canonical dotted key, value converter)
LAVIS_RUN_MAP: Dict[str, Tuple[str, Any]] = {
    "lr_sched": ("optim.lr.name", None),
    "init_lr": ("optim.lr.init", None),
    "min_lr": ("optim.lr.min_lr", None),
    "warmup_lr": ("optim.lr.warmup_lr", None),
    "lr_decay_rate": ("optim.lr.lr_decay_rate", None),
    "warmup_steps": ("optim.lr.warmup_steps", None),
    "max_epoch": ("epoch", None),
    "weight_decay": ("optim.param.weight_decay", None),
    "batch_size_train": ("data.batch_size_train", None),
    "batch_size_eval": ("data.batch_size_val", None),
    "seed": ("seed", None),
    "output_dir": ("ckpt.dir", None),
    "resume_ckpt_path": ("resume_ckpt_path", None),
    "evaluate": ("evaluate", None),
    "train_splits": ("data.train_splits", None),
    "valid_splits": ("data.valid_splits", None),
    "test_splits": ("data.test_splits", None),
    "device": ("device", None),
    "world_size": ("runner.world_size", None),
    "dist_url": ("dist.url", None),
    "distributed": ("dist.distributed", None),
    "amp": ("precision", lambda v: ("fp16" if v else "fp32") if isinstance(v, bool) else v),
    "task": ("runner.task", lambda v: lavis_task(v)),
}


def lavis_task(task: Any) -> str:
    if task != "retrieval":
        raise ConfigError(f"run.task={task!r} is not supported: zvl_ds trains a dual encoder for image-text "
                          "retrieval (run.task: retrieval); LAVIS's captioning, VQA, multimodal classification "
                          "and other tasks need models it does not have")
    return task


def lavis_run_target(key: str, value: Any) -> Tuple[List[str], Any]:
    """``run.<key>: value`` -> (the path of the zvl_ds key ``LAVIS_RUN_MAP`` names, the value converted for it)."""
    if key not in LAVIS_RUN_MAP:
        raise ConfigError(unknown_key_message(f"run.{key}", key, list(LAVIS_RUN_MAP)))
    target, convert = LAVIS_RUN_MAP[key]
    return target.split("."), convert(value) if convert else value


def apply_lavis_run_block(raw: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    """Move ``run.<key>`` values onto the keys ``LAVIS_RUN_MAP`` names; ``raw`` loses its ``run`` block.

    ``raw`` is one layer of a config (one YAML file, named by ``where``, before its ``_base_`` files are merged under
    it, or the command line): a value it gives both ways must agree. Between layers, the upper one's value wins
    whichever way each spells it, because each layer is mapped here before the merge."""
    run = raw.pop("run", None)
    if run is None:
        return raw
    prefix = f"{where}: " if where else ""
    if not isinstance(run, dict):
        raise ConfigError(f"{prefix}run: must be a mapping of LAVIS runtime options")
    for key, value in run.items():
        path, mapped = lavis_run_target(key, value)
        present, existing = get_path(raw, path)
        if present and existing != mapped:
            raise ConfigError(f"{prefix}run.{key}={value!r} conflicts with {'.'.join(path)}={existing!r} "
                              f"{same_layer(where)}; give the value one way")
        set_path(raw, path, mapped)
    return raw


# LAVIS run.* keys (LAVIS_RUN_MAP) whose value is converted, or whose meaning differs from LAVIS's
LAVIS_NOTES: Dict[str, str] = {
    "amp": "`true` -> `fp16`, `false` -> `fp32`; a string is taken as the precision",
    "batch_size_train": "GLOBAL DGA chunk here, used by `clip_bsgs` only; LAVIS's is the per-GPU batch",
    "batch_size_eval": "GLOBAL here; LAVIS's is per GPU",
    "lr_sched": "LAVIS's names are accepted as they are (`constant_lr` too)",
    "warmup_lr": "LAVIS's -1 meaning `init_lr` is not special here; default 0",
    "test_splits": "unused",
    "task": "`retrieval` only; any other task is refused by name",
    "dist_url": "unused",
    "distributed": "unused",
}


# LAVIS `model:` options -> what they do here (the same names are zvl_ds keys, in ModelConfig). Other LAVIS model
# keys (vit_model, image_size, embed_dim, freeze_vit, ...) are unknown keys, refused with the closest zvl_ds names.
LAVIS_MODEL_OPTIONS: Dict[str, str] = {
    "arch": "A preset of the presets table (LAVIS's registered model name); explicit `model.*` keys override it.",
    "model_type": "A variant of the preset (presets table), e.g. another image resolution; `null`: the preset's "
                  "default variant (LAVIS's `default_config`). An unknown variant, or a `model_type` without "
                  "`arch`, is refused.",
    "load_pretrained": "`true`: initialise the whole dual encoder from `model.pretrained` before training; "
                       "skipped when the run resumes.",
    "pretrained": "An exported model folder, a run folder or `step_NNNNNNNN` checkpoint folder (consolidated, "
                  "weights-only check), or a `.safetensors` file. A URL or hub name is refused: nothing is "
                  "downloaded. Per-tower files go to `model.image_encoder.pretrained` / "
                  "`model.text_encoder.pretrained` instead.",
    "load_finetuned": "`true`: load `model.finetuned`: with `evaluate: true` the weights evaluated, in training the "
                      "initialisation (wins over `load_pretrained`).",
    "finetuned": "The same kinds of source and checks as `model.pretrained`.",
}


# LAVIS model keys that zvl_ds does not read, by the zvl_ds key doing that job: named in the unknown-key message
LAVIS_MODEL_COUNTERPARTS: Dict[str, str] = {
    "vit_model": "model.image_encoder.tag",
    "vit_type": "model.image_encoder.tag",
    "image_size": "model.image_encoder.img_size (and transforms.input_size)",
    "embed_dim": "model.projection.dim",
    "max_txt_len": "model.max_length",
    "freeze_vit": "model.image_encoder.trainable (false freezes)",
    "vit_grad_ckpt": "model.image_encoder.grad_checkpointing",
    "use_grad_checkpoint": "model.image_encoder.grad_checkpointing",
    "drop_path_rate": "model.image_encoder.kwargs.drop_path_rate",
    "vit_precision": "precision",
    "med_config_path": "model.text_encoder.config",
}


def lavis_model_hint(path: str) -> str:
    """For an unknown ``model.<key>`` that is a LAVIS model option: where its job is done here, else ""."""
    key = path[len("model."):] if path.startswith("model.") else None
    if key not in LAVIS_MODEL_COUNTERPARTS:
        return ""
    return f"; {path} is a LAVIS model option that zvl_ds does not read: use {LAVIS_MODEL_COUNTERPARTS[key]}"


# --------------------------------------------------------------------------------------------------
# ZeroVL keys accepted without effect
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptedKey:
    """A key a config may set that changes nothing: its default, the type a value must have, and why."""

    default: Any
    type: Any
    why: str


ACCEPTED_WITHOUT_EFFECT: Dict[str, AcceptedKey] = {
    "inference": AcceptedKey(False, bool, "ZeroVL's inference flag; use `evaluate` or an exported model."),
    "data.name": AcceptedKey("local", Literal["local"], "ZeroVL's data backend name; only `local` is accepted."),
    "data.single_eval": AcceptedKey(False, bool, "ZeroVL's single-process evaluation switch; not used here."),
    "data.cuda_eval": AcceptedKey(True, bool, "Evaluation runs on the training device."),
    "data.val_steps": AcceptedKey(None, Optional[int], "Evaluation always covers the whole validation set."),
    "loss.global_reduce": AcceptedKey(True, bool, "The loss is always over the global batch."),
    "ckpt.filename": AcceptedKey("step_checkpoint.pth", str, "DeepSpeed names its own files; checkpoints are "
                                                             "`step_NNNNNNNN` folders."),
    "ckpt.soft_resume": AcceptedKey(False, bool, "ZeroVL's partial resume; resume here restores everything."),
    "ckpt.external_resume": AcceptedKey(None, Optional[str], "Use `resume_ckpt_path`."),
    "log.interval_val": AcceptedKey(1, int, "Evaluation is logged whenever it runs (see `runner.val_interval*`)."),
    "dist.name": AcceptedKey("torch", str, "The launcher and DeepSpeed set up the processes."),
    "dist.param.opt_level": AcceptedKey("O1", str, "apex's opt level; precision comes from `precision`."),
}


@functools.lru_cache(maxsize=None)  # the schema is fixed: computed once, not on every config load
def _schema_sections(cls: type = Config, prefix: str = "") -> FrozenSet[str]:
    """Dotted paths of every section of the schema (``data``, ``model.image_encoder``, ...)."""
    hints = typing.get_type_hints(cls)
    found: Set[str] = set()
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            found.add(prefix + item.name)
            found |= _schema_sections(hints[item.name], f"{prefix}{item.name}.")
    return frozenset(found)


def _parents(key: str) -> List[str]:
    """``dist.param.opt_level`` -> [``dist.param``, ``dist``] (innermost first)."""
    parts = key.split(".")[:-1]
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def take_accepted_keys(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Remove the keys of ``ACCEPTED_WITHOUT_EFFECT`` from ``raw``; return those it set, by dotted key.

    A section made only of such keys (``dist.param``) goes too; a key in it that is not one of them is
    an unknown key, named with the close matches."""
    taken: Dict[str, Any] = {}
    for key in ACCEPTED_WITHOUT_EFFECT:
        path = key.split(".")
        present, _ = get_path(raw, path)
        if present:
            parent = get_path(raw, path[:-1])[1] if len(path) > 1 else raw
            taken[key] = parent.pop(path[-1])
    schema_sections = _schema_sections()
    for section in sorted({p for key in ACCEPTED_WITHOUT_EFFECT for p in _parents(key)} - schema_sections,
                          key=lambda p: -p.count(".")):
        present, node = get_path(raw, section.split("."))
        if not present:
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{section}: expected a mapping (section), got {node!r}")
        if node:
            valid = [k[len(section) + 1:] for k in ACCEPTED_WITHOUT_EFFECT if k.startswith(section + ".")]
            key = str(next(iter(node)))
            raise ConfigError(unknown_key_message(f"{section}.{key}", key, valid))
        parent, _, name = section.rpartition(".")
        (get_path(raw, parent.split("."))[1] if parent else raw).pop(name)
    return taken


def accepted_names(section: str) -> List[str]:
    """Names of the accepted keys (and accepted-only sections) directly under ``section`` ("" = top level), for
    the close matches of an unknown-key message."""
    prefix = section + "." if section else ""
    return sorted({key[len(prefix):].split(".")[0] for key in ACCEPTED_WITHOUT_EFFECT if key.startswith(prefix)})


_REPORTED: Set[str] = set()


def report_without_effect(keys: List[str]) -> None:
    """Warn once per process for each accepted key a config set: it is read, checked and then ignored."""
    for key in keys:
        if key in _REPORTED:
            continue
        _REPORTED.add(key)
        LOG.warning("config key %s has no effect (accepted so that ZeroVL configs load): %s",
                    key, ACCEPTED_WITHOUT_EFFECT[key].why)
