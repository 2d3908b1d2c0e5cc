"""Zero-shot evaluation: image-text retrieval recalls (ZeroVL's protocol), a retrieval-examples image for
TensorBoard, and a zero-shot classifier built from the text tower.

Retrieval protocol (``zerovl-method.md`` section 8). Images are de-duplicated by ``image_id`` (the first
occurrence is kept); captions stay one per row.

* **I2T**: every image that has at least one caption ranks all captions; its rank is the rank of its best
  caption. Recall@K counts the image as a hit when any of its captions is within the top K.
* **T2I**: every caption ranks all unique images; Recall@K counts a hit when its own image is in the top K.

Ties are scored pessimistically: a query's rank is ``1 + (number of non-matching candidates whose similarity
is >= the best matching similarity)``. A tie with a wrong candidate therefore costs the query a place, so a
collapsed model (all embeddings equal) ranks last everywhere instead of being credited with hits, and the
result does not depend on the order of the candidates (which differs with the number of ranks).

An image without captions has nothing to retrieve, so it is not an I2T query; it stays a candidate
(distractor) for T2I and is counted in ``num_images_without_captions``. Captions whose ``image_id`` has no
image are an error. Recalls are percentages; RSUM is the sum of the six.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


# --------------------------------------------------------------------------------------------------
# Retrieval metrics
# --------------------------------------------------------------------------------------------------


def deduplicate_images(image_embeds: Tensor, image_ids: Tensor) -> Tuple[Tensor, Tensor]:
    """One row per ``image_id`` (the first occurrence), sorted by id."""
    sorted_ids, order = torch.sort(image_ids, stable=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return image_embeds[order[first]], sorted_ids[first]


def caption_image_index(unique_image_ids: Tensor, text_image_ids: Tensor) -> Tensor:
    """Position of each caption's image in the sorted unique ids; a caption without its image is an error."""
    position = torch.searchsorted(unique_image_ids, text_image_ids)
    clamped = position.clamp(max=max(unique_image_ids.numel() - 1, 0))
    found = (position < unique_image_ids.numel()) & (unique_image_ids[clamped] == text_image_ids)
    if not bool(found.all()):
        missing = torch.unique(text_image_ids[~found]).tolist()
        shown = ", ".join(str(i) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{int((~found).sum())} caption(s) refer to {len(missing)} image_id(s) with no image in "
                         f"the validation set: {shown}")
    return clamped


def _check_finite(name: str, embeds: Tensor) -> None:
    bad = ~torch.isfinite(embeds).all(dim=1)
    if bool(bad.any()):
        # NaN compares false with everything, which would rank a broken query first; refuse instead.
        raise ValueError(f"{int(bad.sum())} of {embeds.shape[0]} {name} embeddings contain NaN or inf "
                         "(has the model diverged?)")


def image_to_text_ranks(image_embeds: Tensor, text_embeds: Tensor, text_image_index: Tensor,
                        block_size: int = 1024) -> Tensor:
    """1-based rank of each image's best caption (pessimistic ties); -1 for images without captions."""
    num_images = image_embeds.shape[0]
    ranks = torch.full((num_images,), -1, dtype=torch.long, device=image_embeds.device)
    for start in range(0, num_images, block_size):
        rows = torch.arange(start, min(start + block_size, num_images), device=image_embeds.device)
        scores = image_embeds[rows] @ text_embeds.T  # [b, M]
        positive = text_image_index.unsqueeze(0) == rows.unsqueeze(1)
        best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ahead = ((scores >= best) & ~positive).sum(dim=1)
        has_caption = positive.any(dim=1)
        ranks[rows] = torch.where(has_caption, ahead + 1, ranks[rows])
    return ranks


def text_to_image_ranks(image_embeds: Tensor, text_embeds: Tensor, text_image_index: Tensor,
                        block_size: int = 1024) -> Tensor:
    """1-based rank of each caption's image among all unique images (pessimistic ties)."""
    num_texts = text_embeds.shape[0]
    ranks = torch.empty((num_texts,), dtype=torch.long, device=text_embeds.device)
    for start in range(0, num_texts, block_size):
        stop = min(start + block_size, num_texts)
        scores = text_embeds[start:stop] @ image_embeds.T  # [b, N]
        true_score = scores.gather(1, text_image_index[start:stop].unsqueeze(1))
        ranks[start:stop] = (scores >= true_score).sum(dim=1)  # counts the true image itself once
    return ranks


def _median(values: Tensor) -> float:
    """Median as numpy defines it: the mean of the two middle values for an even count."""
    ordered = torch.sort(values.double()).values
    n = ordered.numel()
    return float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)


def _rank_summary(prefix: str, ranks: Tensor) -> Dict[str, float]:
    summary = {f"{prefix}_r{k}": 100.0 * float((ranks <= k).double().mean()) for k in RECALL_KS}
    summary[f"{prefix}_mean_rank"] = float(ranks.double().mean())
    summary[f"{prefix}_median_rank"] = _median(ranks)
    return summary


def retrieval_metrics(image_embeds: Tensor, image_ids: Tensor, text_embeds: Tensor, text_image_ids: Tensor,
                      block_size: int = 1024) -> Dict[str, float]:
    """ZeroVL's zero-shot retrieval metrics (see the module docstring for the exact rules).

    ``image_embeds`` [N, d] may hold an image more than once (de-duplicated by ``image_ids``); ``text_embeds``
    [M, d] has one row per caption, ``text_image_ids`` [M] names its image. Embeddings are expected
    L2-normalised (similarity is the dot product). Only ``block_size`` x (M or N) similarities are held at once.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if image_embeds.shape[0] != image_ids.shape[0] or text_embeds.shape[0] != text_image_ids.shape[0]:
        raise ValueError(f"embeddings and ids disagree: {image_embeds.shape[0]} image rows vs {image_ids.shape[0]} "
                         f"ids, {text_embeds.shape[0]} text rows vs {text_image_ids.shape[0]} ids")
    if image_embeds.shape[0] == 0 or text_embeds.shape[0] == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {image_embeds.shape[0]} images "
                         f"and {text_embeds.shape[0]} captions")
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"image and text embeddings differ in width: {image_embeds.shape[1]} vs "
                         f"{text_embeds.shape[1]}")
    image_ids = image_ids.to(image_embeds.device).long()
    text_image_ids = text_image_ids.to(image_embeds.device).long()
    text_embeds = text_embeds.to(image_embeds.device).float()
    images, unique_ids = deduplicate_images(image_embeds.float(), image_ids)
    _check_finite("image", images)
    _check_finite("text", text_embeds)
    index = caption_image_index(unique_ids, text_image_ids)

    i2t = image_to_text_ranks(images, text_embeds, index, block_size)
    i2t = i2t[i2t > 0]  # images without captions are not queries; never empty since M >= 1
    t2i = text_to_image_ranks(images, text_embeds, index, block_size)

    metrics = {**_rank_summary("i2t", i2t), **_rank_summary("t2i", t2i)}
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    metrics["num_images"] = float(images.shape[0])
    metrics["num_texts"] = float(text_embeds.shape[0])
    metrics["num_images_without_captions"] = float(images.shape[0] - i2t.numel())
    return metrics


def top_captions(image_embeds: Tensor, text_embeds: Tensor, k: int = 3) -> Tensor:
    """Indices of the ``k`` highest-scoring captions for each image, best first."""
    k = min(k, text_embeds.shape[0])
    return (image_embeds.float() @ text_embeds.float().T).topk(k, dim=1).indices


# --------------------------------------------------------------------------------------------------
# Retrieval examples (an image grid for TensorBoard)
# --------------------------------------------------------------------------------------------------

_BACKGROUND = (24, 24, 24)
_HIT_COLOUR = (120, 230, 120)
_MISS_COLOUR = (225, 225, 225)


def _to_hwc_uint8(image) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"expected a CHW image with 1 or 3 channels, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {array.dtype}")
    array = np.transpose(array, (1, 2, 0))
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def _fit_line(draw, text: str, font, width: int) -> str:
    """Cut ``text`` with an ellipsis so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_retrieval_grid(images_uint8, captions_top3: List[List[str]],
                          correct: Optional[List[List[bool]]] = None, thumb_size: int = 128,
                          text_width: int = 520) -> np.ndarray:
    """One row per image: the image (scaled to ``thumb_size``) and its retrieved captions, best first.

    ``images_uint8`` is [n, 3, H, W] uint8 (tensor or array). Captions marked ``correct`` (belonging to the
    image) are drawn in green. Returns an HWC uint8 array (``SummaryWriter.add_image(..., dataformats="HWC")``).
    """
    from PIL import Image, ImageDraw, ImageFont

    if len(images_uint8) != len(captions_top3):
        raise ValueError(f"{len(images_uint8)} images but {len(captions_top3)} caption lists")
    if correct is not None and [len(c) for c in correct] != [len(c) for c in captions_top3]:
        raise ValueError("correct must have one flag per caption")
    font = ImageFont.load_default()
    line_height = font.getbbox("Hg")[3] + 4
    padding = 6
    row_height = thumb_size + 2 * padding
    canvas = Image.new("RGB", (thumb_size + text_width + 3 * padding, max(1, len(captions_top3)) * row_height),
                       _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, (image, captions) in enumerate(zip(images_uint8, captions_top3)):
        top = row * row_height + padding
        thumb = Image.fromarray(_to_hwc_uint8(image)).resize((thumb_size, thumb_size), Image.Resampling.BILINEAR)
        canvas.paste(thumb, (padding, top))
        y = top
        max_chars = max(8, text_width // 6)  # wrap estimate; each line is cut to the real pixel width below
        for rank, caption in enumerate(captions):
            hit = bool(correct[row][rank]) if correct is not None else False
            lines = textwrap.wrap(f"{rank + 1}. {caption}", width=max_chars)[:2] or [f"{rank + 1}."]
            for line in lines:
                if y + line_height > top + thumb_size:
                    break
                draw.text((thumb_size + 2 * padding, y), _fit_line(draw, line, font, text_width), font=font,
                          fill=_HIT_COLOUR if hit else _MISS_COLOUR)
                y += line_height
            y += 2
    return np.asarray(canvas, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------------


def list_class_folders(folder: str) -> List[str]:
    """Class names of an ImageFolder-style tree: its sub-folders, sorted (the class index order)."""
    import os

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders (expected FOLDER/<class>/<image files>)")
    return classes
