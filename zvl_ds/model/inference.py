"""An exported model folder and inference: ``load_model`` reads it back, with no DeepSpeed, no training code and no
hub access (``zvl_ds.export.model_folder`` writes it, from a run's checkpoint)::

    MODEL_DIR/model.safetensors   fp32 weights of the whole DualEncoder (consolidated from any ZeRO stage)
    MODEL_DIR/model_config.json   the model section and temperature, with the text tower's full Hugging Face
                                  config embedded: rebuilding needs no hub access and no pretrained weights
    MODEL_DIR/preprocess.json     the validation image transform (resize, center crop, normalisation), the
                                  caption length and the evaluation captions' preparation (cleaning, max_words,
                                  prompt; absent in folders written before it existed: captions as written)
    MODEL_DIR/tokenizer/          the tokenizer files (``save_pretrained``)

Loading::

    import zvl_ds
    from PIL import Image
    model = zvl_ds.load_model("MODEL_DIR")
    captions = ["a red circle", "a blue square", "two green triangles"]
    image = model.encode_image(model.preprocess(Image.open("photo.jpg")).unsqueeze(0))
    scores = (image @ model.encode_text(captions).T).squeeze(0)
    print(captions[int(scores.argmax())])
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from zvl_ds.base.errors import UserError
from zvl_ds.base.folder_links import refuse_links_leaving
from zvl_ds.config import CaptionTextConfig, Config, ConfigError, config_from_dict
from zvl_ds.config.model_sources import hf_model_config, open_clip_source
from zvl_ds.config.presets import SOURCE_ARCHS
from zvl_ds.data.transforms import (ImageTransform, caption_preparer, load_rgb, load_tokenizer, normalize_images,
                                    to_uint8_chw, tokenize)
from zvl_ds.model.build import build_model
from zvl_ds.model.dual_encoder import DualEncoder

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
EXPORT_FORMAT = "zvl_ds.exported_model"
EXPORT_FORMAT_VERSION = 1


class ExportError(UserError, RuntimeError):
    """A run folder or model folder that cannot be exported or loaded; the message names what is missing."""


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


def as_shapes_of(model: nn.Module, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``state`` with each tensor the model also has reshaped to the model's shape when the sizes agree (a scalar
    written as shape (1,) or ()), contiguous, for a strict load that still names what does not fit."""
    expected = model.state_dict()
    return {k: (v.reshape(expected[k].shape) if k in expected and v.numel() == expected[k].numel() else v).contiguous()
            for k, v in state.items()}


def offline_model_config(cfg: Config):
    """The model section with both towers built from configs only (no weights loaded, nothing downloaded)."""
    model_cfg = dataclasses.replace(cfg.model)
    if model_cfg.arch in SOURCE_ARCHS:
        return offline_source_config(model_cfg)
    model_cfg.image_encoder = dataclasses.replace(cfg.model.image_encoder, pretrained=False)
    text = cfg.model.text_encoder
    # a text tower loaded from a local folder takes its architecture from that folder, not from the tag
    tag = text.pretrained if isinstance(text.pretrained, str) and text.pretrained else text.tag
    model_cfg.text_encoder = dataclasses.replace(text, pretrained=False, tag=tag)
    return model_cfg


def offline_source_config(model_cfg):
    """A model source (``hf_clip``, ``hf_siglip``, ``open_clip``) with its architecture config recorded in the model
    section instead of read from the user's folder, and no weights file: an export rebuilds it anywhere."""
    if model_cfg.arch == "open_clip":
        options = model_cfg.open_clip
        recorded = open_clip_source(options.name, options.pretrained, options.config).model_cfg
        model_cfg.open_clip = dataclasses.replace(options, pretrained=None, config=recorded)
    else:
        model_cfg.hf_config = hf_model_config(model_cfg.hf_folder, model_cfg.hf_config, model_cfg.arch)
        model_cfg.hf_folder = None
    return model_cfg


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
    # transforms.caption_eval: text is prepared as evaluation prepared it (defaults: as written)
    caption_clean: bool = False
    caption_max_words: Optional[int] = None
    caption_prompt: str = ""

    @classmethod
    def from_config(cls, cfg: Config) -> "Preprocessing":
        t = cfg.transforms
        return cls(valid_transforms=list(t.valid_transforms), resize=t.resize.size, center_crop=t.center_crop.size,
                   input_size=t.input_size, mean=list(t.normalize.mean), std=list(t.normalize.std),
                   max_length=cfg.model.max_length, caption_clean=t.caption_eval.clean,
                   caption_max_words=t.caption_eval.max_words, caption_prompt=t.caption_eval.prompt)

    def apply_to(self, cfg: Config) -> None:
        """Make ``cfg``'s validation transforms, caption length and caption preparation those of this model."""
        t = cfg.transforms
        t.valid_transforms = list(self.valid_transforms)
        t.resize.size, t.center_crop.size, t.input_size = self.resize, self.center_crop, self.input_size
        t.normalize.mean, t.normalize.std = list(self.mean), list(self.std)
        cfg.model.max_length = self.max_length
        t.caption_eval = self.caption_eval()

    def caption_eval(self) -> CaptionTextConfig:
        return CaptionTextConfig(clean=self.caption_clean, max_words=self.caption_max_words,
                                 prompt=self.caption_prompt)


def is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))


def _read_json(path: str) -> Dict:
    """A JSON object from a model folder file; anything else (invalid, nested too deeply, not an object) is an
    ExportError naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ExportError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(payload, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def read_preprocessing(path: str) -> Preprocessing:
    """``preprocess.json``: unknown or missing keys are refused by name (a typo must not be silently ignored)."""
    payload = _read_json(path)
    fields = {field.name: field for field in dataclasses.fields(Preprocessing)}
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        raise ExportError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    missing = [name for name, field in fields.items() if name not in payload
               and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if missing:
        raise ExportError(f"{path}: missing key(s) {', '.join(missing)}")
    return Preprocessing(**payload)


def read_weights(path: str) -> Dict[str, Tensor]:
    """The tensors of a safetensors file; a damaged one (truncated, a header too large or not JSON) is an
    ExportError naming the file."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ExportError(f"{path}: not a readable safetensors file ({error}); export the model again") from None


class ZvlModel:
    """An exported dual encoder for inference: ``preprocess`` / ``tokenize`` and ``encode_image`` /
    ``encode_text`` (L2-normalised embeddings; similarity is their dot product). ``model`` is the
    DualEncoder in eval mode."""

    def __init__(self, model: DualEncoder, tokenizer, preprocessing: Preprocessing, config: Config,
                 device: Union[str, torch.device] = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.config = config
        self.device = torch.device(device)
        self.model.to(self.device)
        self._transform = ImageTransform(preprocessing.valid_transforms, config.transforms)
        # the text evaluation read (preprocess.json); None: captions as written
        self.prepare_text: Optional[Callable[[str], str]] = caption_preparer(preprocessing.caption_eval())

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
        return normalize_images(images_uint8, self.config.transforms.normalize, self.device, torch.float32)

    def tokenize(self, texts: Union[str, Sequence[str]]) -> Dict[str, Tensor]:
        """Captions -> ``{"input_ids", "attention_mask"}``, long [n, max_length], prepared and tokenised as
        evaluation did (``preprocess.json``'s caption cleaning, max_words and prompt, when the run set them)."""
        if isinstance(texts, str):
            texts = [texts]
        if self.prepare_text is not None:
            texts = [self.prepare_text(text) for text in texts]
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


def text_vocabulary_size(text_tower: nn.Module) -> int:
    """Rows of the text tower's token embedding: a Hugging Face encoder's or OpenCLIP's, whichever it is."""
    return int(text_tower.get_input_embeddings().num_embeddings if hasattr(text_tower, "get_input_embeddings")
               else text_tower.token_embedding.num_embeddings)


# how a user accepts an exported model folder's links that lead out of it (zvl_ds.base.folder_links)
ALLOW_OUTSIDE_FILES = "--allow-outside-model-files (load_model(..., allow_outside_files=True))"


def load_model(model_dir: str, device: Union[str, torch.device] = "cpu",
               allow_outside_files: bool = False) -> ZvlModel:
    """Load a folder written by ``write_model_folder`` (``python -m zvl_ds.export``); no DeepSpeed, hub access
    or pretrained weights needed. A file of the folder that is a link leading out of it is refused unless
    ``allow_outside_files``."""
    if not os.path.isdir(model_dir):
        raise ExportError(f"model folder not found: {model_dir}")
    if not allow_outside_files:
        refuse_links_leaving(model_dir, ALLOW_OUTSIDE_FILES, ExportError)
    needed = [WEIGHTS_FILE, MODEL_CONFIG_FILE, PREPROCESS_FILE, TOKENIZER_DIR]
    missing = [name for name in needed if not os.path.exists(os.path.join(model_dir, name))]
    if missing:
        hint = (" (it looks like a training run folder: export it first with python -m zvl_ds.export)"
                if os.path.isfile(os.path.join(model_dir, "latest")) else "")
        raise ExportError(f"{model_dir} is not a complete exported model: missing {', '.join(missing)}{hint}")
    meta = _read_json(os.path.join(model_dir, MODEL_CONFIG_FILE))
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{os.path.join(model_dir, MODEL_CONFIG_FILE)} is not a zvl_ds model config "
                          f"(format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
        raise ExportError(f"{model_dir} was written by a newer zvl_ds (format {meta['format_version']}); "
                          f"this one reads up to {EXPORT_FORMAT_VERSION}")
    preprocessing = read_preprocessing(os.path.join(model_dir, PREPROCESS_FILE))
    try:
        cfg = config_from_dict({"model": meta["model"], "loss": meta["loss"]})
    except ConfigError as error:  # its message names the key already
        raise ExportError(f"{os.path.join(model_dir, MODEL_CONFIG_FILE)}: {error}") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise ExportError(f"{os.path.join(model_dir, MODEL_CONFIG_FILE)}: {type(error).__name__}: {error}") from None
    preprocessing.apply_to(cfg)
    model = build_model(cfg.model, cfg.loss)
    load_state_strict(model, read_weights(os.path.join(model_dir, WEIGHTS_FILE)), model_dir)
    cfg.model.text_encoder.tokenizer = os.path.abspath(os.path.join(model_dir, TOKENIZER_DIR))
    tokenizer = load_tokenizer(cfg.model.text_encoder, vocab_size=text_vocabulary_size(model.text_tower))
    return ZvlModel(model, tokenizer, preprocessing, cfg, device)
