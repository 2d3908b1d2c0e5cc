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
from zvl_ds.atomic_write import atomic_folder, atomic_path
from zvl_ds.checkpoint import CheckpointError, list_tags, read_latest
from zvl_ds.safe_load import check_checkpoint_folder, load_weights_only
from zvl_ds.config import Config, ConfigError, config_from_dict, load_config
from zvl_ds.model import DualEncoder, build_model
from zvl_ds.errors import UserError

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
EXPORT_FORMAT = "zvl_ds.exported_model"
EXPORT_FORMAT_VERSION = 1

_ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_MODEL_STATES = "mp_rank_00_model_states.pt"


class ExportError(UserError, RuntimeError):
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
    with ``zvl_ds.optim.optimizer_groups``, so rebuilding the groups on the same model recovers the names.
    """
    from zvl_ds.optim import optimizer_groups

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
        raise ExportError(f"{source} does not match the model its config describes: {len(missing)} missing "
                          f"tensor(s) {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ExportError(f"{source}: tensor shapes differ from the model: {'; '.join(wrong[:5])}")
    model.load_state_dict(state, strict=True)


def _offline_model_config(cfg: Config):
    """The model section with both towers built from configs only (no weights loaded, nothing downloaded)."""
    model_cfg = dataclasses.replace(cfg.model)
    model_cfg.image_encoder = dataclasses.replace(cfg.model.image_encoder, pretrained=False)
    text = cfg.model.text_encoder
    # a text tower loaded from a local folder takes its architecture from that folder, not from the tag
    tag = text.pretrained if isinstance(text.pretrained, str) and text.pretrained else text.tag
    model_cfg.text_encoder = dataclasses.replace(text, pretrained=False, tag=tag)
    return model_cfg


# --------------------------------------------------------------------------------------------------
# Writing a model folder
# --------------------------------------------------------------------------------------------------


@dataclass
class Preprocessing:
    """What turns an image and a caption into model inputs, as the validation pipeline does."""

    valid_transforms: List[str]
    resize: int
    center_crop: int
    input_size: int
    mean: List[float]
    std: List[float]
    max_length: int

    @classmethod
    def from_config(cls, cfg: Config) -> "Preprocessing":
        t = cfg.transforms
        return cls(valid_transforms=list(t.valid_transforms), resize=t.resize.size, center_crop=t.center_crop.size,
                   input_size=t.input_size, mean=list(t.normalize.mean), std=list(t.normalize.std),
                   max_length=cfg.model.max_length)

    def apply_to(self, cfg: Config) -> None:
        """Make ``cfg``'s validation transforms and caption length those of this model."""
        t = cfg.transforms
        t.valid_transforms = list(self.valid_transforms)
        t.resize.size, t.center_crop.size, t.input_size = self.resize, self.center_crop, self.input_size
        t.normalize.mean, t.normalize.std = list(self.mean), list(self.std)
        cfg.model.max_length = self.max_length


def exported_model_config(cfg: Config, model: DualEncoder) -> Dict:
    """The model section for a model folder: towers from configs only, the text tower's config embedded."""
    model_cfg = _offline_model_config(cfg)
    model_cfg.arch = None  # the preset is already merged into the explicit keys
    model_cfg.text_encoder = dataclasses.replace(model_cfg.text_encoder, tokenizer=None,
                                                 config=model.text_tower.config.to_dict())
    model_cfg.image_encoder = dataclasses.replace(model_cfg.image_encoder, grad_checkpointing=False)
    model_cfg.text_encoder.grad_checkpointing = False
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "zvl_ds_version": zvl_ds.__version__,
            "model": dataclasses.asdict(model_cfg),
            "loss": _exported_loss_config(cfg)}


def _exported_loss_config(cfg: Config) -> Dict:
    """The loss keys that shape the model: the temperature, and SigLIP's scale and bias (weights in the folder)."""
    loss = {"temperature": dataclasses.asdict(cfg.loss.temperature)}
    if cfg.loss.name == "SigLIP":
        loss.update(name="SigLIP", sigmoid=dataclasses.asdict(cfg.loss.sigmoid))
    return loss


def write_model_folder(out_dir: str, cfg: Config, model: DualEncoder, tokenizer, source: Dict[str, str]) -> str:
    """Write weights, model config, preprocessing and tokenizer; files appear complete or not at all."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(out_dir, WEIGHTS_FILE)) as path:
        save_file(state, path, metadata={"format": EXPORT_FORMAT, **source})
    config = {**exported_model_config(cfg, model), "source": source}
    with atomic_path(os.path.join(out_dir, MODEL_CONFIG_FILE)) as path:
        _write_json(path, config)
    preprocess = dataclasses.asdict(Preprocessing.from_config(cfg))
    with atomic_path(os.path.join(out_dir, PREPROCESS_FILE)) as path:
        _write_json(path, preprocess)
    with atomic_folder(os.path.join(out_dir, TOKENIZER_DIR)) as folder:
        tokenizer.save_pretrained(folder)
    return out_dir


def export_model(run_dir: str, out_dir: str, tag: Optional[str] = None, trust_checkpoint: bool = False) -> str:
    """Consolidate ``RUN_DIR``'s checkpoint (``tag`` or the latest) into the model folder ``out_dir``."""
    from zvl_ds.data import load_tokenizer

    cfg, model, tag = load_run(run_dir, tag, trust_checkpoint)
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    return write_model_folder(out_dir, cfg, model, tokenizer,
                              {"run_dir": os.path.abspath(run_dir), "tag": tag})


def _write_json(path: str, payload: Dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")




# --------------------------------------------------------------------------------------------------
# Loading a model folder
# --------------------------------------------------------------------------------------------------


def is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))


def _read_json(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from None


class ZvlModel:
    """An exported dual encoder for inference: ``preprocess`` / ``tokenize`` and ``encode_image`` /
    ``encode_text`` (L2-normalised embeddings; similarity is their dot product). ``model`` is the
    DualEncoder in eval mode."""

    def __init__(self, model: DualEncoder, tokenizer, preprocessing: Preprocessing, config: Config,
                 device: Union[str, torch.device] = "cpu"):
        from zvl_ds.data.transforms import ImageTransform

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.config = config
        self.device = torch.device(device)
        self.model.to(self.device)
        self._transform = ImageTransform(preprocessing.valid_transforms, config.transforms)

    def to(self, device: Union[str, torch.device]) -> "ZvlModel":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @property
    def image_size(self) -> int:
        return self._transform.size

    def preprocess_uint8(self, image) -> Tensor:
        """The validation transform: a PIL image, encoded image bytes or a file path -> uint8 [3, S, S].

        Bytes and paths go through exactly the evaluation loader's code; a PIL image skips only its
        reduced-scale JPEG decoding (which changes pixels slightly for large JPEGs).
        """
        import random

        from PIL import Image

        from zvl_ds.data.transforms import load_rgb, to_uint8_chw

        rng = random.Random(0)  # validation transforms draw nothing; the ops take a generator anyway
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as handle:
                image = handle.read()
        if isinstance(image, (bytes, bytearray)):
            return to_uint8_chw(self._transform(bytes(image), rng))
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess takes a PIL image, image bytes or a path, got {type(image).__name__}")
        image = load_rgb(image.copy())
        for op in self._transform.ops:
            image = op(image, rng)
        return to_uint8_chw(image.convert("RGB"))

    def preprocess(self, image) -> Tensor:
        """A PIL image (or bytes, or a path) -> the normalised float32 [3, S, S] tensor ``encode_image`` takes."""
        return self.normalize(self.preprocess_uint8(image).unsqueeze(0))[0].cpu()

    def normalize(self, images_uint8: Tensor) -> Tensor:
        from zvl_ds.data import normalize_images

        return normalize_images(images_uint8, self.config.transforms.normalize, self.device, torch.float32)

    def tokenize(self, texts: Union[str, Sequence[str]]) -> Dict[str, Tensor]:
        """Captions -> ``{"input_ids", "attention_mask"}``, long [n, max_length], as in training."""
        from zvl_ds.data import tokenize

        if isinstance(texts, str):
            texts = [texts]
        input_ids, attention_mask = tokenize(self.tokenizer, list(texts), self.preprocessing.max_length)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @torch.no_grad()
    def encode_image(self, images) -> Tensor:
        """[n, dim] embeddings of: a float [n, 3, S, S] tensor already normalised (``preprocess``), a uint8
        [n, 3, S, S] tensor (normalised here), or a list of PIL images / bytes / paths."""
        if isinstance(images, (list, tuple)):
            images = torch.stack([self.preprocess_uint8(image) for image in images])
        if not isinstance(images, Tensor):
            images = torch.stack([self.preprocess_uint8(images)])
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        param = next(self.model.parameters())
        return self.model.encode_image(images.to(self.device, param.dtype)).float()

    @torch.no_grad()
    def encode_text(self, texts, attention_mask: Optional[Tensor] = None) -> Tensor:
        """[n, dim] embeddings of: a caption or list of captions, a ``tokenize`` dict, or input ids (+ mask)."""
        if isinstance(texts, (str, list, tuple)):
            texts = self.tokenize(texts)
        if isinstance(texts, dict):
            texts, attention_mask = texts["input_ids"], texts.get("attention_mask")
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self.model.encode_text(texts.to(self.device), attention_mask).float()

    def temperature(self) -> float:
        with torch.no_grad():
            return float(self.model.temperature())


def load_model(model_dir: str, device: Union[str, torch.device] = "cpu") -> ZvlModel:
    """Load a folder written by ``export_model``; no DeepSpeed, hub access or pretrained weights needed."""
    from safetensors.torch import load_file

    from zvl_ds.data import load_tokenizer

    if not os.path.isdir(model_dir):
        raise ExportError(f"model folder not found: {model_dir}")
    needed = [WEIGHTS_FILE, MODEL_CONFIG_FILE, PREPROCESS_FILE, TOKENIZER_DIR]
    missing = [name for name in needed if not os.path.exists(os.path.join(model_dir, name))]
    if missing:
        hint = (" (it looks like a training run folder: export it first with tools/export.py)"
                if os.path.isfile(os.path.join(model_dir, "latest")) else "")
        raise ExportError(f"{model_dir} is not a complete exported model: missing {', '.join(missing)}{hint}")
    meta = _read_json(os.path.join(model_dir, MODEL_CONFIG_FILE))
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{os.path.join(model_dir, MODEL_CONFIG_FILE)} is not a zvl_ds model config "
                          f"(format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
        raise ExportError(f"{model_dir} was written by a newer zvl_ds (format {meta['format_version']}); "
                          f"this one reads up to {EXPORT_FORMAT_VERSION}")
    preprocessing = Preprocessing(**_read_json(os.path.join(model_dir, PREPROCESS_FILE)))
    try:
        cfg = config_from_dict({"model": meta["model"], "loss": meta["loss"]})
    except (ConfigError, KeyError) as error:
        raise ExportError(f"{os.path.join(model_dir, MODEL_CONFIG_FILE)}: {error}") from None
    preprocessing.apply_to(cfg)
    model = build_model(cfg.model, cfg.loss)
    load_state_strict(model, load_file(os.path.join(model_dir, WEIGHTS_FILE)), model_dir)
    cfg.model.text_encoder.tokenizer = os.path.abspath(os.path.join(model_dir, TOKENIZER_DIR))
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    return ZvlModel(model, tokenizer, preprocessing, cfg, device)
