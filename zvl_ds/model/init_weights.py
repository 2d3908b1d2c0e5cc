"""Initialise a whole dual encoder from saved weights: LAVIS's ``model.load_pretrained`` / ``model.pretrained``
and ``model.load_finetuned`` / ``model.finetuned``.

A source is one of:

* an exported model folder (``python -m zvl_ds.export``): its ``model.safetensors``;
* a training run folder (the checkpoint its ``latest`` names) or one of its ``step_NNNNNNNN`` folders,
  consolidated to fp32 by ``zvl_ds.model.saved_run`` from any ZeRO stage, with its weights-only check of DeepSpeed's
  files (``ckpt.trust_checkpoint`` skips it);
* a single weights file: safetensors, or a torch file read with the weights-only unpickler.

The architecture is the config's, not the source's: only tensors are taken. A tensor whose shape differs is an
error naming it (a partial copy would train a model that is not what the config says); tensors missing from the
source keep their fresh initialisation and tensors the model lacks are ignored, both reported, since a partial
load (new projections on pretrained towers, a constant temperature where the source learned one) is useful.
The learnable temperature ``tau`` and SigLIP's ``logit_scale_log`` / ``logit_bias`` are weights like the others:
they come from the source when both sides have them. Nothing is downloaded; the trainer calls this before
DeepSpeed wraps the model (so it works at every ZeRO stage) and only when it does not resume.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from safetensors import SafetensorError
from torch import Tensor, nn

from zvl_ds.base.errors import UserError
from zvl_ds.config import Config, is_remote_location
from zvl_ds.model.adapters import base_names, is_adapter_parameter, merge_adapters
from zvl_ds.model.inference import WEIGHTS_FILE, ExportError
from zvl_ds.model.saved_run import load_run
from zvl_ds.model.weights_files import read_state_dict
from zvl_ds.runtime.checkpoint import LATEST_FILE, TAG_PATTERN

logger = logging.getLogger(__name__)

_NAMES_SHOWN = 5  # key names a message lists before "..."
# what a damaged or foreign weights file raises (read_state_dict's own errors, and safetensors' header errors)
_READ_ERRORS = (ValueError, OSError, SafetensorError)


class InitWeightsError(UserError, ValueError):
    """A whole-model weights source that cannot be read or does not fit the model; the message names the key."""


@dataclass
class InitReport:
    """What ``load_whole_model`` took from a source: loaded tensors, and the names it could not match."""

    config_key: str  # model.pretrained or model.finetuned
    source: str
    loaded: int
    missing: List[str] = field(default_factory=list)  # model tensors the source lacks: left as initialised
    unexpected: List[str] = field(default_factory=list)  # source tensors the model lacks: ignored

    def summary(self) -> str:
        return (f"initialised the model from {self.config_key}={self.source}: {self.loaded} tensors loaded, "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected")


def _names(keys: List[str]) -> str:
    return ", ".join(keys[:_NAMES_SHOWN]) + (", ..." if len(keys) > _NAMES_SHOWN else "")


def selected_source(cfg: Config) -> Optional[Tuple[str, str]]:
    """(config key, path) of the weights a fresh run starts from, or None: ``finetuned`` wins over ``pretrained``
    (LAVIS loads the finetuned weights when asked, for evaluation and for training alike)."""
    if cfg.model.load_finetuned:
        return "model.finetuned", str(cfg.model.finetuned)
    if cfg.model.load_pretrained:
        return "model.pretrained", str(cfg.model.pretrained)
    return None


def read_source(path: str, config_key: str, trust_checkpoint: bool = False) -> Dict[str, Tensor]:
    """The tensors of a weights source (see the module docstring), by the dual encoder's key names."""
    if is_remote_location(path):
        raise InitWeightsError(f"{config_key}={path!r}: a URL or hub name; nothing is downloaded, give a local path")
    if not os.path.exists(path):
        raise InitWeightsError(f"{config_key}: {path} does not exist")
    if os.path.isfile(path):
        try:
            return read_state_dict(path)
        except _READ_ERRORS as error:
            raise InitWeightsError(f"{config_key}: {error}") from None
    if os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        try:
            return read_state_dict(os.path.join(path, WEIGHTS_FILE))
        except _READ_ERRORS as error:
            raise InitWeightsError(f"{config_key}: {error}") from None
    if os.path.isfile(os.path.join(path, LATEST_FILE)):
        return _consolidate(path, None, config_key, trust_checkpoint)
    if TAG_PATTERN.match(os.path.basename(os.path.normpath(path))):
        folder = os.path.normpath(path)
        return _consolidate(os.path.dirname(folder), os.path.basename(folder), config_key, trust_checkpoint)
    raise InitWeightsError(f"{config_key}: {path} is a folder but neither an exported model folder (no "
                           f"{WEIGHTS_FILE}), a run folder (no {LATEST_FILE} file) nor a checkpoint folder named "
                           "like step_00000100")


def _consolidate(run_dir: str, tag: Optional[str], config_key: str, trust_checkpoint: bool) -> Dict[str, Tensor]:
    """A run's checkpoint as fp32 tensors: the run's own model rebuilt from its config.yaml and loaded strictly
    (``zvl_ds.model.saved_run.load_run``), then read back by name."""
    try:
        _, model, _ = load_run(run_dir, tag, trust_checkpoint, initialise=initialise_from_config)
    except ExportError as error:
        raise InitWeightsError(f"{config_key}: {error}") from None
    merge_adapters(model)  # a run trained with adapters: its weights as one model (names without adapters)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def load_whole_model(model: nn.Module, state: Dict[str, Tensor], config_key: str, source: str) -> InitReport:
    """Copy ``state`` into ``model`` by name after checking shapes; report what did not match (see the module
    docstring for what is an error and what is allowed). A model with adapters takes each adapted module's weights
    into its base layer; the adapters themselves keep their initialisation."""
    state = base_names(state, model)
    own = {key: value for key, value in model.state_dict().items() if not is_adapter_parameter(key)}
    wrong = [f"{key}: {tuple(state[key].shape)} in the source, {tuple(value.shape)} in the model"
             for key, value in own.items() if key in state and state[key].shape != value.shape]
    if wrong:
        raise InitWeightsError(f"{config_key}={source}: {len(wrong)} tensor(s) have another shape than this config's "
                               f"model: {'; '.join(wrong[:_NAMES_SHOWN])}{'; ...' if len(wrong) > _NAMES_SHOWN else ''}"
                               ". The architecture comes from the config (model.*), only weights from the source")
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if len(missing) == len(own):
        raise InitWeightsError(f"{config_key}={source}: none of its {len(state)} tensors (e.g. "
                               f"{_names(sorted(state))}) is a tensor of the dual encoder; weights of one tower go "
                               "to model.image_encoder.pretrained or model.text_encoder.pretrained instead")
    model.load_state_dict({key: state[key] for key in own if key in state}, strict=False)
    report = InitReport(config_key, source, len(own) - len(missing), missing, unexpected)
    if missing:
        logger.warning("%s=%s: %d model tensor(s) missing from the source keep their initial values: %s",
                       config_key, source, len(missing), _names(missing))
    if unexpected:
        logger.warning("%s=%s: %d tensor(s) of the source are not in the model and were ignored: %s",
                       config_key, source, len(unexpected), _names(unexpected))
    logger.info(report.summary())
    return report


def initialise_from_config(model: nn.Module, cfg: Config) -> Optional[InitReport]:
    """Load the weights ``model.load_finetuned`` / ``model.load_pretrained`` name into ``model``, if any."""
    selected = selected_source(cfg)
    if selected is None:
        return None
    config_key, path = selected
    if cfg.model.load_finetuned and cfg.model.load_pretrained:
        logger.info("model.load_finetuned and model.load_pretrained are both true: loading model.finetuned only")
    state = read_source(path, config_key, cfg.ckpt.trust_checkpoint)
    return load_whole_model(model, state, config_key, path)
