"""Image-text retrieval metrics of embeddings: pure functions of tensors, no process group, no model.

Protocol (zero-shot retrieval as ZeroVL reports it; see docs/method.md). Images are de-duplicated by
``image_id`` (the first occurrence is kept); captions stay one per row, so a validation CSV with five captions
per image yields N images and 5N captions.

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
from typing import Dict, Tuple

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)


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


def chance_metrics(num_images: int, num_texts: int) -> Dict[str, float]:
    """Expected recalls (in %) of a random ranking, with captions spread evenly over the images.

    T2I: the one true image among ``num_images`` lands in the top K with probability K/N. I2T: an image with c
    captions among T finds one of them in the top K with probability 1 - C(T-c, K) / C(T, K).
    """
    per_image = max(1, round(num_texts / max(1, num_images)))
    metrics = {}
    for k in RECALL_KS:
        top = min(k, num_texts)
        metrics[f"i2t_r{k}"] = 100.0 * (1.0 - math.comb(num_texts - per_image, top) / math.comb(num_texts, top))
        metrics[f"t2i_r{k}"] = 100.0 * min(k, num_images) / num_images
    metrics["rsum"] = sum(metrics.values())
    return metrics


def top_captions(image_embeds: Tensor, text_embeds: Tensor, k: int = 3) -> Tensor:
    """Indices of the ``k`` highest-scoring captions for each image, best first."""
    k = min(k, text_embeds.shape[0])
    return (image_embeds.float() @ text_embeds.float().T).topk(k, dim=1).indices
