"""A saved run back to its model: a DeepSpeed checkpoint -> the fp32 weights, from any ZeRO stage and precision
(``load_run``: the run's own model rebuilt from its config, loaded strictly).

Export (``python -m zvl_ds.export``), evaluation of a run folder and ``model.pretrained: RUN`` all read runs here;
``zvl_ds.model.inference`` reads an exported model folder.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from zvl_ds.config import Config, ConfigError, load_config
from zvl_ds.model.adapters import ADAPTER_BASE_FILE, adapters_configured, base_change, base_identity
from zvl_ds.model.build import build_model
from zvl_ds.model.dual_encoder import DualEncoder
from zvl_ds.model.inference import ExportError, load_state_strict, offline_model_config
from zvl_ds.model.safe_load import check_checkpoint_folder, load_weights_only
from zvl_ds.runtime.checkpoint import CheckpointError, list_tags, read_latest
from zvl_ds.runtime.ema import EmaFileError, merge_ema_files
from zvl_ds.runtime.optim import optimizer_groups

_ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_MODEL_STATES = "mp_rank_00_model_states.pt"


def resolve_tag(run_dir: str, tag: Optional[str] = None) -> str:
    """The checkpoint to read: ``tag`` if given, else the one ``RUN_DIR/latest`` names."""
    if not os.path.isdir(run_dir):
        raise ExportError(f"run folder not found: {run_dir}")
    available = list_tags(run_dir)
    if tag is None:
        try:
            tag = read_latest(run_dir)
        except CheckpointError as error:
            raise ExportError(str(error)) from None
        if tag is None:
            hint = (f"; folders that look like checkpoints: {', '.join(available)} (pick one with --tag)"
                    if available else "")
            raise ExportError(f"{run_dir} holds no complete checkpoint: there is no 'latest' file{hint}")
    if not os.path.isdir(os.path.join(run_dir, tag)):
        raise ExportError(f"checkpoint {tag!r} not found in {run_dir} (available: {', '.join(available) or 'none'})")
    return tag


def run_config(run_dir: str, tag: str) -> Config:
    """The resolved config saved with the checkpoint (``RUN/TAG/config.yaml``), else the run's ``config.yaml``."""
    for path in (os.path.join(run_dir, tag, "config.yaml"), os.path.join(run_dir, "config.yaml")):
        if os.path.isfile(path):
            try:
                return load_config(path)
            except ConfigError as error:
                raise ExportError(f"{path}: {error}") from None
    raise ExportError(f"no config.yaml in {os.path.join(run_dir, tag)} or {run_dir}: the model cannot be rebuilt")


def _model_states_file(tag_dir: str) -> str:
    for name in (_MODEL_STATES, _ZERO3_MODEL_STATES):
        path = os.path.join(tag_dir, name)
        if os.path.isfile(path):
            return path
    raise ExportError(f"{tag_dir} has no DeepSpeed model states file ({_MODEL_STATES} or {_ZERO3_MODEL_STATES}); "
                      "was the checkpoint written completely?")


_TRUST_HINT = "pass --trust-checkpoint (trust_checkpoint=True)"


def _load_weights_only(path: str) -> Dict:
    return load_weights_only(path, ExportError, _TRUST_HINT)


def _zero_stage(model_states: Dict, tag_dir: str) -> int:
    stage = (model_states.get("ds_config") or {}).get("zero_optimization", {}).get("stage")
    if stage is None:  # a config without the key: infer from the files DeepSpeed wrote
        if os.path.isfile(os.path.join(tag_dir, _ZERO3_MODEL_STATES)):
            return 3
        return 1 if glob.glob(os.path.join(tag_dir, "*optim_states.pt")) else 0
    return int(stage)


def _stage0_master_weights(model_states: Dict, model: nn.Module, cfg: Config) -> Dict[str, Tensor]:
    """fp32 master copies kept by DeepSpeed's bf16/fp16 optimizer wrapper at ZeRO-0, by parameter name.

    The wrapper stores them per optimizer group, in group order, without names; the trainer builds the groups
    with ``zvl_ds.runtime.optim.optimizer_groups``, so rebuilding the groups on the same model recovers the names.
    """
    wrapper = model_states.get("optimizer") or {}
    if "fp32_groups" in wrapper:
        masters = [list(group) for group in wrapper["fp32_groups"]]
    elif "fp32_groups_flat" in wrapper:
        masters = [[flat] for flat in wrapper["fp32_groups_flat"]]
    else:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_groups(model, cfg.optim)
    if len(groups) != len(masters):
        return {}
    found: Dict[str, Tensor] = {}
    for group, saved in zip(groups, masters):
        params = group["params"]
        if len(saved) == 1 and len(params) > 1:  # one flat tensor per group
            flat = saved[0].reshape(-1)
            if flat.numel() < sum(p.numel() for p in params):
                return {}
            saved = list(torch.split(flat[:sum(p.numel() for p in params)], [p.numel() for p in params]))
        if len(saved) != len(params):
            return {}
        for param, tensor in zip(params, saved):
            if tensor.numel() != param.numel():
                return {}
            found[names[id(param)]] = tensor.reshape(param.shape).float()
    return found


def consolidate_state_dict(run_dir: str, tag: str, model: DualEncoder, cfg: Config,
                           trust_checkpoint: bool = False) -> Dict[str, Tensor]:
    """fp32 weights of ``RUN/TAG`` for ``model``'s keys, from a checkpoint of any ZeRO stage and precision.

    ZeRO 1-3: DeepSpeed's ``zero_to_fp32`` merges the fp32 master partitions of all ranks (exact even when
    training ran in bf16). ZeRO 0: the module state of ``mp_rank_00_model_states.pt``; under bf16/fp16 the
    fp32 masters of DeepSpeed's optimizer wrapper replace the 16-bit copies. ``trust_checkpoint`` skips the
    weights-only check of DeepSpeed's files (for a newer DeepSpeed that pickles classes not listed above).
    """
    tag_dir = os.path.join(run_dir, tag)
    states_path = _model_states_file(tag_dir)
    if trust_checkpoint:
        model_states = torch.load(states_path, map_location="cpu", weights_only=False, mmap=True)
    else:
        model_states = _load_weights_only(states_path)
    stage = _zero_stage(model_states, tag_dir)
    module_state = model_states.get("module") or {}
    if stage == 0:
        state = dict(module_state)
        low_precision = [k for k, p in model.named_parameters()
                         if k in state and state[k].is_floating_point() and state[k].dtype != torch.float32]
        if low_precision:
            masters = _stage0_master_weights(model_states, model, cfg)
            state.update(masters)
            still = [k for k in low_precision if k not in masters and model.get_parameter(k).requires_grad]
            if still:
                warnings.warn(f"{tag_dir}: no fp32 master copy found for {len(still)} parameters (e.g. {still[0]}); "
                              f"exporting their {state[still[0]].dtype} values")
    else:
        # imported here: only ZeRO 1-3 checkpoints need it, and importing DeepSpeed costs seconds (and prints its
        # accelerator banner) for the tools that read a ZeRO-0 run or an exported model folder
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 calls torch.load(weights_only=False) itself: its files pickle DeepSpeed classes (ZeRO
        # stage enum, loss scaler). Every file it will open is first checked with the weights-only unpickler (only
        # tensors, containers and DeepSpeed's data classes pass), so the unrestricted load never meets code.
        if not trust_checkpoint:
            check_checkpoint_folder(tag_dir, ExportError, _TRUST_HINT)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress for every file
            try:
                state = get_fp32_state_dict_from_zero_checkpoint(run_dir, tag)
            except (FileNotFoundError, ValueError) as error:
                raise ExportError(f"cannot consolidate ZeRO-{stage} checkpoint {tag_dir}: {error}") from error
        if stage <= 2:
            # zero_to_fp32 leaves out frozen parameters at ZeRO-1 (it only knows the optimizer's); they are
            # never updated, so the module copy is their exact value.
            for key, value in module_state.items():
                state.setdefault(key, value)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def ema_state_dict(run_dir: str, tag: str, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``state`` with every averaged parameter replaced by the checkpoint's model EMA (``runtime.ema``)."""
    folder = os.path.join(run_dir, tag)
    try:
        merged = merge_ema_files(folder)
    except (EmaFileError, OSError, RuntimeError, KeyError) as error:  # RuntimeError: a file torch cannot read
        raise ExportError(f"cannot read the model EMA of {folder}: {error}") from None
    if merged is None:
        raise ExportError(f"{folder} holds no model EMA (zvl_ema_rank_*.pt): the run was trained without "
                          "model.ema.decay; export without --ema")
    _, average = merged
    unknown = sorted(set(average) - set(state))
    if unknown:
        raise ExportError(f"{folder}: the model EMA names tensors the model does not have, e.g. {unknown[0]}")
    return {**state, **average}


Initialiser = Callable[[nn.Module, Config], object]


def load_run(run_dir: str, tag: Optional[str] = None, trust_checkpoint: bool = False, ema: bool = False,
             initialise: Optional[Initialiser] = None) -> Tuple[Config, DualEncoder, str]:
    """Rebuild a run's model on CPU in fp32 with its checkpoint's weights: (config, model in eval mode, tag).

    The towers are built without pretrained weights (the checkpoint replaces every tensor). ``ema``: the weights
    are the checkpoint's model EMA (the trainable parameters' averages; everything else as trained). A run with
    adapters (``model.*.lora``) saved its trainable tensors only: its frozen base is built again from the config,
    with the whole-model weights ``initialise`` loads (``zvl_ds.model.init_weights.initialise_from_config``) when the
    run started from them, and must be the one the checkpoint records (``adapter_base.json``); the model keeps its
    adapters unmerged (``zvl_ds.model.adapters.merge_adapters`` folds them in).
    """
    tag = resolve_tag(run_dir, tag)
    cfg = run_config(run_dir, tag)
    if adapters_configured(cfg.model):
        model = _adapter_run_base(run_dir, tag, cfg, initialise)
    else:
        model = build_model(offline_model_config(cfg), cfg.loss)
    state = consolidate_state_dict(run_dir, tag, model, cfg, trust_checkpoint)
    if ema:
        state = ema_state_dict(run_dir, tag, state)
    if adapters_configured(cfg.model):
        load_trainable(model, state, os.path.join(run_dir, tag))
    else:
        load_state_strict(model, state, os.path.join(run_dir, tag))
    return cfg, model.eval(), tag


def _adapter_run_base(run_dir: str, tag: str, cfg: Config, initialise: Optional[Initialiser]) -> DualEncoder:
    """The model of a run with adapters, its frozen base as the run built it (checked against the checkpoint)."""
    folder = os.path.join(run_dir, tag)
    path = os.path.join(folder, ADAPTER_BASE_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"{folder} has no {ADAPTER_BASE_FILE}, but its config has model.*.lora adapters: the "
                          "checkpoint does not say which frozen base its adapters belong to")
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (ValueError, RecursionError) as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from None
    torch.manual_seed(cfg.seed)  # a base with random parts (pretrained: false) is the run's seeded one
    try:
        model = build_model(cfg.model, cfg.loss)
        if cfg.model.load_pretrained or cfg.model.load_finetuned:
            if initialise is None:
                raise ExportError(f"{folder}: the run's frozen base comes from model.pretrained / "
                                  "model.finetuned, which this reader does not load")
            initialise(model, cfg)
    except (OSError, ValueError) as error:
        raise ExportError(f"{folder}: cannot build the frozen base its adapters were trained on: {error}") from None
    change = base_change(saved, base_identity(cfg.model, model))
    if change:
        raise ExportError(f"{folder}: {change}")
    return model


def load_trainable(model: nn.Module, state: Dict[str, Tensor], source: str) -> None:
    """A small checkpoint's tensors (every trainable parameter and buffer, no frozen parameter) into ``model``."""
    own = model.state_dict()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in own if k not in state and k not in frozen]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ExportError(f"{source} does not match the model its config describes: {len(missing)} missing "
                          f"trainable tensor(s) {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ExportError(f"{source}: tensor shapes differ from the model: {'; '.join(wrong[:5])}")
    model.load_state_dict(state, strict=False)
