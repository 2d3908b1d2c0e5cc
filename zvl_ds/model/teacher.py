"""The distillation teacher (``distill.teacher``, docs/distillation.md): any model zvl_ds can load, frozen, in eval
mode, in the run's precision, never in the optimizer or a checkpoint.

Accepted, tried in this order:

* a zvl_ds model folder (``python -m zvl_ds.export``; read by ``inference.load_model``);
* a Hugging Face ``CLIPModel`` / ``SiglipModel`` folder (its ``config.json`` names ``clip`` or ``siglip``);
* an OpenCLIP folder (``local-dir:FOLDER``, or a folder holding ``open_clip_config.json``);
* an OpenCLIP architecture name, with its weights file in ``distill.pretrained``.

Each is built as the same source would be built as a student (``config.model_sources``, ``model.build``), so it is
refused for the same reasons, with exit code 2: missing files, code shipped with a model (``trust_remote_code``),
hub names (nothing is downloaded); and, for a teacher, a model without weights. Its own tokenizer and
preprocessing come with it: the loader tokenizes each caption with both tokenizers, and the step makes the
teacher's image view (its size and normalisation) from the same crop as the student's.

The run records the teacher's identity (``Teacher.identity``: the name as configured, the weights file and its
SHA-256) in each checkpoint and refuses to resume with another. At ZeRO-3 the teacher is partitioned like the
student (a DeepSpeed ZeRO-3 engine without an optimizer): each rank holds 1 / world size of its weights, and each
layer's are gathered for its forward only.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from zvl_ds.base.checksums import file_sha256
from zvl_ds.config import Config, ConfigError, NormalizeConfig, config_from_dict
from zvl_ds.config.model_sources import (HF_CONFIG_FILE, HF_MODEL_TYPES, OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_LOCAL_DIR,
                                         hf_weights_file, open_clip_source)
from zvl_ds.data.sources import ResolvedDataset
from zvl_ds.data.teacher_store import ShardToCheck, check_stored, refuse_parquet
from zvl_ds.data.transforms import ImageTransform, load_tokenizer
from zvl_ds.model.build import build_model
from zvl_ds.model.inference import WEIGHTS_FILE, Preprocessing, is_model_folder, load_model, text_vocabulary_size

logger = logging.getLogger(__name__)


class TeacherError(ConfigError):
    """A teacher that cannot be used; the message names ``distill.teacher`` and the problem (exit code 2)."""


@dataclass
class TeacherSource:
    """What ``distill.teacher`` names: how to build it, its config (as a student of that source would have), its
    weights file."""

    kind: str  # zvl_ds, hf_clip, hf_siglip, open_clip
    config: Config
    weights: str
    model: Optional[nn.Module] = None  # built already (a zvl_ds folder is read whole by load_model)
    tokenizer: Any = None


@dataclass
class Teacher:
    """A loaded teacher. ``model`` is what the step calls (the module, or at ZeRO-3 its engine); ``module`` the
    dual encoder itself. ``scale`` / ``bias`` are the logit scale and bias the distillation term uses (the config's,
    else the teacher's own; ``bias`` None for a softmax teacher)."""

    model: Callable[..., Dict[str, Optional[torch.Tensor]]]
    module: nn.Module
    config: Config  # the teacher's own: its transforms, caption length and caption preparation
    tokenizer: Any
    image_size: int
    normalize: NormalizeConfig
    max_length: int
    scale: float
    bias: Optional[float]
    identity: Dict[str, str]

    def parameter_bytes(self) -> Tuple[int, int]:
        """(bytes of the teacher's weights this rank holds, bytes of all its weights): equal unless partitioned."""
        held = whole = 0
        for param in self.module.parameters():
            size = param.element_size()
            whole += getattr(param, "ds_numel", param.numel()) * size
            partition = getattr(param, "ds_tensor", None)
            held += (partition.numel() if partition is not None else param.numel()) * size
        return held, whole

    def evaluation_config(self, cfg: Config) -> Config:
        """``cfg`` (the run's data and validation sets) with the teacher's validation transforms, normalisation,
        caption length and caption preparation: what evaluating the teacher on the run's sets needs."""
        evaluated = copy.deepcopy(cfg)
        Preprocessing.from_config(self.config).apply_to(evaluated)
        return evaluated


def _error(name: str, problem: str) -> TeacherError:
    return TeacherError(f"distill.teacher={name!r}: {problem}")


def _hf_arch(folder: str, name: str) -> str:
    try:
        with open(os.path.join(folder, HF_CONFIG_FILE), encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise _error(name, f"cannot read {HF_CONFIG_FILE}: {error}") from None
    arch = {value: key for key, value in HF_MODEL_TYPES.items()}.get(model_type)
    if arch is None:
        raise _error(name, f"{HF_CONFIG_FILE} names model_type {model_type!r}; a Hugging Face teacher is a CLIP or "
                           "SigLIP model (model_type clip or siglip)")
    return arch


def _source_config(raw: Dict[str, Any], name: str) -> Config:
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        raise _error(name, str(error)) from None


def _open_clip(name: str, model_name: str, pretrained: Optional[str]) -> TeacherSource:
    try:
        source = open_clip_source(model_name, pretrained)
    except ConfigError as error:  # the student's key names, told as the teacher's
        raise _error(name, str(error).replace("model.open_clip.pretrained", "distill.pretrained")) from None
    if source.weights is None:
        raise _error(name, "no weights: a local-dir: folder needs open_clip_model.safetensors (or .bin), an "
                           "architecture name needs its weights file in distill.pretrained")
    raw = {"model": {"arch": "open_clip", "open_clip": {"name": model_name, "pretrained": pretrained}}}
    return TeacherSource("open_clip", _source_config(raw, name), source.weights)


def resolve_teacher(cfg: Config) -> TeacherSource:
    """What ``distill.teacher`` names, checked (see the module docstring); nothing is built yet, except a zvl_ds
    model folder, which ``load_model`` reads whole."""
    name, pretrained = str(cfg.distill.teacher), cfg.distill.pretrained
    if name.startswith(OPEN_CLIP_LOCAL_DIR):
        return _open_clip(name, name, pretrained)
    if os.path.isdir(name):
        if is_model_folder(name):
            zvl = load_model(name)  # its own errors name the folder and the missing file (exit code 2)
            return TeacherSource("zvl_ds", zvl.config, os.path.join(name, WEIGHTS_FILE), zvl.model, zvl.tokenizer)
        if os.path.isfile(os.path.join(name, HF_CONFIG_FILE)):
            arch = _hf_arch(name, name)
            if hf_weights_file(name) is None:
                raise _error(name, "no weights file (model.safetensors or pytorch_model.bin): a teacher needs its "
                                   "trained weights")
            config = _source_config({"model": {"arch": arch, "hf_folder": name}}, name)
            return TeacherSource(arch, config, hf_weights_file(name))
        if os.path.isfile(os.path.join(name, OPEN_CLIP_CONFIG_FILE)):
            return _open_clip(name, OPEN_CLIP_LOCAL_DIR + name, pretrained)
        raise _error(name, "a folder, but not a model folder: it holds none of model_config.json (zvl_ds), "
                           f"{HF_CONFIG_FILE} (Hugging Face), {OPEN_CLIP_CONFIG_FILE} (OpenCLIP)")
    if os.path.exists(name):
        raise _error(name, "a file, not a model folder")
    if name.startswith(("hf-hub:", "http://", "https://")):
        raise _error(name, "a hub name or URL: nothing is downloaded; download the model and give its folder")
    if pretrained is None:
        raise _error(name, "no such local folder (nothing is downloaded: hub names are refused). Give a zvl_ds model "
                           "folder, a Hugging Face CLIP / SigLIP folder, local-dir:FOLDER, or an OpenCLIP architecture "
                           "name with its weights file in distill.pretrained")
    return _open_clip(name, name, pretrained)


def teacher_weights(cfg: Config) -> Tuple[str, str]:
    """(kind, weights file) of ``distill.teacher``, refused for the reasons ``resolve_teacher`` refuses it, without
    building the teacher or reading its weights (a stored teacher only needs their hash)."""
    name = str(cfg.distill.teacher)
    if os.path.isdir(name) and is_model_folder(name):
        weights = os.path.join(name, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise _error(name, f"a zvl_ds model folder without its weights file {WEIGHTS_FILE}")
        return "zvl_ds", weights
    source = resolve_teacher(cfg)
    return source.kind, source.weights


def teacher_identity(cfg: Config, kind_and_weights: Optional[Tuple[str, str]] = None) -> Dict[str, str]:
    """What a checkpoint and stored embeddings record of the teacher: the name as configured, its kind, its weights
    file and that file's SHA-256 (which is what identifies it: the folder may move)."""
    kind, weights = kind_and_weights or teacher_weights(cfg)
    return {"teacher": str(cfg.distill.teacher), "kind": kind, "weights": os.path.abspath(weights),
            "sha256": file_sha256(weights)}


def own_scale_and_bias(model: nn.Module) -> Tuple[float, Optional[float]]:
    """A model's own logit scale (CLIP's ``exp(logit_scale)``, 1 / its temperature) and bias (None: softmax)."""
    with torch.no_grad():
        scale_bias = model.logit_scale_bias()
        if scale_bias is not None:
            return float(scale_bias[0]), float(scale_bias[1])
        return float(1.0 / model.temperature().reshape(-1)[0]), None


def _scale_and_bias(cfg: Config, own_scale: float, own_bias: Optional[float], name: str
                    ) -> Tuple[float, Optional[float]]:
    """The config's scale and bias where set, else the teacher's own; a sigmoid student needs a bias."""
    scale = cfg.distill.scale if cfg.distill.scale is not None else own_scale
    bias = cfg.distill.bias if cfg.distill.bias is not None else own_bias
    if cfg.loss.name == "SigLIP" and bias is None:
        raise _error(name, "a softmax (CLIP) teacher has no logit bias, which sigmoid distillation (loss.name=SigLIP) "
                           "needs: set distill.bias (and distill.scale), e.g. distill.scale=10 distill.bias=-10")
    return scale, (bias if cfg.loss.name == "SigLIP" else None)


def _partitioned(module: nn.Module, ds_config: Dict[str, Any]):
    """The teacher as a DeepSpeed ZeRO-3 engine without an optimizer: its weights partitioned over the ranks like
    the student's, each layer's gathered for its forward only, in the run's precision."""
    import deepspeed

    zero = {key: value for key, value in ds_config.get("zero_optimization", {}).items()
            if key not in ("offload_optimizer",)}
    config = {"train_micro_batch_size_per_gpu": ds_config.get("train_micro_batch_size_per_gpu", 1),
              "zero_optimization": {**zero, "stage": 3}, "bf16": dict(ds_config.get("bf16", {})),
              "fp16": dict(ds_config.get("fp16", {})), "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


def load_teacher(cfg: Config, device: torch.device, dtype: torch.dtype,
                 ds_config: Optional[Dict[str, Any]] = None) -> Teacher:
    """The frozen teacher of ``cfg.distill``, on ``device`` in ``dtype``; partitioned when ``ds_config`` is ZeRO-3.

    Building it leaves torch's global random generator as it was, so a run draws the same student weights and
    dropout with and without a teacher."""
    name = str(cfg.distill.teacher)
    with torch.random.fork_rng(devices=[]):
        source = resolve_teacher(cfg)
        module = source.model if source.model is not None else build_model(source.config.model, source.config.loss)
    tokenizer = source.tokenizer if source.tokenizer is not None else load_tokenizer(
        source.config.model.text_encoder, vocab_size=text_vocabulary_size(module.text_tower))
    scale, bias = _scale_and_bias(cfg, *own_scale_and_bias(module), name)
    module.requires_grad_(False)
    module.eval()
    transforms = source.config.transforms
    image_size = ImageTransform(transforms.valid_transforms, transforms).size
    identity = teacher_identity(cfg, (source.kind, source.weights))
    stage = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        model = _partitioned(module, ds_config)
        module = model.module
    else:
        model = module = module.to(device=device, dtype=dtype)
    teacher = Teacher(model=model, module=module, config=source.config, tokenizer=tokenizer, image_size=image_size,
                      normalize=transforms.normalize, max_length=source.config.model.max_length, scale=scale,
                      bias=bias, identity=identity)
    held, whole = teacher.parameter_bytes()
    logger.info("distill.teacher=%s (%s, %d px, logit scale %.4g%s): %.1f of %.1f MiB of weights on this rank",
                name, source.kind, image_size, scale, "" if bias is None else f", bias {bias:.4g}", held / 2 ** 20,
                whole / 2 ** 20)
    return teacher


@dataclass(frozen=True)
class StoredTeacher:
    """A teacher known by its embeddings stored beside the training shards (``distill.source: stored``): never
    loaded. ``scale`` / ``bias`` are the distillation term's (the config's, else the teacher's own, as stored)."""

    identity: Dict[str, str]
    scale: float
    bias: Optional[float]
    width: int
    shards: int


REINFORCE_COMMAND = ("python -m zvl_ds.reinforce_shards --cfg CONFIG [key=value ...] --resume (this run's config and "
                     "overrides; docs/distillation.md)")


def stored_teacher(cfg: Config, datasets: Sequence[ResolvedDataset]) -> StoredTeacher:
    """The stored teacher of ``cfg.distill`` for training on ``datasets``: its identity (the configured teacher's
    weights, hashed, not loaded), checked against every shard's stored embeddings (a ``StoredTeacherError``, exit
    code 2, names the shards that lack them or hold another teacher's)."""
    refuse_parquet(datasets)
    identity = teacher_identity(cfg)
    shards = [ShardToCheck(dataset.name, path, dataset.shard_sizes[index] if dataset.shard_sizes else None)
              for dataset in datasets for index, path in enumerate(dataset.shards)]
    headers = check_stored(shards, identity, REINFORCE_COMMAND)
    scale, bias = _scale_and_bias(cfg, headers[0].scale, headers[0].bias, str(cfg.distill.teacher))
    return StoredTeacher(identity, scale, bias, headers[0].width, len(headers))


def check_teacher_identity(saved: Optional[Dict[str, str]], current: Optional[Dict[str, str]], where: str) -> None:
    """A run resumes with the teacher it was trained with (the same weights, by SHA-256; the path may move)."""
    if saved == current or (saved and current and saved.get("sha256") == current.get("sha256")):
        return

    def describe(identity):
        if not identity:
            return "no teacher"
        return f"teacher {identity.get('teacher')!r} (sha256 {identity.get('sha256')})"
    raise TeacherError(f"cannot resume {where}: it was trained with {describe(saved)}, this config has "
                       f"{describe(current)}. Resume with the same distill.teacher, or start a new run (another "
                       "data.exp_name)")
