"""The config schema: one dataclass per section, holding the keys that act, and what each key means.

Key names follow ZeroVL (``zerovl/tasks/clip/config.py`` and its yaml files) so that ZeroVL configs load as
written. Defaults follow ZeroVL's code defaults; where we deviate, a comment says why. Each key's meaning is
the docstring under its field: the generated reference (``python -m zvl_ds.config --reference``,
docs/configuration.md) reads them, and a test checks that every key has one, so the documentation cannot drift
from the code. Keys under a mapping of sections are written with a ``<name>`` placeholder
(``data.datasets.<name>.shards``).

ZeroVL keys that change nothing here are not in these classes but in ``zvl_ds.config.compat`` (accepted, checked,
reported). A few such keys stay, each marked "no effect" or "unused" in its docstring: ``data.test_splits``,
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

from zvl_ds.base.errors import ConfigError  # noqa: F401  (zvl_ds.config.ConfigError: the sections raise it)


@dataclass
class DatasetSource:
    """Explicit form of a dataset: where its shards are and, optionally, how many samples it has."""

    shards: str = ""
    """Shard spec of dataset `<name>`: a brace pattern, glob, folder, text file listing shards, tar path or URL
    (`http(s)://`, `pipe:`); several joined by `::`. `pipe:CMD` runs CMD in a shell, so it is refused inside list
    files. Empty: use `data_path/<name>/<split>-*.tar`.
    """
    size: Optional[int] = None
    """Total samples of dataset `<name>`; `null`: read from `sizes.json` or `*_stats.json` next to the shards. Training
    needs a size; when given it wins and is spread evenly over the shards unless the size files agree.
    """
    # a folder in the shard writer's layout (<split>-NNNNNN.tar): the run's splits pick its shards (LAVIS storage)
    folder: str = ""
    """A folder in the shard writer's layout (`<split>-NNNNNN.tar`, as python -m zvl_ds.make_shards writes
    `OUT/<name>/`) holding dataset `<name>`: the run's `train_splits` / `valid_splits` pick its shards, as under
    `data_path`. LAVIS's `datasets.<name>.build_info.images.storage` maps here. Not with `shards`.
    """


@dataclass
class ZeroShotSetConfig:
    """A zero-shot classification set evaluated at the validation interval (logged as eval/<name>/top1, top5)."""

    path: str = ""
    """A folder laid out by class (`PATH/<class>/<image>`, class c = the c-th sorted sub-folder), a `.csv` of
    `image,label` rows (paths relative to the CSV), or a clip_benchmark classification folder (`make_shards
    --clip-benchmark`: `test/*.tar`, `classnames.txt`, `zeroshot_classification_templates.txt`).
    """
    classes: Optional[str] = None
    """File of the class names the prompts use, one per line in class order; `null`: the folder names or labels with
    `_` as a space (a clip_benchmark folder: its `classnames.txt`).
    """
    templates: Optional[str] = None
    """File of prompt templates, one per line, `{}` for the class name; `null`: ten built-in photo prompts (a
    clip_benchmark folder: its own templates).
    """


@dataclass
class DataConfig:
    exp_name: str = "your_exp_name"
    """Name of the run folder `ckpt.dir/exp_name` (checkpoints, config.yaml, TensorBoard, eval_metrics.jsonl); a folder
    name without `/`.
    """
    train_type: Literal["shuffle", "sequential", "debias"] = "shuffle"
    """How steps draw from the training datasets. `shuffle`: every batch is a random mix, each dataset in proportion to
    its size; `sequential`: an epoch runs one dataset after the other; `debias`: each step takes its whole batch
    from one dataset drawn with probability proportional to its size (ZeroVL's debiased sampling).
    """
    train_steps: int = -1
    """ZeroVL's run length: > 0 fixes the number of optimizer steps (`runner.train_steps` wins when both are > 0)."""
    train_name: List[str] = field(default_factory=lambda: ["sbu", "cc3m"])
    """Names of the training datasets (each found via `data.datasets.<name>` or `data_path/<name>/`); no name twice."""
    valid_name: List[str] = field(default_factory=lambda: ["f30k", "coco"])
    """Names of the validation datasets evaluated during training and by python -m zvl_ds.eval_retrieval."""
    # ZeroVL reads CSVs under ./data/; zvl_ds streams shards, made by python -m zvl_ds.make_shards --out shards.
    data_path: str = "./shards/"
    """Root of the shard writer's layout `data_path/<name>/<split>-NNNNNN.tar`; relative paths in
    `data.datasets.<name>.shards` are looked up here first, then in the working folder.
    """
    datasets: Dict[str, DatasetSource] = field(default_factory=dict)
    """Explicit sources by dataset name (a mapping `name -> {shards, size}`); a dataset not listed here is read from
    `data_path/<name>/`.
    """
    zeroshot: Dict[str, ZeroShotSetConfig] = field(default_factory=dict)
    """Zero-shot classification sets by name, evaluated at the validation interval with the validation transforms;
    logged as `eval/<name>/top1` and `top5`, every image counted once over the ranks.
    """
    train_splits: List[str] = field(default_factory=lambda: ["train"])
    """Split prefixes read for training datasets found under `data_path/<name>/` (`<split>-*.tar`); ignored for
    datasets with an explicit `shards` spec.
    """
    valid_splits: List[str] = field(default_factory=lambda: ["valid"])
    """Split prefixes read for validation datasets found under `data_path/<name>/`; ignored for datasets with an
    explicit `shards` spec.
    """
    test_splits: List[str] = field(default_factory=list)
    """Accepted for LAVIS configs (`run.test_splits`); unused."""
    batch_size: int = 1024
    """GLOBAL contrastive batch per optimizer step, summed over all ranks (as in ZeroVL); must be divisible by the
    world size. Each rank loads `batch_size / world_size` samples a step.
    """
    batch_size_train: Optional[int] = None
    """GLOBAL chunk of the `clip_bsgs` runner (samples per forward, summed over ranks); must divide `data.batch_size`
    and be divisible by the world size. `null`: `batch_size` (one chunk). The `clip` runner ignores it.
    """
    batch_size_val: int = 1024
    """GLOBAL evaluation batch, summed over ranks; must be divisible by the world size."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the main process). Also the number of loader roles (`max(1,
    n)`) of the data plan, so it changes the sample order and a saved loader position cannot be resumed with another
    value.
    """
    shuffle_buffer: int = 1000
    """Samples in the seeded shuffle buffer each loader role passes its stretch of shards through (larger: better
    mixing, more memory). Part of the resumable data plan.
    """
    enable_valid: bool = True
    """Evaluate the `data.valid_name` sets during training (see `runner.val_interval*`); false turns evaluation during
    training off.
    """
    max_bad_sample_warnings: int = 20
    """Warnings printed per reason for skipped bad samples before they go quiet; every skip is still counted
    (TensorBoard `data/skipped_<reason>`).
    """
    loader_timeout: float = 600.0
    """Seconds a loader worker may take for one batch before the run fails instead of hanging (applies when
    `num_workers` > 0).
    """
    max_skip_fraction: float = 0.01
    """Largest fraction of the training samples read within `data.skip_window` that may be skipped for any one
    reason (unreadable or missing shard, corrupt image, missing caption ...; summed over ranks, checked every
    `log.interval_train` steps). Above it every rank stops with exit code 2, naming the datasets, shards and reason,
    after saving a checkpoint of the last good step. `1.0` never stops.
    """
    skip_window: int = 100000
    """Samples read (good and skipped, all ranks) over which `data.max_skip_fraction` is measured; until that many
    were read, `max_skip_fraction * skip_window` skips of one reason are allowed.
    """


@dataclass
class ResizeConfig:
    size: int = 256
    """Side of the square `resize` transform, in pixels."""


@dataclass
class CenterCropConfig:
    size: int = 224
    """Side of the `center_crop` transform, in pixels (zero-padded when the image is smaller)."""


@dataclass
class RandomResizeCropConfig:
    size: int = 224
    """Output side of `random_resize_crop`, in pixels."""
    scale: List[float] = field(default_factory=lambda: [0.6, 1.0])
    """`[low, high]` fraction of the image area the random crop covers (aspect ratio drawn from [3/4, 4/3])."""


@dataclass
class NormalizeConfig:
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel mean subtracted from images scaled to [0, 1] (on the device, in training, evaluation and exported
    models).
    """
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel standard deviation images are divided by after the mean."""


@dataclass
class CaptionAugConfig:
    """ZeroVL's word-piece caption augmentation, off by default.

    Each word piece of a training caption is selected with ``select_prob``; a selected piece becomes the mask token,
    a random vocabulary piece, or is deleted (``mask_prob``, ``random_prob``, ``delete_prob``; otherwise it is
    kept). It perturbs the text side cheaply, as random crops perturb the images (see docs/method.md)."""

    enable: bool = False
    """ZeroVL's word-piece caption augmentation for training captions."""
    select_prob: float = 0.2
    """Probability that a word piece is selected for augmentation."""
    mask_prob: float = 0.5
    """A selected piece becomes the tokenizer's mask token with this probability."""
    random_prob: float = 0.1
    """A selected piece becomes a random vocabulary piece with this probability."""
    delete_prob: float = 0.4
    """A selected piece is deleted with this probability (the three probabilities sum to at most 1; the rest keeps the
    piece).
    """
    max_pieces_per_word: int = 3
    """Word-piece continuations beyond this many pieces of one word are dropped when the caption is rebuilt."""


@dataclass
class CaptionTextConfig:
    """How captions are prepared before tokenisation (LAVIS's ``blip_caption`` text processor); off by default."""

    clean: bool = False
    """Clean captions as LAVIS's `blip_caption` does: lower-case, the characters `.!\"()*#:;~` become spaces,
    whitespace runs become one space, ends stripped. `caption_train` cleans the training captions; `caption_eval`
    the text evaluation reads: validation captions, zero-shot prompts and an exported model's `tokenize` /
    `encode_text` (recorded in its `preprocess.json`).
    """
    max_words: Optional[int] = None
    """Keep the first this many (space-separated) words of a caption; `null`: all."""
    prompt: str = ""
    """Text put in front of every caption after cleaning and shortening: in `caption_train` before `caption_aug`
    (LAVIS's `prompt`, e.g. `'a picture of '`); in `caption_eval` also in front of every zero-shot prompt.
    """


TRANSFORM_NAMES = ("random_resize_crop", "autoaug", "resize", "center_crop", "normalize")


@dataclass
class TransformsConfig:
    train_transforms: List[Literal[TRANSFORM_NAMES]] = field(
        default_factory=lambda: ["random_resize_crop", "autoaug"])
    """Image transforms for training, in order, from `random_resize_crop`, `autoaug` (torchvision AutoAugment, ImageNet
    policy), `resize` (square, ignores the aspect ratio), `center_crop`, `normalize` (accepted; normalisation always
    runs on the device). The last crop/resize sets the image size.
    """
    valid_transforms: List[Literal[TRANSFORM_NAMES]] = field(default_factory=lambda: ["resize", "center_crop"])
    """Image transforms for validation and exported models; same names as `train_transforms` (`random_resize_crop`,
    `autoaug`, `resize`, `center_crop`, `normalize`).
    """
    input_size: int = 224
    """Image side of synthetic inputs (python -m zvl_ds.bench, python -m zvl_ds.verify_exactness --synthetic), recorded
    in exported models. The loaders take their size from the crop/resize sizes instead.
    """
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
    """For a tower that returns a token sequence (timm `global_pool: ''`): `true` takes token 0, `false` the mean of
    the tokens. Towers that pool themselves are not affected.
    """


@dataclass
class ImageEncoderConfig:
    name: Literal["timm_modelzoo"] = "timm_modelzoo"
    """Only `timm_modelzoo` is accepted (the image tower is a timm model); no effect."""
    tag: str = "vit_base_patch16_224_in21k"
    """timm model name, built with `num_classes=0` (pooled features, no classifier)."""
    embedding_dim: Optional[int] = 768
    """Informational; the tower's real feature width is read from the model."""
    # false, true (only weights already in the local cache; nothing is downloaded) or a local weights file
    pretrained: Union[bool, str] = True
    """`true`: timm's default weights, only if already in the local cache (nothing is downloaded); `false`: random
    initialisation; a path: a local weights file (safetensors or a weights-only torch file).
    """
    trainable: bool = True
    """`false` freezes the image tower: no gradients, kept in eval mode (LiT-style)."""
    img_size: Optional[int] = None
    """`img_size` passed to timm (a ViT's position-embedding grid; pretrained ones are resampled); must match the
    transforms' output size. `null`: the model's default.
    """
    grad_checkpointing: bool = False
    """Activation checkpointing in the timm tower (an error if the model does not support it): less memory, more
    compute.
    """
    kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra `timm.create_model` arguments, e.g. `{depth: 2, embed_dim: 64}`."""
    vit: VitOptions = field(default_factory=VitOptions)
    unlocked_groups: Optional[int] = None
    """Partial locking (OpenCLIP's `--lock-image --lock-image-unlocked-groups N`): freeze the tower except its last N
    groups of blocks, in timm's grouping (a ViT: the stem, then each block, the final norm joining the last). Frozen
    parameters get no gradient and are not in the optimizer; `0` freezes every group. More than the tower has is an
    error naming the count. `null`: no partial locking (`trainable` decides).
    """
    freeze_bn_stats: bool = False
    """With `unlocked_groups`: BatchNorm layers in the frozen groups keep their running statistics (eval mode), as
    OpenCLIP's `--lock-image-freeze-bn-stats`.
    """
    patch_dropout: float = 0.0
    """Patch dropout (FLIP; OpenCLIP's `--force-patch-dropout`): in training only, each image keeps a random
    `1 - share` of its patch tokens (the class token always stays); a share in [0, 1), 0 = off. Needs a timm ViT tower.
    Exact under `clip_bsgs`: DGA's recomputation drops the same patches as its first pass.
    """


@dataclass
class TextEncoderConfig:
    name: Literal["huggingface_modelzoo"] = "huggingface_modelzoo"
    """Only `huggingface_modelzoo` is accepted (a transformers `AutoModel`); no effect."""
    tag: str = "bert-base-uncased"
    """Hugging Face model name already in the local cache, or a local folder; also the tokenizer when `tokenizer` is
    null. Nothing is downloaded.
    """
    embedding_dim: Optional[int] = 768
    """Informational; the tower's real hidden width is read from the model."""
    pretrained: Union[bool, str] = True
    """`true`: load the weights of `tag`; a string: load this local folder (or cached name) instead; `false`: random
    weights built from `config` (or the tag's cached config).
    """
    trainable: bool = True
    """`false` freezes the text tower: no gradients, kept in eval mode."""
    target_token_idx: int = 0
    """Position of the token whose last hidden state is the text feature when `pooling` is `cls`."""
    only_cls_token: bool = False
    """Accepted for ZeroVL configs; unused (see `pooling` and `target_token_idx`)."""
    pooling: Literal["cls", "mean"] = "cls"
    """Text feature: `cls` = the hidden state at `target_token_idx`; `mean` = the attention-masked mean of the last
    hidden states.
    """
    grad_checkpointing: bool = False
    """Activation checkpointing in the text tower (non-reentrant, replays dropout exactly); an error if the model does
    not support it.
    """
    tokenizer: Optional[str] = None  # None = the tag; "zvl_ds:demo_tokenizer" = the packaged demo vocabulary
    """Tokenizer folder or cached name; `zvl_ds:demo_tokenizer` = the packaged demo vocabulary; `null`: the folder
    `pretrained` names, else `tag`.
    """
    config: Dict[str, Any] = field(default_factory=dict)
    """Hugging Face config fields. With `model_type` (and `pretrained: false`) the tower is built from them alone;
    otherwise they override the loaded config.
    """
    unlocked_layers: Optional[int] = None
    """Partial locking (OpenCLIP's `--lock-text --lock-text-unlocked-layers N`): freeze the tower except its last N
    groups, the groups being the embeddings, then each encoder layer (then what follows the layers, if anything).
    Frozen parameters get no gradient and are not in the optimizer; `0` freezes every group. More than the tower has
    is an error naming the count. `null`: no partial locking (`trainable` decides).
    """
    freeze_layer_norm: bool = False
    """With `unlocked_layers`: freeze the LayerNorms of the frozen groups too (OpenCLIP's
    `--lock-text-freeze-layer-norm`); `false`, as OpenCLIP's default: they stay trainable.
    """


@dataclass
class ProjectionConfig:
    name: Literal["simple", "mlp"] = "simple"
    """`simple`: one bias-free Linear per tower (ZeroVL); `mlp`: Linear, GELU, bias-free Linear."""
    dim: int = 512
    """Width of the shared embedding space both projections map to."""
    image_projector_trainable: bool = True
    """`false` freezes the image projection."""
    text_projector_trainable: bool = True
    """`false` freezes the text projection."""


@dataclass
class PoolConfig:
    name: Literal["identity"] = "identity"
    """Only `identity` is accepted (ZeroVL's pooling option); no effect."""


@dataclass
class EmaConfig:
    """An exponential moving average of the weights, updated after every applied optimizer step."""

    decay: Optional[float] = None
    """Model EMA: after every applied optimizer step, `ema = d * ema + (1 - d) * weights` over the trainable
    parameters (fp32, kept partitioned like the weights at ZeRO-3). Saved in checkpoints, evaluated next to the raw
    weights (`eval/<set>_ema/...`), exported with `python -m zvl_ds.export --ema`. A value in (0, 1), e.g. 0.999;
    `null`: off.
    """
    warmup_steps: int = 0
    """> 0: the decay ramps up linearly, update t (1, 2, ...) using `decay * min(1, t / warmup_steps)`, so the early
    average follows the fast-moving weights; 0: `decay` from the first update.
    """


@dataclass
class OpenClipSourceConfig:
    """``model.arch: open_clip``: the OpenCLIP model the towers come from (needs the ``open_clip`` extra)."""

    name: str = ""
    """`model.arch: open_clip`: an OpenCLIP architecture name (`ViT-B-32`, as `open_clip.list_models()` names them) or
    `local-dir:FOLDER`, a folder holding `open_clip_config.json` and its weights (`open_clip_model.safetensors`).
    `hf-hub:` names are refused (nothing is downloaded).
    """
    pretrained: Optional[str] = None
    """A local weights file for an architecture name (`.safetensors`, or a weights-only torch file); `null`: the
    `local-dir` folder's weights, or random weights for a bare name (the run says so). Pretrained tags are refused
    (nothing is downloaded).
    """
    config: Dict[str, Any] = field(default_factory=dict)
    """The OpenCLIP model config (`model_cfg`) the towers are built from; empty: the one `name` gives. Exported model
    folders record it, so they rebuild without the source.
    """


@dataclass
class ModelConfig:
    name: Literal["clip"] = "clip"
    """Only `clip` is accepted (the dual encoder); no effect."""
    arch: Optional[str] = None
    """A preset from the model presets table; its values fill `model.*`, and keys given explicitly in `model:` override
    them. `null`: no preset.
    """
    model_type: Optional[str] = None
    """A variant of the `model.arch` preset (presets table), overlaid on the preset before the explicit `model.*` keys
    (LAVIS's `model_type`). `null`: the preset's default variant, which the resolved config then names. Without
    `model.arch` it is an error.
    """
    # LAVIS's whole-model weights (zvl_ds.model.init_weights): loaded before DeepSpeed wraps the model, never on resume
    load_pretrained: bool = False
    """`true`: initialise the whole dual encoder (towers, projections, learnable temperature or SigLIP scale and bias)
    from `model.pretrained` before training (LAVIS's `load_pretrained`). Skipped when the run resumes: a resumed run
    restores its own checkpoint.
    """
    pretrained: Optional[str] = None
    """Where `load_pretrained` takes the weights from: an exported model folder (`model.safetensors`), a run folder
    (its `latest` checkpoint) or one of its `step_NNNNNNNN` folders (consolidated from any ZeRO stage, weights-only
    check as `ckpt.trust_checkpoint`), or a `.safetensors` (or weights-only torch) file; `pkg:` paths work. URLs are
    refused (nothing is downloaded). The architecture is this config's: a tensor of another shape is an error naming
    it, missing and unexpected tensors are allowed and reported. No effect while `load_pretrained` is false.
    """
    load_finetuned: bool = False
    """`true`: load `model.finetuned` (LAVIS's `load_finetuned`). With `evaluate: true` these are the weights evaluated
    (the run folder's checkpoints are not resumed; `resume_ckpt_path` with it is an error); in training they are the
    initialisation, winning over `load_pretrained`, and as for it skipped on resume.
    """
    finetuned: Optional[str] = None
    """Where `load_finetuned` takes the weights from; the same sources and checks as `model.pretrained`. No effect
    while `load_finetuned` is false.
    """
    max_length: int = 25
    """Tokens per caption: captions are padded and truncated to this length."""
    hf_folder: Optional[str] = None
    """`model.arch: hf_clip` / `hf_siglip`: a local Hugging Face `CLIPModel` / `SiglipModel` folder (`config.json`,
    `model.safetensors` or `pytorch_model.bin`, tokenizer files, `preprocessor_config.json`), as a hub download
    leaves it. The towers are the library's own, with its pooling and projections; the folder also sets the
    tokenizer, `max_length`, the image transforms and the loss (see docs/fine-tuning.md) unless the config sets
    them. Without a weights file the weights are random (the run says so).
    """
    hf_config: Dict[str, Any] = field(default_factory=dict)
    """Hugging Face config fields over the folder's `config.json` (nested sections merged, e.g.
    `vision_config.attention_dropout`); without `hf_folder`, the whole config the towers are built from (exported
    model folders record it, so they rebuild without the source folder).
    """
    open_clip: OpenClipSourceConfig = field(default_factory=OpenClipSourceConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    syncbn: bool = True
    """Accepted for ZeroVL configs; unused (the towers have no BatchNorm to convert)."""
    interpolate_pos_embed: bool = False
    """Accepted for ZeroVL configs; unused (timm resamples position embeddings itself when a weights file's grid
    differs from `img_size`).
    """
    # Speed only: results equal the plain eager towers up to floating-point rounding.
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    """`torch.compile` each tower with this mode (`default`, `reduce-overhead`, `max-autotune`); `none`: eager. Faster
    steps after a compile on the first ones; needs a C++ compiler on CPU.
    """
    attention: Literal["sdpa", "eager"] = "sdpa"
    """`sdpa`: both towers use fused `scaled_dot_product_attention` (flash/memory-efficient kernels on GPUs); `eager`:
    the plain matmul-softmax attention (a reference for debugging).
    """
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class NCELossOptions:
    gather_backward: bool = True
    """`clip` runner only. `true`: gradients flow back through the gathered embeddings (the exact full-batch gradient);
    `false`: ZeroVL's plain gather (gathered embeddings are constants). `clip_bsgs` is always exact.
    """


@dataclass
class TemperatureConfig:
    name: Literal["constant", "parameter"] = "constant"
    """`constant`: a fixed tau; `parameter`: a learnable tau (the model parameter `tau`, saved with the weights)."""
    value: float = 0.02
    """tau (fixed, or the learnable one's initial value); the logits are DIVIDED by it."""
    min: float = 0.001
    """Lower clamp of tau at every use (need 0 < min <= value <= max)."""
    max: float = 0.5
    """Upper clamp of tau at every use."""


@dataclass
class MixupConfig:
    beta: float = 0.1
    """`MixUpNCE` only: lambda ~ Beta(beta, beta), drawn once per step from `(seed, step)`; must be > 0."""


@dataclass
class SigmoidConfig:
    scale_init: float = 10.0
    """`SigLIP` only: initial scale t multiplying the similarities (learned as log t, parameter `logit_scale_log`);
    must be > 0.
    """
    bias_init: float = -10.0
    """`SigLIP` only: initial bias b added to every logit (parameter `logit_bias`)."""


@dataclass
class LossConfig:
    name: Literal["NCE", "MixUpNCE", "SigLIP"] = "NCE"
    """`NCE`: symmetric InfoNCE over the global batch; `MixUpNCE`: ZeroVL's coin-flip mixup (each step mixes either
    images or texts with a partner, soft targets); `SigLIP`: the pairwise sigmoid loss (see Choosing a loss).
    """
    group_size: int = -1
    """Accepted for ZeroVL configs; only -1 (gather over the whole world) is implemented, another value is an error."""
    smoothing: float = 0.0
    """Accepted for ZeroVL configs; only 0.0 is implemented (no label smoothing), another value is an error."""
    nce_loss: NCELossOptions = field(default_factory=NCELossOptions)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    chunk_rows: int = 1024
    """Rows of the logits matrix computed at once (memory knob); the result is exact whatever the value."""
    chunk_cols: int = 0
    """Columns of a logits tile: > 0 holds chunk_rows x chunk_cols logits whatever the batch (online log-sum-exp; with
    gather-backward both softmax directions come from the same tiles, 4 matmuls per tile instead of 6 for two row
    passes); 0: whole rows (chunk_rows x B).
    """
    sigmoid: SigmoidConfig = field(default_factory=SigmoidConfig)


@dataclass
class OptimParams:
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas `[beta1, beta2]`."""
    eps: float = 1e-6
    """AdamW epsilon."""
    weight_decay: float = 0.001
    """Weight decay of the decay group (all parameters when `decay_all`)."""
    momentum: float = 0.0
    """SGD momentum (SGD only)."""


@dataclass
class LRParams:
    num_cycles: float = 0.5
    """Cosine cycles of the ZeroVL schedule after warm-up (0.5: one half cosine, monotone decay)."""
    min_lr_scale: float = 0.1
    """ZeroVL schedule: the final learning rate is `init * min_lr_scale`."""


LR_SCHEDULES = ("cosine_schedule_with_warmup_min_lr_scale", "linear_warmup_cosine_lr", "linear_warmup_step_lr",
                "constant", "constant_lr")  # constant_lr: LAVIS's name for constant


@dataclass
class LRConfig:
    name: Literal[LR_SCHEDULES] = "cosine_schedule_with_warmup_min_lr_scale"
    """`cosine_schedule_with_warmup_min_lr_scale` (ZeroVL): linear ramp from 0, then cosine down to `init *
    min_lr_scale`; `linear_warmup_cosine_lr` (LAVIS): ramp from `warmup_lr`, cosine to `min_lr`;
    `linear_warmup_step_lr` (LAVIS): ramp, then `init * lr_decay_rate ** epoch` floored at `min_lr`; `constant` (or
    LAVIS's `constant_lr`): `init`. Evaluated per optimizer step.
    """
    init: float = 1e-4
    """Peak learning rate (after warm-up)."""
    warmup_proportion: float = 0.025
    """Warm-up length as a fraction of the run's optimizer steps (unless `warmup_steps` is set)."""
    warmup_steps: Optional[int] = None
    """Warm-up length in optimizer steps; wins over `warmup_proportion`. `null`: use the proportion."""
    min_lr: float = 0.0
    """Final / floor learning rate of the LAVIS schedules."""
    warmup_lr: float = 0.0
    """Learning rate at step 0 of the LAVIS schedules' warm-up."""
    lr_decay_rate: float = 0.9
    """`linear_warmup_step_lr`: factor applied once per epoch."""
    param: LRParams = field(default_factory=LRParams)


MODEL_PARTS = ("image_tower", "text_tower", "projection", "temperature")


@dataclass
class PartLRMultConfig:
    """Each part's learning rate as a multiple of the schedule's (optim.lr)."""

    image_tower: float = 1.0
    """Image tower's learning rate as a multiple of the schedule's (every schedule, every step); 0 freezes it in effect
    but keeps it in the optimizer.
    """
    text_tower: float = 1.0
    """Text tower's learning-rate multiple of the schedule's."""
    projection: float = 1.0
    """Both projections' learning-rate multiple of the schedule's."""
    temperature: float = 1.0
    """The learnable temperature's learning-rate multiple of the schedule's."""


@dataclass
class PartLRAbsConfig:
    """A part's peak learning rate given absolutely: its multiplier becomes value / optim.lr.init."""

    image_tower: Optional[float] = None
    """Image tower's peak learning rate, absolute (multiplier = value / `optim.lr.init`); `null`: use `lr_mult`."""
    text_tower: Optional[float] = None
    """Text tower's peak learning rate, absolute; `null`: use `lr_mult`."""
    projection: Optional[float] = None
    """Projections' peak learning rate, absolute; `null`: use `lr_mult`."""
    temperature: Optional[float] = None
    """Temperature's peak learning rate, absolute; `null`: use `lr_mult`."""


@dataclass
class LayerDecayConfig:
    """Layer-wise LR decay (EVA-CLIP): block i of L gets decay ** (L - i); embeddings decay ** (L + 1)."""

    image_tower: float = 1.0
    """Layer-wise LR decay of a ViT image tower (EVA-CLIP): with L blocks, block i (0-based) gets `decay ** (L - i)`,
    patch/position embeddings and tokens `decay ** (L + 1)`, the final norm and pooling 1; 1.0 = off. Blocks: timm
    `blocks.N` (embeddings `patch_embed`, `pos_embed`, tokens), Hugging Face CLIP/SigLIP `encoder.layers.N`
    (embeddings `embeddings`, `pre_layrnorm`), OpenCLIP `transformer.resblocks.N` (embeddings `conv1`,
    `class_embedding`, `positional_embedding`, `ln_pre`).
    """
    text_tower: float = 1.0
    """The same for the text tower: BERT-like `encoder.layer.N` (embeddings `embeddings`), Hugging Face CLIP/SigLIP
    `encoder.layers.N` (embeddings `embeddings`), OpenCLIP `transformer.resblocks.N` (embeddings `token_embedding`,
    `positional_embedding`); 1.0 = off.
    """


@dataclass
class OptimConfig:
    name: Literal["torch.optim.AdamW", "AdamW", "torch.optim.SGD", "SGD"] = "torch.optim.AdamW"
    """`torch.optim.AdamW` or `AdamW`: AdamW; `torch.optim.SGD` or `SGD`: SGD."""
    param: OptimParams = field(default_factory=OptimParams)
    lr: LRConfig = field(default_factory=LRConfig)
    lr_mult: PartLRMultConfig = field(default_factory=PartLRMultConfig)
    lr_abs: PartLRAbsConfig = field(default_factory=PartLRAbsConfig)
    layer_decay: LayerDecayConfig = field(default_factory=LayerDecayConfig)
    # ZeroVL decays every parameter (its exclusion rules are commented out); decaying norms, biases and the
    # temperature is rarely what users want, so by default they go to a no-decay group.
    decay_all: bool = False
    """`true`: decay every parameter (ZeroVL); `false`: biases, norm gains and other 1-d tensors, the temperature,
    position embeddings and class/mask tokens get no weight decay.
    """
    grad_clip: float = 0.0
    """Maximum global gradient norm (DeepSpeed `gradient_clipping`); 0 = off."""
    implementation: Literal["auto", "plain", "foreach", "fused"] = "auto"
    """Kernel of the torch optimizer: `plain` (a loop over tensors), `foreach` (batched over tensors), `fused` (one
    kernel; CUDA, or CPU where torch supports it); `auto`: `fused` on CUDA, `plain` on CPU. Same update up to
    floating-point rounding.
    """


@dataclass
class RunnerConfig:
    name: Literal["clip", "clip_bsgs"] = "clip"
    """`clip`: one forward and backward per rank over its share of the batch; `clip_bsgs`: ZeroVL's decoupled gradient
    accumulation: embed in chunks of `data.batch_size_train`, one loss over the whole batch, recompute each chunk
    with its cached gradient (same gradient, one chunk's memory).
    """
    val_interval: int = 1
    """Evaluate every this many epochs (and after the last step) when `val_interval_steps` is not > 0."""
    val_interval_steps: int = -1
    """> 0: evaluate every this many optimizer steps (and after the last step) instead of by epochs."""
    stable_random: Literal["step", "none"] = "step"
    """`step`: reseed torch's RNG at every step from `(seed, step, rank)`, so dropout is the same after a resume and
    independent across ranks; `none`: do not reseed.
    """
    train_steps: int = -1
    """> 0 fixes the number of optimizer steps (wins over `data.train_steps` and `epoch`); -1 (or 0): not set, the run
    length comes from `data.train_steps` or `epoch`.
    """
    offload_inputs: bool = False
    """On CUDA: keep the step's images in pinned host memory and move them one chunk at a time (saves device memory for
    large `clip_bsgs` batches). No effect on CPU.
    """
    max_skipped_steps: int = 10
    """Consecutive skipped steps (non-finite loss, fp16 overflow) after which the run stops with an error naming the
    last good checkpoint.
    """
    collective_timeout: float = 600.0
    """Seconds a rank may wait in one collective (all-reduce, barrier, broadcast) before the job fails, e.g. when
    another rank hangs. A rank that raises ends the job at once regardless; raise this only for collectives that
    legitimately wait long (a universal checkpoint conversion of a large model on rank 0).
    """
    preempt_timeout: float = 300.0
    """Seconds a rank may take, after SIGTERM or SIGUSR1 (preemption, `scancel`, SLURM's `--signal`), to finish its
    step and save the preemption checkpoint; past it the job ends at once without one (`latest` keeps the previous
    complete checkpoint). Set it a little under the scheduler's grace period.
    """
    world_size: int = -1
    """LAVIS `run.world_size`: > 0 must equal the number of ranks the launcher started; -1: not checked."""
    task: Literal["retrieval"] = "retrieval"
    """What the run trains for: `retrieval` (LAVIS `run.task`); any other value is refused."""


@dataclass
class CkptConfig:
    dir: str = "./output"
    """Output root; the run folder is `ckpt.dir/data.exp_name`."""
    step_interval: int = 2000
    """Save a checkpoint every this many optimizer steps (and after the last step)."""
    keep_last: int = 2
    """Checkpoints kept in the run folder; older ones are deleted (never the one `latest` names)."""
    auto_resume: bool = True
    """Resume from the run folder's `latest` checkpoint when there is one."""
    overwrite: bool = False
    """With `ckpt.auto_resume: false` (and no `resume_ckpt_path`): start from scratch in a run folder that already
    holds checkpoints (replacing them as new ones are saved). Without it such a run is refused (exit 2), so old
    checkpoints are not lost by mistake.
    """
    trust_checkpoint: bool = False
    """Open the resumed checkpoint's files without first checking that they hold only weights (tensors, plain values):
    set it only for checkpoints you wrote yourself, since DeepSpeed's loader unpickles them and a crafted file runs
    code.
    """


@dataclass
class LogConfig:
    interval_train: int = 10
    """Print a console line every this many steps (TensorBoard gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard events to `RUN/tensorboard` (rank 0)."""
    num_image_samples: int = 8
    """Validation images shown in TensorBoard with their top-3 retrieved captions at each evaluation (0: none)."""
    record_sample_keys: bool = False
    """Append each step's sample keys to `RUN/sample_keys/rank_N.txt` (data audit)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging, ZeroVL's ``wandb:`` section, next to TensorBoard (which stays on, see
    ``log.tensorboard``). Needs the optional ``wandb`` package (``pip install -e .[wandb]``)."""

    enable: bool = False
    """Log to Weights & Biases from rank 0: every scalar TensorBoard gets (training, evaluation, data counters,
    memory), the resolved config and the retrieval example grids. The W&B run id is kept in `RUN/wandb_run.json`, so a
    resumed run continues the same W&B run, without logging a replayed step twice (a run started from scratch starts
    a new one). Without the `wandb` package the
    run stops before building the model (exit 2). `WANDB_MODE=offline` and `WANDB_DIR` work as in W&B; the local
    files go to `RUN/` unless `WANDB_DIR` is set.
    """
    project: str = "zvl_ds"
    """W&B project (ZeroVL's configs write the placeholder `your_proj`: set your own)."""
    entity: Optional[str] = None
    """W&B entity (user or team); `null`: your default entity (ZeroVL's configs write the placeholder `your_entity`:
    set your own or `null`).
    """
    name: Optional[str] = None
    """Display name of the W&B run; `null`: `data.exp_name`."""
    tags: List[str] = field(default_factory=list)
    """Tags of the W&B run."""
    mode: Optional[Literal["online", "offline", "disabled"]] = None
    """`online`, `offline` (local files only, `wandb sync` uploads them later) or `disabled`; `null`: W&B's own
    choice (`WANDB_MODE`, `wandb offline`, else `online`).
    """


@dataclass
class DistConfig:
    """ZeroVL's launcher section: ``fp16: true`` selects precision fp16. ``url`` and ``distributed`` have no effect
    (the launcher decides both); they stay here because LAVIS's ``run.dist_url`` / ``run.distributed`` map onto them."""

    fp16: bool = False
    """ZeroVL's mixed-precision flag: when `precision` is null, `true` selects `fp16`, `false` `fp32`."""
    url: str = "env://"
    """Accepted for ZeroVL and LAVIS (`run.dist_url`) configs; unused (rendezvous comes from the launcher's
    environment).
    """
    distributed: bool = True
    """Accepted for ZeroVL and LAVIS (`run.distributed`) configs; unused (the launcher decides)."""


@dataclass
class Config:
    seed: int = 2021
    """Seed of everything random: the initial weights (same on every rank), the data plan, shuffle buffers, per-sample
    augmentation, the `debias` dataset draws, mixup draws and the per-step dropout seeds.
    """
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when visible, else CPU; `cpu`; `cuda` (an error when no GPU is visible)."""
    # None: fp16 if dist.fp16 (ZeroVL's flag) else fp32. bf16 is the better choice on recent GPUs.
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = None
    """Compute precision of the DeepSpeed engine: `fp32`, `bf16` or `fp16` (fills the DeepSpeed config's `bf16`/`fp16`
    sections). `null`: `fp16` if `dist.fp16` is true, else `fp32`.
    """
    evaluate: bool = False
    """Evaluate only: resume as for training (`resume_ckpt_path` / `ckpt.auto_resume`), or load `model.finetuned` when
    `model.load_finetuned` is true, run the validation sets once and exit. The training datasets must still resolve.
    """
    resume_ckpt_path: Optional[str] = None
    """Checkpoint to resume from: a run folder holding a `latest` file, or one of its `step_NNNNNNNN` folders. Wins
    over `ckpt.auto_resume`.
    """
    epoch: int = 20
    """Run length in epochs (an epoch = the data plan's steps per epoch) unless `runner.train_steps` or
    `data.train_steps` is > 0.
    """
    data: DataConfig = field(default_factory=DataConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
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


