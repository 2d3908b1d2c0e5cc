"""The ``model:`` section: the dual encoder's image and text towers, projections, whole-model weights, presets and
model sources (``arch``, ``hf_folder``, ``open_clip``), partial locking, patch dropout and the model EMA; with the
checks that concern this section alone.

Some keys here change nothing (tower names, ``embedding_dim``, ``pool``, ``syncbn``, ...), each marked "no effect" or
"unused" in its docstring: an exported model's config records the whole ``model`` section and must stay readable as
written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

from zvl_ds.base.errors import ConfigError
from zvl_ds.config.keys import code_loading_key


@dataclass
class VitOptions:
    only_cls_token: bool = True
    """For a tower that returns a token sequence (timm `global_pool: ''`): `true` takes token 0, `false` the mean of
    the tokens. Towers that pool themselves are not affected.
    """


@dataclass
class LoraOptions:
    """LoRA adapters on one tower, through Hugging Face ``peft`` (the optional ``peft`` extra); docs/fine-tuning.md."""

    r: int = 0
    """LoRA rank: each adapted module gains trainable matrices of rank `r` beside its frozen weight (Hugging Face
    `peft`, the optional extra `pip install -e .[peft]`); the rest of the tower is frozen unless `unlocked_groups` /
    `unlocked_layers` unlock it. `0`: no adapters.
    """
    alpha: Optional[float] = None
    """LoRA scale numerator: the adapters' output is multiplied by `alpha / r`. `null`: `2 * r` (scale 2)."""
    dropout: float = 0.0
    """Dropout on the adapters' input in training, in [0, 1); replayed exactly by DGA's second pass."""
    target_modules: Optional[List[str]] = None
    """The modules that get adapters, by name or dotted name suffix (peft's `target_modules`), e.g. `[q_proj,
    v_proj]`. `null`: the tower's default list (docs/fine-tuning.md). A name no module of the tower has is an error
    listing the names that would match.
    """

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scale_numerator(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r

    def check(self, where: str) -> None:
        if self.r < 0:
            raise ConfigError(f"{where}.lora.r: a rank >= 1 (0: no adapters), got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.lora.dropout: a probability in [0, 1), got {self.dropout}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"{where}.lora.alpha: must be > 0 (or null: 2 * r), got {self.alpha}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError(f"{where}.lora.target_modules: an empty list adapts nothing; name modules or give "
                              "null (the tower's default list)")


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
    OpenCLIP's `--lock-image-freeze-bn-stats`; with `lora`: those of the frozen base.
    """
    patch_dropout: float = 0.0
    """Patch dropout (FLIP; OpenCLIP's `--force-patch-dropout`): in training only, each image keeps a random
    `1 - share` of its patch tokens (the class token always stays); a share in [0, 1), 0 = off. Needs a timm ViT tower.
    Exact under `clip_bsgs`: DGA's recomputation drops the same patches as its first pass.
    """
    lora: LoraOptions = field(default_factory=LoraOptions)


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
    lora: LoraOptions = field(default_factory=LoraOptions)


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

    def check(self) -> None:
        if self.decay is not None and not 0.0 < self.decay < 1.0:
            raise ConfigError(f"model.ema.decay: must be in (0, 1) (e.g. 0.999) or null (off), got {self.decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"model.ema.warmup_steps: must be >= 0, got {self.warmup_steps}")


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
    """A preset from the model presets table; its values fill `model.*`, and keys given explicitly in `model:` of the
    same file override them. Named in a file, it wins over the keys the file's `_base_` files set (see Which value
    wins in docs/configuration.md). `null`: no preset.
    """
    model_type: Optional[str] = None
    """A variant of the `model.arch` preset (presets table), overlaid on the preset before the explicit `model.*` keys
    (LAVIS's `model_type`). `null`: the preset's default variant, which the resolved config then names. Without
    `model.arch` (in the file or below it) it is an error.
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
    allow_outside_files: bool = False
    """`true`: a model source folder (`model.hf_folder`, `model.open_clip.name: local-dir:FOLDER`) may hold symbolic
    links that lead out of it. `false`: such a link is refused, naming it (a Hugging Face cache snapshot's links into
    its own `blobs/` count as inside), as `--allow-outside-images` rules image folders.
    """
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

    def check(self) -> None:
        self._check_whole_model_weights()
        self._check_tuning_options()
        code_key = code_loading_key(self.text_encoder.config)
        if code_key:
            raise ConfigError(f"model.text_encoder.config.{code_key}: a key that makes Hugging Face load Python code "
                              "from a model folder is not accepted (configs and model folders are data); use a model "
                              "that transformers implements")

    def _check_whole_model_weights(self) -> None:
        """``model.load_pretrained`` / ``model.pretrained`` and ``model.load_finetuned`` / ``model.finetuned``."""
        for switch, key in (("load_pretrained", "pretrained"), ("load_finetuned", "finetuned")):
            value = getattr(self, key)
            if value and is_remote_location(value):
                raise ConfigError(f"model.{key}={value!r}: a URL or hub name; nothing is downloaded, so give a local "
                                  "exported model folder, run folder, checkpoint folder or .safetensors file")
            if getattr(self, switch) and not value:
                raise ConfigError(f"model.{switch}=true but model.{key} is not set: give the exported model folder, "
                                  "run folder, checkpoint folder or .safetensors file to load")

    def _check_tuning_options(self) -> None:
        """Partial locking, patch dropout and the model EMA (the counts of groups are checked when the towers
        exist)."""
        for section, count_key, norm_key in (("image_encoder", "unlocked_groups", "freeze_bn_stats"),
                                             ("text_encoder", "unlocked_layers", "freeze_layer_norm")):
            tower = getattr(self, section)
            unlocked = getattr(tower, count_key)
            where = f"model.{section}"
            if unlocked is not None and unlocked < 0:
                raise ConfigError(f"{where}.{count_key}: must be >= 0 (0 freezes every group) or null, got "
                                  f"{unlocked}")
            if unlocked is not None and not tower.trainable:
                raise ConfigError(f"{where}.{count_key}={unlocked} with {where}.trainable=false: a frozen tower has "
                                  f"nothing to unlock; give one of the two")
            # freeze_bn_stats also acts on the frozen base of a tower with adapters
            if getattr(tower, norm_key) and unlocked is None and not (norm_key == "freeze_bn_stats"
                                                                      and tower.lora.enabled):
                raise ConfigError(f"{where}.{norm_key}=true acts on the groups {where}.{count_key} freezes; set "
                                  f"{where}.{count_key} too")
            tower.lora.check(where)
            if tower.lora.enabled and not tower.trainable:
                raise ConfigError(f"{where}.lora.r={tower.lora.r} with {where}.trainable=false: a frozen tower "
                                  "trains no adapters; give one of the two")
        share = self.image_encoder.patch_dropout
        if not 0.0 <= share < 1.0:
            raise ConfigError(f"model.image_encoder.patch_dropout: a share of patches in [0, 1), got {share}")
        self.ema.check()


# scheme://... (http, https, s3, gs, hf, ...) and the hub prefixes other tools take (hf:org/name, hf-hub:org/name)
_REMOTE_LOCATION = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|hf:|hf-hub:)")


def is_remote_location(value: str) -> bool:
    """A URL or hub name rather than a local path: zvl_ds downloads nothing, so such a weights source is refused."""
    return bool(_REMOTE_LOCATION.match(value))
