"""The config schema: one dataclass per section, holding the keys that act, and what each key means.

Key names follow ZeroVL (``zerovl/tasks/clip/config.py`` and its yaml files) so that ZeroVL configs load as
written. Defaults follow ZeroVL's code defaults; where we deviate, a comment says why. ``KEY_HELP`` gives the meaning
of every key for the generated reference (``python -m zvl_ds.config --reference``); a test checks that it covers
exactly the keys of ``Config``, so the README's table cannot drift from the code. Keys under a mapping of sections
are written with a ``<name>`` placeholder (``data.datasets.<name>.shards``).

ZeroVL keys that change nothing here are not in these classes but in ``zvl_ds.config.compat`` (accepted, checked,
reported). A few such keys stay, each marked "no effect" or "unused" in ``KEY_HELP``: ``data.test_splits``,
``dist.url`` and ``dist.distributed``, because LAVIS's ``run:`` options map onto them, and the ``model.*`` ones
(tower names, ``embedding_dim``, ``pool``, ``syncbn``, ...), because an exported model's config records the whole
``model`` section and must stay readable as written.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

import yaml

from zvl_ds.runtime.errors import UserError


class ConfigError(UserError, ValueError):
    """A config problem the user must fix; the message names the key path."""


@dataclass
class DatasetSource:
    """Explicit form of a dataset: where its shards are and, optionally, how many samples it has."""

    shards: str = ""  # brace pattern, glob, folder, text file listing shards, or URLs (http(s)://, pipe:)
    size: Optional[int] = None  # samples; read from sizes.json / *_stats.json when not given
    # a folder in the shard writer's layout (<split>-NNNNNN.tar): the run's splits pick its shards (LAVIS storage)
    folder: str = ""


@dataclass
class ZeroShotSetConfig:
    """A zero-shot classification set evaluated at the validation interval (logged as eval/<name>/top1, top5)."""

    path: str = ""  # a folder laid out by class (PATH/<class>/<image>) or a CSV of image,label rows
    classes: Optional[str] = None  # file of class names for the prompts, one per line; None = folder names/labels
    templates: Optional[str] = None  # file of prompt templates with {}, one per line; None = the built-in set


@dataclass
class DataConfig:
    exp_name: str = "your_exp_name"
    train_type: Literal["shuffle", "sequential", "debias"] = "shuffle"
    train_steps: int = -1  # ZeroVL's key; > 0 fixes the run length (runner.train_steps wins if both are set)
    train_name: List[str] = field(default_factory=lambda: ["sbu", "cc3m"])
    valid_name: List[str] = field(default_factory=lambda: ["f30k", "coco"])
    # ZeroVL reads CSVs under ./data/; zvl_ds streams shards, made by python -m zvl_ds.make_shards --out shards.
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
    """ZeroVL's word-piece caption augmentation, off by default.

    Each word piece of a training caption is selected with ``select_prob``; a selected piece becomes the mask token,
    a random vocabulary piece, or is deleted (``mask_prob``, ``random_prob``, ``delete_prob``; otherwise it is
    kept). It perturbs the text side cheaply, as random crops perturb the images (see docs/method.md)."""

    enable: bool = False
    select_prob: float = 0.2
    mask_prob: float = 0.5
    random_prob: float = 0.1
    delete_prob: float = 0.4
    max_pieces_per_word: int = 3


@dataclass
class CaptionTextConfig:
    """How captions are prepared before tokenisation (LAVIS's ``blip_caption`` text processor); off by default."""

    clean: bool = False  # lower-case, punctuation .!"()*#:;~ to spaces, whitespace runs collapsed
    max_words: Optional[int] = None  # keep the first this many words; None = all
    prompt: str = ""  # put in front of every (cleaned, shortened) caption


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
    caption_train: CaptionTextConfig = field(default_factory=CaptionTextConfig)  # training captions
    # validation captions, zero-shot prompts and an exported model's encode_text
    caption_eval: CaptionTextConfig = field(default_factory=CaptionTextConfig)


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
    arch: Optional[str] = None  # a preset from zvl_ds.model.presets.MODEL_PRESETS; explicit model.* keys override it
    model_type: Optional[str] = None  # a variant of the preset (zvl_ds.model.presets.MODEL_VARIANTS); None = its default
    # LAVIS's whole-model weights (zvl_ds.model.init_weights): loaded before DeepSpeed wraps the model, never on resume
    load_pretrained: bool = False
    pretrained: Optional[str] = None  # exported model folder, run folder, checkpoint folder or weights file
    load_finetuned: bool = False
    finetuned: Optional[str] = None  # the same kinds of source; wins over pretrained
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
    keep_last: int = 2
    auto_resume: bool = True
    overwrite: bool = False  # with auto_resume false: allow starting over in a folder that holds checkpoints
    trust_checkpoint: bool = False  # skip the weights-only check of the checkpoint files resume opens


@dataclass
class LogConfig:
    interval_train: int = 10
    tensorboard: bool = True
    num_image_samples: int = 8  # validation images shown with their top-3 captions in TensorBoard
    record_sample_keys: bool = False  # append each step's sample keys to RUN/sample_keys/rank_N.txt (audit)


@dataclass
class DistConfig:
    """ZeroVL's launcher section: ``fp16: true`` selects precision fp16. ``url`` and ``distributed`` have no effect
    (the launcher decides both); they stay here because LAVIS's ``run.dist_url`` / ``run.distributed`` map onto them."""

    fp16: bool = False
    url: str = "env://"
    distributed: bool = True


@dataclass
class Config:
    seed: int = 2021  # ZeroVL leaves it unset (non-reproducible); its debias and mixup generators use 2021
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None: fp16 if dist.fp16 (ZeroVL's flag) else fp32. bf16 is the better choice on recent GPUs.
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = None
    evaluate: bool = False
    resume_ckpt_path: Optional[str] = None
    epoch: int = 20
    data: DataConfig = field(default_factory=DataConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

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
        return to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def to_plain(value: Any) -> Any:
    """Tuples as lists, recursively: what YAML and JSON write."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


# What every key of Config means. Each text says what THIS code does with the key.
KEY_HELP: Dict[str, str] = {
    # ---------------------------------------------------------------- top level
    "seed": "Seed of everything random: the initial weights (same on every rank), the data plan, shuffle buffers, "
            "per-sample augmentation, the `debias` dataset draws, mixup draws and the per-step dropout seeds.",
    "device": "`auto`: CUDA when visible, else CPU; `cpu`; `cuda` (an error when no GPU is visible).",
    "precision": "Compute precision of the DeepSpeed engine: `fp32`, `bf16` or `fp16` (fills the DeepSpeed "
                 "config's `bf16`/`fp16` sections). `null`: `fp16` if `dist.fp16` is true, else `fp32`.",
    "evaluate": "Evaluate only: resume as for training (`resume_ckpt_path` / `ckpt.auto_resume`), or load "
                "`model.finetuned` when `model.load_finetuned` is true, run the validation sets once and exit. "
                "The training datasets must still resolve.",
    "resume_ckpt_path": "Checkpoint to resume from: a run folder holding a `latest` file, or one of its "
                        "`step_NNNNNNNN` folders. Wins over `ckpt.auto_resume`.",
    "epoch": "Run length in epochs (an epoch = the data plan's steps per epoch) unless `runner.train_steps` or "
             "`data.train_steps` is > 0.",
    # ---------------------------------------------------------------- data
    "data.exp_name": "Name of the run folder `ckpt.dir/exp_name` (checkpoints, config.yaml, TensorBoard, "
                     "eval_metrics.jsonl); a folder name without `/`.",
    "data.train_type": "How steps draw from the training datasets. `shuffle`: every batch is a random mix, each "
                       "dataset in proportion to its size; `sequential`: an epoch runs one dataset after the other; "
                       "`debias`: each step takes its whole batch from one dataset drawn with probability "
                       "proportional to its size (ZeroVL's debiased sampling).",
    "data.train_steps": "ZeroVL's run length: > 0 fixes the number of optimizer steps (`runner.train_steps` wins "
                        "when both are > 0).",
    "data.train_name": "Names of the training datasets (each found via `data.datasets.<name>` or "
                       "`data_path/<name>/`); no name twice.",
    "data.valid_name": "Names of the validation datasets evaluated during training and by python -m zvl_ds.eval_retrieval.",
    "data.data_path": "Root of the shard writer's layout `data_path/<name>/<split>-NNNNNN.tar`; relative paths in "
                      "`data.datasets.<name>.shards` are looked up here first, then in the working folder.",
    "data.datasets": "Explicit sources by dataset name (a mapping `name -> {shards, size}`); a dataset not listed "
                     "here is read from `data_path/<name>/`.",
    "data.datasets.<name>.shards": "Shard spec of dataset `<name>`: a brace pattern, glob, folder, text file "
                                   "listing shards, tar path or URL (`http(s)://`, `pipe:`); several joined by `::`. "
                                   "`pipe:CMD` runs CMD in a shell, so it is refused inside list files. "
                                   "Empty: use `data_path/<name>/<split>-*.tar`.",
    "data.datasets.<name>.size": "Total samples of dataset `<name>`; `null`: read from `sizes.json` or "
                                 "`*_stats.json` next to the shards. Training needs a size; when given it wins and "
                                 "is spread evenly over the shards unless the size files agree.",
    "data.datasets.<name>.folder": "A folder in the shard writer's layout (`<split>-NNNNNN.tar`, as python -m "
                                   "zvl_ds.make_shards writes `OUT/<name>/`) holding dataset `<name>`: the run's "
                                   "`train_splits` / `valid_splits` pick its shards, as under `data_path`. LAVIS's "
                                   "`datasets.<name>.build_info.images.storage` maps here. Not with `shards`.",
    "data.zeroshot": "Zero-shot classification sets by name, evaluated at the validation interval with "
                     "the validation transforms; logged as `eval/<name>/top1` and `top5`, every image counted once "
                     "over the ranks.",
    "data.zeroshot.<name>.path": "A folder laid out by class (`PATH/<class>/<image>`, class c = the c-th sorted "
                                 "sub-folder) or a `.csv` of `image,label` rows (paths relative to the CSV).",
    "data.zeroshot.<name>.classes": "File of the class names the prompts use, one per line in class order; "
                                    "`null`: the folder names or labels with `_` as a space.",
    "data.zeroshot.<name>.templates": "File of prompt templates, one per line, `{}` for the class name; `null`: "
                                      "ten built-in photo prompts.",
    "data.train_splits": "Split prefixes read for training datasets found under `data_path/<name>/` "
                         "(`<split>-*.tar`); ignored for datasets with an explicit `shards` spec.",
    "data.valid_splits": "Split prefixes read for validation datasets found under `data_path/<name>/`; ignored for "
                         "datasets with an explicit `shards` spec.",
    "data.test_splits": "Accepted for LAVIS configs (`run.test_splits`); unused.",
    "data.batch_size": "GLOBAL contrastive batch per optimizer step, summed over all ranks (as in ZeroVL); must be "
                       "divisible by the world size. Each rank loads `batch_size / world_size` samples a step.",
    "data.batch_size_train": "GLOBAL chunk of the `clip_bsgs` runner (samples per forward, summed over ranks); must "
                             "divide `data.batch_size` and be divisible by the world size. `null`: `batch_size` (one "
                             "chunk). The `clip` runner ignores it.",
    "data.batch_size_val": "GLOBAL evaluation batch, summed over ranks; must be divisible by the world size.",
    "data.num_workers": "DataLoader worker processes per rank (0: load in the main process). Also the number of "
                        "loader roles (`max(1, n)`) of the data plan, so it changes the sample order and a saved "
                        "loader position cannot be resumed with another value.",
    "data.shuffle_buffer": "Samples in the seeded shuffle buffer each loader role passes its stretch of shards "
                           "through (larger: better mixing, more memory). Part of the resumable data plan.",
    "data.enable_valid": "Evaluate the `data.valid_name` sets during training (see `runner.val_interval*`); false "
                         "turns evaluation during training off.",
    "data.max_bad_sample_warnings": "Warnings printed per reason for skipped bad samples before they go quiet; every "
                                    "skip is still counted (TensorBoard `data/skipped_<reason>`).",
    "data.loader_timeout": "Seconds a loader worker may take for one batch before the run fails instead of hanging "
                           "(applies when `num_workers` > 0).",
    # ---------------------------------------------------------------- transforms
    "transforms.train_transforms": "Image transforms for training, in order, from `random_resize_crop`, `autoaug` "
                                   "(torchvision AutoAugment, ImageNet policy), `resize` (square, ignores the aspect "
                                   "ratio), `center_crop`, `normalize` (accepted; normalisation always runs on the "
                                   "device). The last crop/resize sets the image size.",
    "transforms.valid_transforms": "Image transforms for validation and exported models; same names as "
                                   "`train_transforms` (`random_resize_crop`, `autoaug`, `resize`, `center_crop`, "
                                   "`normalize`).",
    "transforms.input_size": "Image side of synthetic inputs (python -m zvl_ds.bench, python -m zvl_ds.verify_exactness "
                             "--synthetic), recorded in exported models. The loaders take their size from the "
                             "crop/resize sizes instead.",
    "transforms.resize.size": "Side of the square `resize` transform, in pixels.",
    "transforms.center_crop.size": "Side of the `center_crop` transform, in pixels (zero-padded when the image is "
                                   "smaller).",
    "transforms.random_resize_crop.size": "Output side of `random_resize_crop`, in pixels.",
    "transforms.random_resize_crop.scale": "`[low, high]` fraction of the image area the random crop covers "
                                           "(aspect ratio drawn from [3/4, 4/3]).",
    "transforms.normalize.mean": "Per-channel mean subtracted from images scaled to [0, 1] (on the device, in "
                                 "training, evaluation and exported models).",
    "transforms.normalize.std": "Per-channel standard deviation images are divided by after the mean.",
    "transforms.caption_aug.enable": "ZeroVL's word-piece caption augmentation for training captions.",
    "transforms.caption_aug.select_prob": "Probability that a word piece is selected for augmentation.",
    "transforms.caption_aug.mask_prob": "A selected piece becomes the tokenizer's mask token with this probability.",
    "transforms.caption_aug.random_prob": "A selected piece becomes a random vocabulary piece with this probability.",
    "transforms.caption_aug.delete_prob": "A selected piece is deleted with this probability (the three "
                                          "probabilities sum to at most 1; the rest keeps the piece).",
    "transforms.caption_aug.max_pieces_per_word": "Word-piece continuations beyond this many pieces of one word are "
                                                  "dropped when the caption is rebuilt.",
    "transforms.caption_train.clean": "Clean training captions as LAVIS's `blip_caption` does: lower-case, the "
                                      "characters `.!\"()*#:;~` become spaces, whitespace runs become one space, "
                                      "ends stripped.",
    "transforms.caption_train.max_words": "Keep the first this many (space-separated) words of a training caption; "
                                          "`null`: all.",
    "transforms.caption_train.prompt": "Text put in front of every training caption, after cleaning and "
                                       "shortening, before `caption_aug` (LAVIS's `prompt`, e.g. `'a picture of '`).",
    "transforms.caption_eval.clean": "The same cleaning for the text evaluation reads: validation captions, "
                                     "zero-shot prompts and an exported model's `tokenize` / `encode_text` (recorded "
                                     "in its `preprocess.json`).",
    "transforms.caption_eval.max_words": "Keep the first this many words of evaluation text; `null`: all.",
    "transforms.caption_eval.prompt": "Text put in front of every evaluation caption and zero-shot prompt, after "
                                      "cleaning and shortening.",
    # ---------------------------------------------------------------- model
    "model.name": "Only `clip` is accepted (the dual encoder); no effect.",
    "model.arch": "A preset from the model presets table; its values fill `model.*`, and keys given explicitly in "
                  "`model:` override them. `null`: no preset.",
    "model.model_type": "A variant of the `model.arch` preset (presets table), overlaid on the preset before the "
                        "explicit `model.*` keys (LAVIS's `model_type`). `null`: the preset's default variant, which "
                        "the resolved config then names. Without `model.arch` it is an error.",
    "model.load_pretrained": "`true`: initialise the whole dual encoder (towers, projections, learnable temperature "
                             "or SigLIP scale and bias) from `model.pretrained` before training (LAVIS's "
                             "`load_pretrained`). Skipped when the run resumes: a resumed run restores its own "
                             "checkpoint.",
    "model.pretrained": "Where `load_pretrained` takes the weights from: an exported model folder "
                        "(`model.safetensors`), a run folder (its `latest` checkpoint) or one of its `step_NNNNNNNN` "
                        "folders (consolidated from any ZeRO stage, weights-only check as `ckpt.trust_checkpoint`), "
                        "or a `.safetensors` (or weights-only torch) file; `pkg:` paths work. URLs are refused "
                        "(nothing is downloaded). The architecture is this config's: a tensor of another shape is "
                        "an error naming it, missing and unexpected tensors are allowed and reported. No effect "
                        "while `load_pretrained` is false.",
    "model.load_finetuned": "`true`: load `model.finetuned` (LAVIS's `load_finetuned`). With `evaluate: true` these "
                            "are the weights evaluated (the run folder's checkpoints are not resumed; "
                            "`resume_ckpt_path` with it is an error); in training they are the initialisation, "
                            "winning over `load_pretrained`, and as for it skipped on resume.",
    "model.finetuned": "Where `load_finetuned` takes the weights from; the same sources and checks as "
                       "`model.pretrained`. No effect while `load_finetuned` is false.",
    "model.max_length": "Tokens per caption: captions are padded and truncated to this length.",
    "model.image_encoder.name": "Only `timm_modelzoo` is accepted (the image tower is a timm model); no effect.",
    "model.image_encoder.tag": "timm model name, built with `num_classes=0` (pooled features, no classifier).",
    "model.image_encoder.embedding_dim": "Informational; the tower's real feature width is read from the model.",
    "model.image_encoder.pretrained": "`true`: timm's default weights, only if already in the local cache (nothing "
                                      "is downloaded); `false`: random initialisation; a path: a local weights file "
                                      "(safetensors or a weights-only torch file).",
    "model.image_encoder.trainable": "`false` freezes the image tower: no gradients, kept in eval mode "
                                     "(LiT-style).",
    "model.image_encoder.img_size": "`img_size` passed to timm (a ViT's position-embedding grid; pretrained ones "
                                    "are resampled); must match the transforms' output size. `null`: the model's "
                                    "default.",
    "model.image_encoder.grad_checkpointing": "Activation checkpointing in the timm tower (an error if the model "
                                              "does not support it): less memory, more compute.",
    "model.image_encoder.kwargs": "Extra `timm.create_model` arguments, e.g. `{depth: 2, embed_dim: 64}`.",
    "model.image_encoder.vit.only_cls_token": "For a tower that returns a token sequence (timm `global_pool: ''`): "
                                              "`true` takes token 0, `false` the mean of the tokens. Towers that "
                                              "pool themselves are not affected.",
    "model.text_encoder.name": "Only `huggingface_modelzoo` is accepted (a transformers `AutoModel`); no effect.",
    "model.text_encoder.tag": "Hugging Face model name already in the local cache, or a local folder; also the "
                              "tokenizer when `tokenizer` is null. Nothing is downloaded.",
    "model.text_encoder.embedding_dim": "Informational; the tower's real hidden width is read from the model.",
    "model.text_encoder.pretrained": "`true`: load the weights of `tag`; a string: load this local folder (or "
                                     "cached name) instead; `false`: random weights built from `config` (or the "
                                     "tag's cached config).",
    "model.text_encoder.trainable": "`false` freezes the text tower: no gradients, kept in eval mode.",
    "model.text_encoder.target_token_idx": "Position of the token whose last hidden state is the text feature when "
                                           "`pooling` is `cls`.",
    "model.text_encoder.only_cls_token": "Accepted for ZeroVL configs; unused (see `pooling` and "
                                         "`target_token_idx`).",
    "model.text_encoder.pooling": "Text feature: `cls` = the hidden state at `target_token_idx`; `mean` = the "
                                  "attention-masked mean of the last hidden states.",
    "model.text_encoder.grad_checkpointing": "Activation checkpointing in the text tower (non-reentrant, replays "
                                             "dropout exactly); an error if the model does not support it.",
    "model.text_encoder.tokenizer": "Tokenizer folder or cached name; `zvl_ds:demo_tokenizer` = the packaged demo "
                                    "vocabulary; `null`: the folder `pretrained` names, else `tag`.",
    "model.text_encoder.config": "Hugging Face config fields. With `model_type` (and `pretrained: false`) the "
                                 "tower is built from them alone; otherwise they override the loaded config.",
    "model.projection.name": "`simple`: one bias-free Linear per tower (ZeroVL); `mlp`: Linear, GELU, bias-free "
                             "Linear.",
    "model.projection.dim": "Width of the shared embedding space both projections map to.",
    "model.projection.image_projector_trainable": "`false` freezes the image projection.",
    "model.projection.text_projector_trainable": "`false` freezes the text projection.",
    "model.pool.name": "Only `identity` is accepted (ZeroVL's pooling option); no effect.",
    "model.syncbn": "Accepted for ZeroVL configs; unused (the towers have no BatchNorm to convert).",
    "model.interpolate_pos_embed": "Accepted for ZeroVL configs; unused (timm resamples position embeddings itself "
                                   "when a weights file's grid differs from `img_size`).",
    "model.compile": "`torch.compile` each tower with this mode (`default`, `reduce-overhead`, `max-autotune`); "
                     "`none`: eager. Faster steps after a compile on the first ones; needs a C++ compiler on CPU.",
    "model.attention": "`sdpa`: both towers use fused `scaled_dot_product_attention` (flash/memory-efficient "
                       "kernels on GPUs); `eager`: the plain matmul-softmax attention (a reference for debugging).",
    # ---------------------------------------------------------------- loss
    "loss.name": "`NCE`: symmetric InfoNCE over the global batch; `MixUpNCE`: ZeroVL's coin-flip mixup (each step "
                 "mixes either images or texts with a partner, soft targets); `SigLIP`: the pairwise sigmoid loss "
                 "(see Choosing a loss).",
    "loss.group_size": "Accepted for ZeroVL configs; only -1 (gather over the whole world) is implemented, another "
                       "value is an error.",
    "loss.smoothing": "Accepted for ZeroVL configs; only 0.0 is implemented (no label smoothing), another value is "
                      "an error.",
    "loss.nce_loss.gather_backward": "`clip` runner only. `true`: gradients flow back through the gathered "
                                     "embeddings (the exact full-batch gradient); `false`: ZeroVL's plain gather "
                                     "(gathered embeddings are constants). `clip_bsgs` is always exact.",
    "loss.temperature.name": "`constant`: a fixed tau; `parameter`: a learnable tau (the model parameter "
                             "`tau`, saved with the weights).",
    "loss.temperature.value": "tau (fixed, or the learnable one's initial value); the logits are DIVIDED by it.",
    "loss.temperature.min": "Lower clamp of tau at every use (need 0 < min <= value <= max).",
    "loss.temperature.max": "Upper clamp of tau at every use.",
    "loss.mixup.beta": "`MixUpNCE` only: lambda ~ Beta(beta, beta), drawn once per step from `(seed, step)`; must "
                       "be > 0.",
    "loss.chunk_rows": "Rows of the logits matrix computed at once (memory knob); the result is exact whatever "
                       "the value.",
    "loss.chunk_cols": "Columns of a logits tile: > 0 holds chunk_rows x chunk_cols logits whatever the batch "
                       "(online log-sum-exp; with gather-backward both softmax directions come from the same "
                       "tiles, 4 matmuls per tile instead of 6 for two row passes); 0: whole rows (chunk_rows x B).",
    "loss.sigmoid.scale_init": "`SigLIP` only: initial scale t multiplying the similarities (learned as log t, "
                               "parameter `logit_scale_log`); must be > 0.",
    "loss.sigmoid.bias_init": "`SigLIP` only: initial bias b added to every logit (parameter `logit_bias`).",
    # ---------------------------------------------------------------- optim
    "optim.name": "`torch.optim.AdamW` or `AdamW`: AdamW; `torch.optim.SGD` or `SGD`: SGD.",
    "optim.param.betas": "AdamW betas `[beta1, beta2]`.",
    "optim.param.eps": "AdamW epsilon.",
    "optim.param.weight_decay": "Weight decay of the decay group (all parameters when `decay_all`).",
    "optim.param.momentum": "SGD momentum (SGD only).",
    "optim.lr.name": "`cosine_schedule_with_warmup_min_lr_scale` (ZeroVL): linear ramp from 0, then cosine down "
                     "to `init * min_lr_scale`; `linear_warmup_cosine_lr` (LAVIS): ramp from `warmup_lr`, cosine "
                     "to `min_lr`; `linear_warmup_step_lr` (LAVIS): ramp, then `init * lr_decay_rate ** epoch` "
                     "floored at `min_lr`; `constant` (or LAVIS's `constant_lr`): `init`. Evaluated per optimizer step.",
    "optim.lr.init": "Peak learning rate (after warm-up).",
    "optim.lr.warmup_proportion": "Warm-up length as a fraction of the run's optimizer steps (unless "
                                  "`warmup_steps` is set).",
    "optim.lr.warmup_steps": "Warm-up length in optimizer steps; wins over `warmup_proportion`. `null`: use the "
                             "proportion.",
    "optim.lr.min_lr": "Final / floor learning rate of the LAVIS schedules.",
    "optim.lr.warmup_lr": "Learning rate at step 0 of the LAVIS schedules' warm-up.",
    "optim.lr.lr_decay_rate": "`linear_warmup_step_lr`: factor applied once per epoch.",
    "optim.lr.param.num_cycles": "Cosine cycles of the ZeroVL schedule after warm-up (0.5: one half cosine, "
                                 "monotone decay).",
    "optim.lr.param.min_lr_scale": "ZeroVL schedule: the final learning rate is `init * min_lr_scale`.",
    "optim.lr_mult.image_tower": "Image tower's learning rate as a multiple of the schedule's (every schedule, "
                                 "every step); 0 freezes it in effect but keeps it in the optimizer.",
    "optim.lr_mult.text_tower": "Text tower's learning-rate multiple of the schedule's.",
    "optim.lr_mult.projection": "Both projections' learning-rate multiple of the schedule's.",
    "optim.lr_mult.temperature": "The learnable temperature's learning-rate multiple of the schedule's.",
    "optim.lr_abs.image_tower": "Image tower's peak learning rate, absolute (multiplier = value / `optim.lr.init`); "
                                "`null`: use `lr_mult`.",
    "optim.lr_abs.text_tower": "Text tower's peak learning rate, absolute; `null`: use `lr_mult`.",
    "optim.lr_abs.projection": "Projections' peak learning rate, absolute; `null`: use `lr_mult`.",
    "optim.lr_abs.temperature": "Temperature's peak learning rate, absolute; `null`: use `lr_mult`.",
    "optim.layer_decay.image_tower": "Layer-wise LR decay of a ViT image tower (EVA-CLIP): with L blocks, block i "
                                     "(0-based) gets `decay ** (L - i)`, patch/position embeddings and tokens "
                                     "`decay ** (L + 1)`, the final norm 1; 1.0 = off.",
    "optim.layer_decay.text_tower": "The same for a BERT-like text tower (`encoder.layer.N`; the embeddings are "
                                    "layer 0); 1.0 = off.",
    "optim.decay_all": "`true`: decay every parameter (ZeroVL); `false`: biases, norm gains and other 1-d tensors, "
                       "the temperature, position embeddings and class/mask tokens get no weight decay.",
    "optim.grad_clip": "Maximum global gradient norm (DeepSpeed `gradient_clipping`); 0 = off.",
    "optim.implementation": "Kernel of the torch optimizer: `plain` (a loop over tensors), `foreach` (batched "
                            "over tensors), `fused` (one kernel; CUDA, or CPU where torch supports it); `auto`: "
                            "`fused` on CUDA, `plain` on CPU. Same update up to floating-point rounding.",
    # ---------------------------------------------------------------- runner
    "runner.name": "`clip`: one forward and backward per rank over its share of the batch; `clip_bsgs`: ZeroVL's "
                   "decoupled gradient accumulation: embed in chunks of `data.batch_size_train`, one loss over the "
                   "whole batch, recompute each chunk with its cached gradient (same gradient, one chunk's memory).",
    "runner.val_interval": "Evaluate every this many epochs (and after the last step) when `val_interval_steps` "
                           "is not > 0.",
    "runner.val_interval_steps": "> 0: evaluate every this many optimizer steps (and after the last step) instead "
                                 "of by epochs.",
    "runner.stable_random": "`step`: reseed torch's RNG at every step from `(seed, step, rank)`, so dropout is "
                            "the same after a resume and independent across ranks; `none`: do not reseed.",
    "runner.train_steps": "> 0 fixes the number of optimizer steps (wins over `data.train_steps` and `epoch`).",
    "runner.offload_inputs": "On CUDA: keep the step's images in pinned host memory and move them one chunk at a "
                             "time (saves device memory for large `clip_bsgs` batches). No effect on CPU.",
    "runner.max_skipped_steps": "Consecutive skipped steps (non-finite loss, fp16 overflow) after which the run "
                                "stops with an error naming the last good checkpoint.",
    "runner.collective_timeout": "Seconds a rank may wait in one collective (all-reduce, barrier, broadcast) "
                                 "before the job fails, e.g. when another rank hangs. A rank that raises ends "
                                 "the job at once regardless; raise this only for collectives that legitimately "
                                 "wait long (a universal checkpoint conversion of a large model on rank 0).",
    "runner.world_size": "LAVIS `run.world_size`: > 0 must equal the number of ranks the launcher started; "
                         "-1: not checked.",
    "runner.task": "What the run trains for: `retrieval` (LAVIS `run.task`); any other value is refused.",
    # ---------------------------------------------------------------- ckpt
    "ckpt.dir": "Output root; the run folder is `ckpt.dir/data.exp_name`.",
    "ckpt.step_interval": "Save a checkpoint every this many optimizer steps (and after the last step).",
    "ckpt.keep_last": "Checkpoints kept in the run folder; older ones are deleted (never the one `latest` names).",
    "ckpt.auto_resume": "Resume from the run folder's `latest` checkpoint when there is one.",
    "ckpt.overwrite": "With `ckpt.auto_resume: false` (and no `resume_ckpt_path`): start from scratch in a run "
                      "folder that already holds checkpoints (replacing them as new ones are saved). Without it "
                      "such a run is refused (exit 2), so old checkpoints are not lost by mistake.",
    "ckpt.trust_checkpoint": "Open the resumed checkpoint's files without first checking that they hold only "
                             "weights (tensors, plain values): set it only for checkpoints you wrote yourself, "
                             "since DeepSpeed's loader unpickles them and a crafted file runs code.",
    # ---------------------------------------------------------------- log
    "log.interval_train": "Print a console line every this many steps (TensorBoard gets every step).",
    "log.tensorboard": "Write TensorBoard events to `RUN/tensorboard` (rank 0).",
    "log.num_image_samples": "Validation images shown in TensorBoard with their top-3 retrieved captions at each "
                             "evaluation (0: none).",
    "log.record_sample_keys": "Append each step's sample keys to `RUN/sample_keys/rank_N.txt` (data audit).",
    # ---------------------------------------------------------------- dist
    "dist.fp16": "ZeroVL's mixed-precision flag: when `precision` is null, `true` selects `fp16`, `false` `fp32`.",
    "dist.url": "Accepted for ZeroVL and LAVIS (`run.dist_url`) configs; unused (rendezvous comes from the "
                "launcher's environment).",
    "dist.distributed": "Accepted for ZeroVL and LAVIS (`run.distributed`) configs; unused (the launcher decides).",
}
