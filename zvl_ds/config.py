"""Typed configuration: YAML with ``_base_`` inheritance, ``key.sub=value`` overrides, LAVIS ``run:`` options.

Key names follow ZeroVL (``zerovl/tasks/clip/config.py`` and its yaml files) so that ZeroVL configs load as
written. Defaults follow ZeroVL's code defaults; where we deviate, a comment says why.

``python -m zvl_ds.config CFG.yaml [key=value ...]`` prints the resolved config; config errors exit with code 2.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml

from zvl_ds.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem the user must fix; the message names the key path."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class DatasetSource:
    """Explicit form of a dataset: where its shards are and, optionally, how many samples it has."""

    shards: str = ""  # brace pattern, glob, folder, text file listing shards, or URLs (http(s)://, pipe:)
    size: Optional[int] = None  # samples; read from sizes.json / *_stats.json when not given


@dataclass
class ZeroShotSetConfig:
    """A zero-shot classification set evaluated at the validation interval (logged as eval/<name>/top1, top5)."""

    path: str = ""  # a folder laid out by class (PATH/<class>/<image>) or a CSV of image,label rows
    classes: Optional[str] = None  # file of class names for the prompts, one per line; None = folder names/labels
    templates: Optional[str] = None  # file of prompt templates with {}, one per line; None = the built-in set


@dataclass
class DataConfig:
    exp_name: str = "your_exp_name"
    name: Literal["local"] = "local"
    train_type: Literal["shuffle", "sequential", "debias"] = "shuffle"
    train_steps: int = -1  # ZeroVL's key; > 0 fixes the run length (runner.train_steps wins if both are set)
    train_name: List[str] = field(default_factory=lambda: ["sbu", "cc3m"])
    valid_name: List[str] = field(default_factory=lambda: ["f30k", "coco"])
    # ZeroVL reads CSVs under ./data/; zvl_ds streams shards, made by tools/make_shards.py --out shards.
    data_path: str = "./shards/"
    datasets: Dict[str, DatasetSource] = field(default_factory=dict)  # explicit sources, by dataset name
    zeroshot: Dict[str, ZeroShotSetConfig] = field(default_factory=dict)  # classification sets, by name
    train_splits: List[str] = field(default_factory=lambda: ["train"])
    valid_splits: List[str] = field(default_factory=lambda: ["valid"])
    test_splits: List[str] = field(default_factory=list)
    batch_size: int = 1024  # global contrastive batch per optimizer step (all ranks)
    batch_size_train: Optional[int] = None  # global DGA chunk; None = batch_size (one chunk)
    batch_size_val: int = 1024  # global evaluation batch
    num_workers: int = 2
    shuffle_buffer: int = 1000  # sample-level shuffle buffer per loader worker
    enable_valid: bool = True
    single_eval: bool = False
    cuda_eval: bool = True
    val_steps: Optional[int] = None
    max_bad_sample_warnings: int = 20  # warnings printed per reason before they go quiet (all are counted)
    loader_timeout: float = 600.0  # seconds a loader worker may take for one batch before the run fails


@dataclass
class ResizeConfig:
    size: int = 256


@dataclass
class CenterCropConfig:
    size: int = 224


@dataclass
class RandomResizeCropConfig:
    size: int = 224
    scale: List[float] = field(default_factory=lambda: [0.6, 1.0])


@dataclass
class NormalizeConfig:
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class CaptionAugConfig:
    """ZeroVL's word-piece caption augmentation (zerovl-method.md section 6); off by default."""

    enable: bool = False
    select_prob: float = 0.2
    mask_prob: float = 0.5
    random_prob: float = 0.1
    delete_prob: float = 0.4
    max_pieces_per_word: int = 3


TRANSFORM_NAMES = ("random_resize_crop", "autoaug", "resize", "center_crop", "normalize")


@dataclass
class TransformsConfig:
    train_transforms: List[Literal[TRANSFORM_NAMES]] = field(
        default_factory=lambda: ["random_resize_crop", "autoaug"])
    valid_transforms: List[Literal[TRANSFORM_NAMES]] = field(default_factory=lambda: ["resize", "center_crop"])
    input_size: int = 224
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    center_crop: CenterCropConfig = field(default_factory=CenterCropConfig)
    random_resize_crop: RandomResizeCropConfig = field(default_factory=RandomResizeCropConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    caption_aug: CaptionAugConfig = field(default_factory=CaptionAugConfig)


@dataclass
class VitOptions:
    only_cls_token: bool = True


@dataclass
class ImageEncoderConfig:
    name: Literal["timm_modelzoo"] = "timm_modelzoo"
    tag: str = "vit_base_patch16_224_in21k"
    embedding_dim: Optional[int] = 768  # informational; the tower's real width is read from the model
    # false, true (only weights already in the local cache; nothing is downloaded) or a local weights file
    pretrained: Union[bool, str] = True
    trainable: bool = True
    img_size: Optional[int] = None
    grad_checkpointing: bool = False
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (depth=2, ...)
    vit: VitOptions = field(default_factory=VitOptions)


@dataclass
class TextEncoderConfig:
    name: Literal["huggingface_modelzoo"] = "huggingface_modelzoo"
    tag: str = "bert-base-uncased"  # a Hugging Face name (already cached) or a local directory
    embedding_dim: Optional[int] = 768
    pretrained: Union[bool, str] = True  # false builds from `config` (or the tag's config) with random weights
    trainable: bool = True
    target_token_idx: int = 0
    only_cls_token: bool = False
    pooling: Literal["cls", "mean"] = "cls"
    grad_checkpointing: bool = False
    tokenizer: Optional[str] = None  # None = the tag; "zvl_ds:demo_tokenizer" = the packaged demo vocabulary
    config: Dict[str, Any] = field(default_factory=dict)  # Hugging Face config fields (model_type, sizes, ...)


@dataclass
class ProjectionConfig:
    name: Literal["simple", "mlp"] = "simple"
    dim: int = 512
    image_projector_trainable: bool = True
    text_projector_trainable: bool = True


@dataclass
class PoolConfig:
    name: Literal["identity"] = "identity"


@dataclass
class ModelConfig:
    name: Literal["clip"] = "clip"
    arch: Optional[str] = None  # a preset from MODEL_PRESETS; explicit model.* keys override it
    max_length: int = 25
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    syncbn: bool = True  # accepted for ZeroVL configs; the towers have no BatchNorm to convert
    interpolate_pos_embed: bool = False
    # Speed only: results equal the plain eager towers up to floating-point rounding.
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"  # torch.compile mode per tower
    attention: Literal["sdpa", "eager"] = "sdpa"  # fused scaled_dot_product_attention in both towers


@dataclass
class NCELossOptions:
    gather_backward: bool = True


@dataclass
class TemperatureConfig:
    name: Literal["constant", "parameter"] = "constant"
    value: float = 0.02
    min: float = 0.001
    max: float = 0.5


@dataclass
class MixupConfig:
    beta: float = 0.1


@dataclass
class SigmoidConfig:
    scale_init: float = 10.0  # t: multiplies the cosine similarities; learned as log t
    bias_init: float = -10.0  # b: added to every pair's logit


@dataclass
class LossConfig:
    name: Literal["NCE", "MixUpNCE", "SigLIP"] = "NCE"
    global_reduce: bool = True
    group_size: int = -1
    smoothing: float = 0.0
    nce_loss: NCELossOptions = field(default_factory=NCELossOptions)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    chunk_rows: int = 1024  # rows of logits computed at once; the result is exact whatever the value
    chunk_cols: int = 0  # > 0: columns per logits tile (online log-sum-exp); 0: whole rows, as before
    sigmoid: SigmoidConfig = field(default_factory=SigmoidConfig)


@dataclass
class OptimParams:
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.001
    momentum: float = 0.0  # SGD only


@dataclass
class LRParams:
    num_cycles: float = 0.5
    min_lr_scale: float = 0.1


LR_SCHEDULES = ("cosine_schedule_with_warmup_min_lr_scale", "linear_warmup_cosine_lr", "linear_warmup_step_lr",
                "constant", "constant_lr")  # constant_lr: LAVIS's name for constant


@dataclass
class LRConfig:
    name: Literal[LR_SCHEDULES] = "cosine_schedule_with_warmup_min_lr_scale"
    init: float = 1e-4
    warmup_proportion: float = 0.025
    warmup_steps: Optional[int] = None  # wins over warmup_proportion when set
    min_lr: float = 0.0  # LAVIS schedules
    warmup_lr: float = 0.0  # LAVIS schedules
    lr_decay_rate: float = 0.9  # linear_warmup_step_lr: lr = init * rate ** epoch
    param: LRParams = field(default_factory=LRParams)


MODEL_PARTS = ("image_tower", "text_tower", "projection", "temperature")


@dataclass
class PartLRMultConfig:
    """Each part's learning rate as a multiple of the schedule's (optim.lr)."""

    image_tower: float = 1.0
    text_tower: float = 1.0
    projection: float = 1.0  # both projections
    temperature: float = 1.0  # the learnable temperature (loss.temperature.name=parameter)


@dataclass
class PartLRAbsConfig:
    """A part's peak learning rate given absolutely: its multiplier becomes value / optim.lr.init."""

    image_tower: Optional[float] = None
    text_tower: Optional[float] = None
    projection: Optional[float] = None
    temperature: Optional[float] = None


@dataclass
class LayerDecayConfig:
    """Layer-wise LR decay (EVA-CLIP): block i of L gets decay ** (L - i); embeddings decay ** (L + 1)."""

    image_tower: float = 1.0  # 1.0 = off; < 1 needs a ViT tower (blocks.N)
    text_tower: float = 1.0  # 1.0 = off; < 1 needs a BERT-like tower (encoder.layer.N)


@dataclass
class OptimConfig:
    name: Literal["torch.optim.AdamW", "AdamW", "torch.optim.SGD", "SGD"] = "torch.optim.AdamW"
    param: OptimParams = field(default_factory=OptimParams)
    lr: LRConfig = field(default_factory=LRConfig)
    lr_mult: PartLRMultConfig = field(default_factory=PartLRMultConfig)
    lr_abs: PartLRAbsConfig = field(default_factory=PartLRAbsConfig)
    layer_decay: LayerDecayConfig = field(default_factory=LayerDecayConfig)
    # ZeroVL decays every parameter (its exclusion rules are commented out); decaying norms, biases and the
    # temperature is rarely what users want, so by default they go to a no-decay group.
    decay_all: bool = False
    grad_clip: float = 0.0  # max global grad norm; 0 = off (ZeroVL uses none; DeepSpeed's own default is 1.0)
    implementation: Literal["auto", "plain", "foreach", "fused"] = "auto"  # auto: fused on CUDA, plain on CPU


@dataclass
class RunnerConfig:
    name: Literal["clip", "clip_bsgs"] = "clip"
    val_interval: int = 1  # epochs between evaluations
    val_interval_steps: int = -1  # > 0: evaluate every this many steps instead
    stable_random: Literal["step", "none"] = "step"
    train_steps: int = -1  # > 0 fixes the run length; else epoch x steps per epoch
    offload_inputs: bool = False
    max_skipped_steps: int = 10
    collective_timeout: float = 600.0  # seconds any rank may wait in a collective before the job fails
    world_size: int = -1  # LAVIS run.world_size; > 0 is checked against the launcher's world size
    task: Literal["retrieval"] = "retrieval"  # LAVIS run.task; a dual encoder trains for retrieval only


@dataclass
class CkptConfig:
    dir: str = "./output"
    step_interval: int = 2000
    filename: str = "step_checkpoint.pth"  # accepted for ZeroVL configs; DeepSpeed names its own files
    keep_last: int = 2
    auto_resume: bool = True
    overwrite: bool = False  # with auto_resume false: allow starting over in a folder that holds checkpoints
    soft_resume: bool = False
    external_resume: Optional[str] = None
    trust_checkpoint: bool = False  # skip the weights-only check of the checkpoint files resume opens


@dataclass
class LogConfig:
    interval_train: int = 10
    interval_val: int = 1
    tensorboard: bool = True
    num_image_samples: int = 8  # validation images shown with their top-3 captions in TensorBoard
    record_sample_keys: bool = False  # append each step's sample keys to RUN/sample_keys/rank_N.txt (audit)


@dataclass
class DistParam:
    opt_level: str = "O1"


@dataclass
class DistConfig:
    """ZeroVL's launcher section, accepted as written; ``fp16: true`` selects precision fp16."""

    name: str = "torch"
    fp16: bool = False
    param: DistParam = field(default_factory=DistParam)
    url: str = "env://"
    distributed: bool = True


@dataclass
class WandbConfig:
    enable: bool = False
    project: str = "your_proj"
    entity: str = "your_entity"


@dataclass
class Config:
    seed: int = 2021  # ZeroVL leaves it unset (non-reproducible); its debias and mixup generators use 2021
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None: fp16 if dist.fp16 (ZeroVL's flag) else fp32. bf16 is the better choice on recent GPUs.
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = None
    evaluate: bool = False
    resume_ckpt_path: Optional[str] = None
    epoch: int = 20
    inference: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def run_dir(self) -> str:
        """A run's folder: ``ckpt.dir/data.exp_name``, as in ZeroVL."""
        return os.path.join(self.ckpt.dir, self.data.exp_name)

    @property
    def chunk_size(self) -> int:
        """Global DGA chunk (samples per forward summed over ranks)."""
        return self.data.batch_size_train or self.data.batch_size

    def per_rank_chunk(self, world_size: int) -> int:
        """Samples per forward on one rank: the DGA chunk for ``clip_bsgs``, the whole per-rank batch for ``clip``."""
        batch = self.chunk_size if self.runner.name == "clip_bsgs" else self.data.batch_size
        return batch // world_size

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


# --------------------------------------------------------------------------------------------------
# Model presets (model.arch)
# --------------------------------------------------------------------------------------------------

MODEL_PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's model: ViT-B/16 (ImageNet-21k) + BERT-base, [CLS] pooling, 512-d projections.
    "vit_b16_bert_base": {
        "max_length": 25,
        # timm's current name for ZeroVL's vit_base_patch16_224_in21k (the same weights; the old name warns)
        "image_encoder": {"tag": "vit_base_patch16_224.augreg_in21k", "embedding_dim": 768, "img_size": 224},
        "text_encoder": {"tag": "bert-base-uncased", "embedding_dim": 768, "pooling": "cls"},
        "projection": {"name": "simple", "dim": 512},
    },
    # A CPU-sized model built from configs (no weights): a 2-block ViT at 32 px and a 2-layer BERT.
    "tiny": {
        "max_length": 16,
        "image_encoder": {
            "tag": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32, "embedding_dim": 64,
            "kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
        },
        "text_encoder": {
            "tag": "bert", "pretrained": False, "embedding_dim": 64, "pooling": "cls",
            "tokenizer": "zvl_ds:demo_tokenizer",
            # vocab_size = the lines of zvl_ds/assets/demo_tokenizer/vocab.txt (a test checks they agree)
            "config": {"model_type": "bert", "vocab_size": 288, "hidden_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64},
        },
        "projection": {"name": "simple", "dim": 64},
    },
}

# --------------------------------------------------------------------------------------------------
# LAVIS `run:` options -> canonical keys
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
    "task": ("runner.task", lambda v: _lavis_task(v)),
}


def _lavis_task(task: Any) -> str:
    if task != "retrieval":
        raise ConfigError(f"run.task={task!r} is not supported: zvl_ds trains a dual encoder for image-text "
                          "retrieval (run.task: retrieval); LAVIS's captioning, VQA, multimodal classification "
                          "and other tasks need models it does not have")
    return task

# --------------------------------------------------------------------------------------------------
# YAML loading
# --------------------------------------------------------------------------------------------------


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``!!python/tuple`` (ZeroVL writes ``betas: !!python/tuple [0.9, 0.98]``)."""


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
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml_with_bases(path: str, _chain: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Read a YAML file, resolving ``_base_`` (a path or list of paths, relative to the file) depth-first."""
    real = os.path.realpath(path)
    if real in _chain:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(_chain + (real,))}")
    data = _read_yaml(path)
    bases = data.pop("_base_", None)
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
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: Dict[str, Any], path: List[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _get_path(tree: Dict[str, Any], path: List[str]) -> Tuple[bool, Any]:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _apply_lavis_run_block(raw: Dict[str, Any]) -> Dict[str, Any]:
    run = raw.pop("run", None)
    if run is None:
        return raw
    if not isinstance(run, dict):
        raise ConfigError("run: must be a mapping of LAVIS runtime options")
    for key, value in run.items():
        if key not in LAVIS_RUN_MAP:
            raise ConfigError(_unknown_key_message(f"run.{key}", key, list(LAVIS_RUN_MAP)))
        target, convert = LAVIS_RUN_MAP[key]
        mapped = convert(value) if convert else value
        path = target.split(".")
        present, existing = _get_path(raw, path)
        if present and existing != mapped:
            raise ConfigError(f"run.{key}={value!r} conflicts with {target}={existing!r}; give the value one way")
        _set_path(raw, path, mapped)
    return raw


def _apply_model_preset(raw: Dict[str, Any]) -> Dict[str, Any]:
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("arch") is None:
        return raw
    arch = model["arch"]
    if arch not in MODEL_PRESETS:
        raise ConfigError(_unknown_choice_message("model.arch", arch, list(MODEL_PRESETS)))
    raw["model"] = deep_merge(MODEL_PRESETS[arch], model)
    return raw


# --------------------------------------------------------------------------------------------------
# Typed conversion
# --------------------------------------------------------------------------------------------------


def _unknown_key_message(path: str, key: str, valid: List[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    hint = f"; did you mean {', '.join((parent + '.' if parent else '') + c for c in close)}?" if close else ""
    return f"unknown config key {path}{hint} (valid keys here: {', '.join(sorted(valid))})"


def _unknown_choice_message(path: str, value: Any, choices: List[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{path}: invalid choice {value!r}{hint} (valid choices: {', '.join(map(str, choices))})"


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
            raise ConfigError(_unknown_choice_message(path, value, choices))
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
            raise ConfigError(_unknown_key_message(full, key, names))
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Validation of combinations
# --------------------------------------------------------------------------------------------------


def _resolve_package_paths(cfg: Config) -> None:
    """``pkg:<package>/<path>`` in the towers' weight, tag and tokenizer keys -> the path inside the package."""
    from zvl_ds.package_paths import is_package_path, resolve_package_path

    for section, key in ((cfg.model.image_encoder, "pretrained"), (cfg.model.text_encoder, "tag"),
                         (cfg.model.text_encoder, "tokenizer")):
        value = getattr(section, key)
        if is_package_path(value):
            try:
                setattr(section, key, resolve_package_path(value))
            except FileNotFoundError as error:
                where = "image_encoder" if section is cfg.model.image_encoder else "text_encoder"
                raise ConfigError(f"model.{where}.{key}: {error}") from None


def _validate(cfg: Config) -> None:
    data = cfg.data
    for key in ("batch_size", "batch_size_val", "num_workers", "shuffle_buffer"):
        minimum = 0 if key == "num_workers" else 1
        if getattr(data, key) < minimum:
            raise ConfigError(f"data.{key}: must be >= {minimum}, got {getattr(data, key)}")
    if data.batch_size_train is not None:
        if data.batch_size_train < 1 or data.batch_size % data.batch_size_train:
            raise ConfigError(f"data.batch_size_train={data.batch_size_train} must divide "
                              f"data.batch_size={data.batch_size}")
    for name, zeroshot in data.zeroshot.items():
        if not zeroshot.path:
            raise ConfigError(f"data.zeroshot.{name}.path: give a class folder or an image,label CSV")
        if name in data.valid_name:
            raise ConfigError(f"data.zeroshot.{name}: the name is also a data.valid_name set; their metrics "
                              "would share eval/<name>/; rename one")
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
    if len(cfg.optim.param.betas) != 2:
        raise ConfigError(f"optim.param.betas: need two values, got {cfg.optim.param.betas}")
    code_key = _code_loading_key(cfg.model.text_encoder.config)
    if code_key:
        raise ConfigError(f"model.text_encoder.config.{code_key}: a key that makes Hugging Face load Python code "
                          "from a model folder is not accepted (configs and model folders are data); use a model "
                          "that transformers implements")
    if cfg.ckpt.keep_last < 1:
        raise ConfigError(f"ckpt.keep_last: must be >= 1, got {cfg.ckpt.keep_last}")
    if cfg.runner.collective_timeout <= 0:
        raise ConfigError(f"runner.collective_timeout: must be > 0 seconds, got {cfg.runner.collective_timeout}")
    if not cfg.data.exp_name or "/" in cfg.data.exp_name:
        raise ConfigError(f"data.exp_name: must be a non-empty folder name, got {cfg.data.exp_name!r}")


# Hugging Face config keys that make transformers import Python files shipped with a model (remote code)
CODE_LOADING_KEYS = frozenset({"trust_remote_code", "auto_map", "code_revision"})


def _code_loading_key(fields: Any, prefix: str = "") -> Optional[str]:
    """The dotted path of the first code-loading key in a (nested) Hugging Face config mapping, else None."""
    if not isinstance(fields, dict):
        return None
    for key, value in fields.items():
        if key in CODE_LOADING_KEYS:
            return f"{prefix}{key}"
        found = _code_loading_key(value, f"{prefix}{key}.")
        if found:
            return found
    return None


def _validate_part_lrs(optim: OptimConfig) -> None:
    for part in MODEL_PARTS:
        mult, absolute = getattr(optim.lr_mult, part), getattr(optim.lr_abs, part)
        if mult < 0:
            raise ConfigError(f"optim.lr_mult.{part}: must be >= 0, got {mult}")
        if absolute is None:
            continue
        if absolute < 0:
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
    raw = _apply_lavis_run_block(raw)
    raw = _apply_model_preset(raw)
    cfg = _build(Config, raw)
    _resolve_package_paths(cfg)
    if cfg.precision is None:
        cfg.precision = "fp16" if cfg.dist.fp16 else "fp32"
    _validate(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Load ``path`` (with ``_base_``), apply ``key.sub=value`` overrides, return the validated Config."""
    raw = load_yaml_with_bases(path) if path else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_path(raw, keys, value)
    return config_from_dict(raw)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m zvl_ds.config CFG.yaml [key.sub=value ...]\n"
              "Prints the fully resolved config as YAML (what a run would use).\n"
              "       python -m zvl_ds.config --reference | --lavis-mapping | --presets\n"
              "Prints the README's Markdown table of every config key / of LAVIS run: keys / of model.arch presets.")
        return 0 if argv else 2
    if argv[0] in README_TABLE_FLAGS:
        sys.stdout.write(README_TABLES[README_TABLE_FLAGS[argv[0]]]())
        return 0
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(cfg.to_yaml())
    return 0


# --------------------------------------------------------------------------------------------------
# Reference tables for the README (generated, so they cannot drift; tests/test_config_docs.py compares)
# --------------------------------------------------------------------------------------------------

MAPPING_ENTRY = "<name>"  # stands for the user's own keys of a mapping of sections: data.datasets.<name>.size


def config_keys(cls: type = Config, prefix: str = "") -> List[Tuple[str, Any]]:
    """(dotted key, default) of every key of ``cls``, in declaration order, sections depth-first. A mapping of
    sections (``data.datasets``) is listed itself, then its sections' keys under ``<name>``."""
    hints = typing.get_type_hints(cls)
    rows: List[Tuple[str, Any]] = []
    for item in dataclasses.fields(cls):
        key, tp = prefix + item.name, hints[item.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(config_keys(tp, key + "."))
            continue
        has_factory = item.default_factory is not dataclasses.MISSING  # type: ignore[misc]
        rows.append((key, item.default_factory() if has_factory else item.default))  # type: ignore[misc]
        if typing.get_origin(tp) in (dict, Dict) and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            rows.extend(config_keys(typing.get_args(tp)[1], f"{key}.{MAPPING_ENTRY}."))
    return rows


def _flow_yaml(value: Any) -> str:
    """A default as one YAML flow value: ``[0.9, 0.98]``, ``null``, ``{}``, ``''``."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10 ** 9).strip()
    return text[:-len("\n...")] if text.endswith("\n...") else text  # a lone scalar ends the document with ...


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """``| key | default | meaning |`` for every config key; meanings from ``zvl_ds.config_docs.KEY_HELP``."""
    from zvl_ds.config_docs import KEY_HELP

    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default in config_keys():
        lines.append(f"| `{key}` | `{_cell(_flow_yaml(default))}` | {_cell(KEY_HELP.get(key, '**undocumented**'))} |")
    return "\n".join(lines) + "\n"


def lavis_mapping_markdown() -> str:
    """``| run.<key> | zvl_ds key |`` for every LAVIS ``run:`` option that ``LAVIS_RUN_MAP`` accepts."""
    from zvl_ds.config_docs import LAVIS_NOTES

    lines = ["| `run.<key>` | zvl_ds key |", "| --- | --- |"]
    for key, (target, convert) in LAVIS_RUN_MAP.items():
        note = LAVIS_NOTES.get(key, "converted" if convert is not None else "")
        lines.append(f"| `run.{key}` | `{target}`{_cell(f' ({note})' if note else '')} |")
    return "\n".join(lines) + "\n"


def presets_markdown() -> str:
    """``| model.arch | model |`` for every preset in ``MODEL_PRESETS``."""
    from zvl_ds.config_docs import PRESET_HELP

    lines = ["| `model.arch` | model |", "| --- | --- |"]
    for name in MODEL_PRESETS:
        lines.append(f"| `{name}` | {_cell(PRESET_HELP.get(name, '**undocumented**'))} |")
    return "\n".join(lines) + "\n"


# README marker name (<!-- NAME:start --> / <!-- NAME:end -->) -> generator, and the CLI flag of each
README_TABLES = {"config-reference": reference_markdown, "lavis-mapping": lavis_mapping_markdown,
                 "presets": presets_markdown}
README_TABLE_FLAGS = {"--reference": "config-reference", "--lavis-mapping": "lavis-mapping", "--presets": "presets"}


if __name__ == "__main__":
    from zvl_ds.cli import run

    sys.exit(run(main))
