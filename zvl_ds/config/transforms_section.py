"""The ``transforms:`` section: the image transforms of training and evaluation, their sizes, the normalisation, and
how captions are prepared (cleaning, shortening, prompt, word-piece augmentation); with the checks that concern this
section alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from zvl_ds.base.errors import ConfigError


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

    def check(self, where: str) -> None:
        """``where``: this section's key, ``transforms.caption_train`` or ``transforms.caption_eval``."""
        if self.max_words is not None and self.max_words < 1:
            raise ConfigError(f"{where}.max_words: must be >= 1 or null (all words), got {self.max_words}")


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

    def check(self) -> None:
        for role in ("caption_train", "caption_eval"):
            getattr(self, role).check(f"transforms.{role}")
