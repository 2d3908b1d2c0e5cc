"""Image transforms by name, on-device normalisation, caption preparation and augmentation, tokeniser loading and
tokenisation.

Image transforms run in the loader workers on Pillow images and end as uint8 tensors; normalisation happens on the
device (``normalize_images``), so batches cross processes and the PCIe bus at a quarter of float32's size. Every
random choice comes from a ``random.Random`` the caller seeds per sample visit (AutoAugment, which draws from
torch's global generator, gets torch seeded from it), so a resumed run transforms each sample exactly as an
uninterrupted one would.

Names (``transforms.train_transforms`` / ``valid_transforms``):
- ``random_resize_crop``: a random crop of ``scale`` of the area and aspect ratio in [3/4, 4/3], resized to
  ``size`` x ``size`` (bilinear), as torchvision's RandomResizedCrop.
- ``autoaug``: torchvision's AutoAugment with the ImageNet policy.
- ``resize``: a square ``size`` x ``size`` resize that ignores the aspect ratio (ZeroVL's ``Resize((s, s))``).
- ``center_crop``: the central ``size`` x ``size`` crop (zero padding when the image is smaller).
- ``normalize``: accepted for ZeroVL configs; done on the device by ``normalize_images``.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import random
import re
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from zvl_ds.base.errors import UserError
from zvl_ds.config import CaptionAugConfig, CaptionTextConfig, NormalizeConfig, TextEncoderConfig, TransformsConfig
from zvl_ds.data.open_clip_tokenizer import is_open_clip_tokenizer, load_open_clip_tokenizer
from zvl_ds.data.writing.images import DEFAULT_MAX_PIXELS

PACKAGE_PREFIX = "zvl_ds:"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class TransformError(UserError, ValueError):
    """A transform list that cannot produce fixed-size images, or an unknown name."""


class TooManyPixels(ValueError):
    """An image over the pixel limit: a decompression bomb (a small file that decodes to gigabytes)."""


# Image formats shard members come in (the shard writer's JPEG; img2dataset's jpg/png/webp): decoders of other
# formats are never tried on shard bytes.
SHARD_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


# --------------------------------------------------------------------------------------------------
# Image operations: op(image, rng) -> image. A crop/resize that opens the pipeline gets the image still undecoded
# (decode=True) and lets the JPEG decoder work at reduced scale (DCT scaling) when its output is much smaller.
# --------------------------------------------------------------------------------------------------


def load_rgb(image: Image.Image, request: Optional[Tuple[int, int]] = None) -> Image.Image:
    """Decode to RGB; with ``request``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale if still >= ``request``."""
    if request is not None and image.format == "JPEG":
        image.draft("RGB", request)
    if image.mode != "RGB":
        return image.convert("RGB")
    image.load()
    return image


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], rng: random.Random
                            ) -> Tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) by torchvision's RandomResizedCrop rule, drawn from ``rng``."""
    area = width * height
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        crop_w = int(round(math.sqrt(target * aspect)))
        crop_h = int(round(math.sqrt(target / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, width - crop_w), rng.randint(0, height - crop_h), crop_w, crop_h
    aspect = width / height  # fallback: the largest central crop within the ratio range
    if aspect < _RATIO[0]:
        crop_w, crop_h = width, int(round(width / _RATIO[0]))
    elif aspect > _RATIO[1]:
        crop_w, crop_h = int(round(height * _RATIO[1])), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


class RandomResizeCrop:

    def __init__(self, size: int, scale: Sequence[float]):
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise TransformError(f"transforms.random_resize_crop.scale must be [lo, hi] with 0 < lo <= hi, "
                                 f"got {list(scale)}")
        self.size, self.scale = size, tuple(scale)

    def __call__(self, image: Image.Image, rng: random.Random, decode: bool = False) -> Image.Image:
        width, height = image.size
        left, top, crop_w, crop_h = random_resized_crop_box(width, height, self.scale, rng)
        if decode:
            request = (math.ceil(width * self.size / crop_w), math.ceil(height * self.size / crop_h))
            image = load_rgb(image, request)
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return image.resize((self.size, self.size), Image.BILINEAR, box=box)


class SquareResize:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, rng: random.Random, decode: bool = False) -> Image.Image:
        if decode:
            image = load_rgb(image, (self.size, self.size))
        return image.resize((self.size, self.size), Image.BILINEAR)


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        width, height = image.size
        left = int(round((width - self.size) / 2.0))
        top = int(round((height - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


class AutoAugmentImageNet:
    """torchvision's AutoAugment (ImageNet policy); its draws come from torch's generator, seeded from ``rng``."""

    def __init__(self):
        from torchvision.transforms import AutoAugment, AutoAugmentPolicy

        self.augment = AutoAugment(AutoAugmentPolicy.IMAGENET)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        torch.manual_seed(rng.getrandbits(63))
        return self.augment(image)


class ImageTransform:
    """The named transforms in order: bytes -> RGB Pillow image of ``size`` x ``size``."""

    def __init__(self, names: Sequence[str], cfg: TransformsConfig, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.names = list(names)
        self.max_pixels = max_pixels  # the shard writer's default limit: shards it wrote never exceed it
        self.ops: List[Callable[[Image.Image, random.Random], Image.Image]] = []
        size: Optional[int] = None
        for name in self.names:
            if name == "random_resize_crop":
                size = cfg.random_resize_crop.size
                self.ops.append(RandomResizeCrop(size, cfg.random_resize_crop.scale))
            elif name == "resize":
                size = cfg.resize.size
                self.ops.append(SquareResize(size))
            elif name == "center_crop":
                size = cfg.center_crop.size
                self.ops.append(CenterCrop(size))
            elif name == "autoaug":
                self.ops.append(AutoAugmentImageNet())
            elif name == "normalize":
                continue  # on the device: normalize_images
            else:
                raise TransformError(f"unknown transform {name!r}; known: random_resize_crop, autoaug, resize, "
                                     f"center_crop, normalize")
        if size is None:
            raise TransformError(f"transforms {self.names} give images of varying size: include "
                                 f"random_resize_crop, resize or center_crop")
        if size < 1:
            raise TransformError(f"transforms {self.names}: image size must be >= 1, got {size}")
        self.size = size
        self.uses_torch_rng = any(isinstance(op, AutoAugmentImageNet) for op in self.ops)

    def __call__(self, data: bytes, rng: random.Random) -> Image.Image:
        """Decode and transform; raises (OSError, ValueError, ...) on undecodable bytes, ``TooManyPixels`` on an
        image over the shard writer's pixel limit (checked from the header, before anything is decoded)."""
        with warnings.catch_warnings():  # Pillow warns about large images; the check below refuses them itself
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SHARD_IMAGE_FORMATS)
        if image.width * image.height > self.max_pixels:
            raise TooManyPixels(f"{image.width}x{image.height} = {image.width * image.height} pixels > limit "
                                f"{self.max_pixels}")
        first, *rest = self.ops
        if isinstance(first, (RandomResizeCrop, SquareResize)):  # these may decode a JPEG at reduced scale
            image = first(image, rng, decode=True)
        else:
            image = first(load_rgb(image), rng)
        for op in rest:
            image = op(image, rng)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a [3, H, W] uint8 tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize_images(images_uint8: torch.Tensor, norm_cfg: NormalizeConfig, device, dtype=torch.float32,
                     size: Optional[int] = None) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> ``(x / 255 - mean) / std`` on ``device``, computed in float32 then cast to ``dtype``.

    ``size``: the images are first resized down to ``size`` x ``size`` when they are larger (``resize_down``)."""
    if images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"normalize_images expects [N, 3, H, W], got {tuple(images_uint8.shape)}")
    device = torch.device(device)
    images = images_uint8.to(device, non_blocking=True).to(torch.float32).div_(255.0)
    if size is not None:
        images = resize_down(images, size)
    mean = torch.tensor(norm_cfg.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm_cfg.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std).to(dtype)


def resize_down(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float [N, 3, H, W] -> [N, 3, size, size] by antialiased bilinear interpolation; never up: the training
    loader hands over the larger of two views (a student and its teacher, docs/distillation.md) and each is made
    from it on the device. Images already at ``size`` are returned as they are."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    if height < size or width < size:
        raise ValueError(f"resize_down: images of {height} x {width} px cannot give a {size} px view without "
                         "upsampling")
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


def scaled_train_transforms(cfg: TransformsConfig, size: int) -> TransformsConfig:
    """``cfg`` with the training transforms' output at ``size`` px: the same crops (the same box, drawn from the same
    random numbers) resampled to another size. The last op that sets a size is set to ``size``, the ones before it
    are scaled by the same factor, so a resize then center crop keeps its proportions."""
    sizes = {"random_resize_crop": cfg.random_resize_crop, "resize": cfg.resize, "center_crop": cfg.center_crop}
    current = ImageTransform(cfg.train_transforms, cfg).size
    scaled = dataclasses.replace(cfg, **{name: dataclasses.replace(section) for name, section in sizes.items()})
    for name in cfg.train_transforms:
        if name in sizes:
            section = getattr(scaled, name)
            section.size = int(round(getattr(cfg, name).size * size / current))
    last = [name for name in cfg.train_transforms if name in sizes][-1]
    getattr(scaled, last).size = size
    return scaled


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def resolve_tokenizer_path(name: str) -> str:
    """``zvl_ds:<x>`` -> the packaged ``zvl_ds/assets/<x>``; anything else unchanged."""
    if name.startswith(PACKAGE_PREFIX):
        path = os.path.join(_PACKAGE_DIR, "assets", name[len(PACKAGE_PREFIX):])
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer {name!r}: no packaged folder {path}")
        return path
    return name


class TokenizerMismatch(UserError, OSError):
    """A tokenizer that cannot serve the text tower: only special tokens (its vocabulary file is missing), or more
    or far fewer tokens than the tower's vocabulary."""


class TokenizerError(UserError, OSError):
    """A tokenizer that cannot be loaded from local files; the message names the folder (and the file at fault)."""


def unreadable_json_file(folder: str) -> Optional[str]:
    """The first ``*.json`` file of a tokenizer folder that is not valid JSON, and why; None when all are."""
    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".json") and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    json.load(handle)
            except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                return f"{path} is not valid JSON ({error})"
    return None


def check_tokenizer(tokenizer, where: str, vocab_size: Optional[int] = None) -> None:
    """Refuse a tokenizer with no ordinary token (every word would become the unknown token), or, given the text
    tower's ``vocab_size``, one whose token ids would not fit it. Fewer tokens than rows is allowed: vocabularies
    are padded to round sizes, and a tower built from a config may be wider than the tokenizer it is trained with."""
    size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_tokens", []))
    if size <= len(special):
        raise TokenizerMismatch(f"tokenizer {where} has only {size} tokens, all of them special "
                                f"({', '.join(sorted(special))}): its vocabulary file (tokenizer.json, vocab.txt ...) "
                                "is missing, and every word would become the unknown token")
    if vocab_size is not None and size > vocab_size:
        raise TokenizerMismatch(f"tokenizer {where} has {size} tokens, the text tower's vocabulary {vocab_size}: it is "
                                "not the tokenizer the tower was trained with")


def load_tokenizer(text_cfg: TextEncoderConfig, vocab_size: Optional[int] = None):
    """The Hugging Face tokenizer of ``text_cfg.tokenizer``, else of the weights folder ``text_cfg.pretrained``
    names, else of ``text_cfg.tag``; from local files only. Refused (``check_tokenizer``) when it has no ordinary
    token, or, given the text tower's ``vocab_size``, when its vocabulary does not match the tower's."""
    import transformers

    pretrained_dir = text_cfg.pretrained if isinstance(text_cfg.pretrained, str) else None
    name = text_cfg.tokenizer or pretrained_dir or text_cfg.tag
    path = resolve_tokenizer_path(name)
    if is_open_clip_tokenizer(path):  # model.arch: open_clip, or a model folder exported from one
        return load_open_clip_tokenizer(path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        bad_file = unreadable_json_file(path)
        if bad_file:
            raise TokenizerError(f"cannot load tokenizer {name!r}: {bad_file}") from None
        raise TokenizerError(f"cannot load tokenizer {name!r} (model.text_encoder.tokenizer or .tag) from local files; "
                             f"nothing is downloaded: give a local folder, a name already in the Hugging Face cache, "
                             f"or 'zvl_ds:demo_tokenizer' ({error})") from error
    check_tokenizer(tokenizer, path, vocab_size)
    return tokenizer


# LAVIS's blip_caption removes these characters (replaced by spaces, so the words around them stay apart)
_CAPTION_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def prepare_caption(caption: str, cfg: CaptionTextConfig) -> str:
    """``cfg.prompt`` + the caption, cleaned (``cfg.clean``) and cut to its first ``cfg.max_words`` words.

    Cleaning lower-cases, turns ``.!"()*#:;~`` into spaces and collapses every whitespace run (tabs and newlines
    too) into one space, without spaces at the ends. Words are what remains between single spaces. With the
    defaults the caption is returned unchanged."""
    if cfg.clean:
        caption = " ".join(_CAPTION_PUNCTUATION.sub(" ", caption.lower()).split())
    if cfg.max_words is not None:
        caption = " ".join(caption.split(" ")[:cfg.max_words])
    return cfg.prompt + caption if cfg.prompt else caption


def caption_preparer(cfg: CaptionTextConfig) -> Optional[Callable[[str], str]]:
    """``prepare_caption`` bound to ``cfg``, or None when it would change nothing (the default)."""
    if not cfg.clean and cfg.max_words is None and not cfg.prompt:
        return None
    return functools.partial(prepare_caption, cfg=cfg)  # a partial, not a lambda: loader workers may be spawned


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both long [len(texts), max_length]: padded to max_length, truncated."""
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return encoded["input_ids"].long(), encoded["attention_mask"].long()


class CaptionAugmenter:
    """ZeroVL's word-piece augmentation: each piece is selected with ``select_prob``; a selected piece becomes
    the mask token (``mask_prob``), a random vocabulary piece (``random_prob``) or is deleted (``delete_prob``).
    The pieces are joined back into text keeping at most ``max_pieces_per_word`` pieces of a word."""

    def __init__(self, cfg: CaptionAugConfig, tokenizer):
        for key in ("select_prob", "mask_prob", "random_prob", "delete_prob"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise ValueError(f"transforms.caption_aug.{key} must be in [0, 1], got {getattr(cfg, key)}")
        if cfg.mask_prob + cfg.random_prob + cfg.delete_prob > 1.0 + 1e-9:
            raise ValueError("transforms.caption_aug: mask_prob + random_prob + delete_prob must be <= 1")
        if cfg.max_pieces_per_word < 1:
            raise ValueError("transforms.caption_aug.max_pieces_per_word must be >= 1")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.mask_token = tokenizer.mask_token or "[MASK]"
        special = set(tokenizer.all_special_tokens)
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        self.random_pool = [token for token, _ in vocab
                            if token not in special and not (token.startswith("[") and token.endswith("]"))]

    def __call__(self, caption: str, rng: random.Random) -> str:
        cfg = self.cfg
        pieces: List[str] = []
        for piece in self.tokenizer.tokenize(caption):
            if rng.random() >= cfg.select_prob:
                pieces.append(piece)
                continue
            draw = rng.random()
            if draw < cfg.mask_prob:
                pieces.append(self.mask_token)
            elif draw < cfg.mask_prob + cfg.random_prob:
                pieces.append(rng.choice(self.random_pool) if self.random_pool else piece)
            elif draw < cfg.mask_prob + cfg.random_prob + cfg.delete_prob:
                continue
            else:
                pieces.append(piece)
        return self.tokenizer.convert_tokens_to_string(limit_pieces_per_word(pieces, cfg.max_pieces_per_word))


def limit_pieces_per_word(pieces: Sequence[str], limit: int) -> List[str]:
    """Drop the WordPiece continuations (``##x``) beyond ``limit`` pieces of one word."""
    kept: List[str] = []
    in_word = 0
    for piece in pieces:
        if piece.startswith("##") and kept:
            in_word += 1
            if in_word <= limit:
                kept.append(piece)
        else:
            in_word = 1
            kept.append(piece)
    return kept
