"""Export a training run to a self-contained model folder, and load it back for inference.

``python tools/export.py RUN_DIR [--tag TAG] --out MODEL_DIR`` writes::

    MODEL_DIR/model.safetensors   fp32 weights of the whole DualEncoder (consolidated from any ZeRO stage)
    MODEL_DIR/model_config.json   the model section and temperature, with the text tower's full Hugging Face
                                  config embedded: rebuilding needs no hub access and no pretrained weights
    MODEL_DIR/preprocess.json     the validation image transform (resize, center crop, normalisation) and the
                                  caption length
    MODEL_DIR/tokenizer/          the tokenizer files (``save_pretrained``)

Loading needs neither DeepSpeed nor the run folder::

    import zvl_ds
    from PIL import Image
    model = zvl_ds.load_model("MODEL_DIR")
    captions = ["a red circle", "a blue square", "two green triangles"]
    image = model.encode_image(model.preprocess(Image.open("photo.jpg")).unsqueeze(0))
    scores = (image @ model.encode_text(captions).T).squeeze(0)
    print(captions[int(scores.argmax())])
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import zvl_ds
from zvl_ds.checkpoint import CheckpointError, list_tags, read_latest
from zvl_ds.config import Config, ConfigError, config_from_dict, load_config
from zvl_ds.model import DualEncoder, build_model

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
EXPORT_FORMAT = "zvl_ds.exported_model"
EXPORT_FORMAT_VERSION = 1

_ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_MODEL_STATES = "mp_rank_00_model_states.pt"


class ExportError(RuntimeError):
    """A run folder or model folder that cannot be exported or loaded; the message names what is missing."""


# --------------------------------------------------------------------------------------------------
# Reading a run folder
# --------------------------------------------------------------------------------------------------


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


# DeepSpeed's own plain data classes that appear in its checkpoint files (ZeRO stage, loss-scaler settings,
# fragment offsets). They carry values only; allowing them keeps the weights-only unpickler's guarantee that
# loading runs no code.
_DEEPSPEED_SAFE_GLOBALS = (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                           ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                           ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                           ("deepspeed.utils.tensor_fragment", "fragment_address"))


def _deepspeed_safe_globals() -> List[type]:
    import importlib

    found = []
    for module_name, name in _DEEPSPEED_SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: the class simply is not needed
            pass
    return found


def _load_weights_only(path: str) -> Dict:
    """``torch.load`` that refuses anything but tensors, plain containers and DeepSpeed's data classes above.
    ``mmap`` keeps this cheap: tensor data is not read."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # pickled code, an unknown class, or not a torch file
        raise ExportError(f"{path} cannot be read as a weights-only checkpoint file ({error}). If this run "
                          "folder is yours and a newer DeepSpeed pickles another class, pass "
                          "--trust-checkpoint (trust_checkpoint=True) to skip this check.") from error


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
    with ``zvl_ds.optim.parameter_groups``, so rebuilding the groups on the same model recovers the names.
    """
    from zvl_ds.optim import parameter_groups

    wrapper = model_states.get("optimizer") or {}
    if "fp32_groups" in wrapper:
        masters = [list(group) for group in wrapper["fp32_groups"]]
    elif "fp32_groups_flat" in wrapper:
        masters = [[flat] for flat in wrapper["fp32_groups_flat"]]
    else:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, cfg.optim.param.weight_decay, cfg.optim.decay_all)
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
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 calls torch.load(weights_only=False) itself: its files pickle DeepSpeed classes (ZeRO
        # stage enum, loss scaler). Every file it will open is first checked with the weights-only unpickler (only
        # tensors, containers and DeepSpeed's data classes pass), so the unrestricted load never meets code.
        for path in [] if trust_checkpoint else sorted(glob.glob(os.path.join(tag_dir, "*_model_states.pt")) +
                           glob.glob(os.path.join(tag_dir, "*_optim_states.pt"))):
            _load_weights_only(path)
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


def load_run(run_dir: str, tag: Optional[str] = None, trust_checkpoint: bool = False
             ) -> Tuple[Config, DualEncoder, str]:
    """Rebuild a run's model on CPU in fp32 with its checkpoint's weights: (config, model in eval mode, tag).

    The towers are built without pretrained weights (the checkpoint replaces every tensor).
    """
    tag = resolve_tag(run_dir, tag)
    cfg = run_config(run_dir, tag)
    model = build_model(_offline_model_config(cfg), cfg.loss)
    state = consolidate_state_dict(run_dir, tag, model, cfg, trust_checkpoint)
    load_state_strict(model, state, os.path.join(run_dir, tag))
    return cfg, model.eval(), tag


def load_state_strict(model: nn.Module, state: Dict[str, Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ExportError(f"{source} does not match the model its config describes: "
                          f"{len(missing)} missing tensor(s) {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ExportError(f"{source}: tensor shapes differ from the model: {'; '.join(wrong[:5])}")
    model.load_state_dict(state, strict=True)


def _offline_model_config(cfg: Config):
    """The model section with both towers built from configs only (no weights loaded, nothing downloaded)."""
    model_cfg = dataclasses.replace(cfg.model)
    model_cfg.image_encoder = dataclasses.replace(cfg.model.image_encoder, pretrained=False)
    model_cfg.text_encoder = dataclasses.replace(cfg.model.text_encoder, pretrained=False)
    return model_cfg
