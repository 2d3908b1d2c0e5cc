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


def chance_metrics(num_images: int, num_texts: int) -> Dict[str, float]:
    """Expected recalls (in %) of a random ranking, with captions spread evenly over the images.

    T2I: the one true image among ``num_images`` lands in the top K with probability K/N. I2T: an image with c
    captions among T finds one of them in the top K with probability 1 - C(T-c, K) / C(T, K).
    """
    import math

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
# Embedding a validation set on every rank
# --------------------------------------------------------------------------------------------------


@dataclass
class EmbeddedSet:
    """A validation set's embeddings gathered from all ranks (each sample once), plus what the examples grid
    needs: caption tokens and the first few images (uint8)."""

    image_embeds: Tensor  # float32 [N, d]
    image_ids: Tensor  # long [N]
    text_embeds: Tensor  # float32 [M, d]
    text_image_ids: Tensor  # long [M]
    caption_ids: Tensor  # long [M]
    text_tokens: Optional[Tensor] = None  # long [M, L], kept when examples are wanted
    example_images: Optional[Tensor] = None  # uint8 [k, 3, S, S], the first images in rank order
    example_image_ids: Optional[Tensor] = None  # long [k]

    def metrics(self, block_size: int = 1024) -> Dict[str, float]:
        return retrieval_metrics(self.image_embeds, self.image_ids, self.text_embeds, self.text_image_ids,
                                 block_size)


def _gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's rows (rank order); ranks may hold different numbers of rows."""
    from zvl_ds import dist

    if not dist.is_distributed():
        return x
    import torch.distributed as tdist

    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    tdist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = dist.gather_no_grad(padded).split(max(counts))
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


@dataclass
class _Step:
    """What all ranks agree on before each forward of ``embed_validation``."""

    active: bool  # some rank still has a batch
    height: int
    width: int
    length: int  # caption tokens
    images: int  # images in this step over all ranks (for the progress bar)


def _agree_step(batch, device: torch.device) -> _Step:
    from zvl_ds import dist

    shape = torch.zeros(4, dtype=torch.long, device=device)
    count = torch.zeros(1, dtype=torch.long, device=device)
    if batch is not None:
        shape = torch.tensor([1, batch.images.shape[2], batch.images.shape[3], batch.input_ids.shape[1]],
                             dtype=torch.long, device=device)
        count[0] = batch.images.shape[0]
    if dist.is_distributed():
        import torch.distributed as tdist

        tdist.all_reduce(shape, op=tdist.ReduceOp.MAX)
        tdist.all_reduce(count, op=tdist.ReduceOp.SUM)
    active, height, width, length = shape.tolist()
    return _Step(bool(active), height, width, length, int(count))


@torch.no_grad()
def embed_validation(model, loader, device: torch.device, dtype: torch.dtype, norm_cfg, progress: bool = True,
                     num_examples: int = 0, keep_tokens: bool = False, desc: str = "embed") -> EmbeddedSet:
    """Embed this rank's share of ``loader`` and gather all ranks' results (each sample exactly once).

    All ranks call the model the same number of times with both modalities present: under ZeRO-3 every
    forward gathers parameters collectively, so a rank whose share ran out (or a batch without captions)
    runs a one-sample dummy whose output is dropped, instead of leaving the others waiting.
    """
    from zvl_ds import dist
    from zvl_ds.data import normalize_images

    rank = dist.get_rank()
    total = getattr(getattr(loader, "dataset", None), "size", None)
    bar = _progress_bar(progress and rank == 0, desc, total)
    iterator = iter(loader)
    parts: Dict[str, List[Tensor]] = {k: [] for k in ("image", "image_id", "text", "text_image_id", "caption_id",
                                                       "tokens")}
    examples: List[Tensor] = []
    example_ids: List[Tensor] = []
    width, image_hw = None, (0, 0)
    while True:
        batch = next(iterator, None)
        step = _agree_step(batch, device)
        if not step.active:
            break
        empty_images = torch.zeros(0, 3, step.height, step.width, dtype=torch.uint8)
        empty_tokens = torch.zeros(0, step.length, dtype=torch.long)
        images = batch.images if batch is not None else empty_images
        input_ids = batch.input_ids if batch is not None else empty_tokens
        mask = batch.attention_mask if batch is not None else empty_tokens
        n, m = images.shape[0], input_ids.shape[0]
        if n == 0:
            images = torch.zeros(1, 3, step.height, step.width, dtype=torch.uint8)
        if m == 0:
            input_ids = torch.zeros(1, step.length, dtype=torch.long)
            mask = torch.ones(1, step.length, dtype=torch.long)
        out = model(images=normalize_images(images, norm_cfg, device, dtype), input_ids=input_ids.to(device),
                    attention_mask=mask.to(device))
        image_embeds, text_embeds = out["image_embeds"].float(), out["text_embeds"].float()
        width, image_hw = image_embeds.shape[1], (step.height, step.width)
        bar.update(step.images)
        if batch is None:
            continue
        parts["image"].append(image_embeds[:n])
        parts["image_id"].append(batch.image_ids.to(device))
        parts["text"].append(text_embeds[:m])
        parts["text_image_id"].append(batch.caption_image_ids.to(device))
        parts["caption_id"].append(batch.caption_ids.to(device))
        if keep_tokens:
            parts["tokens"].append(batch.input_ids.to(device))
        if len(examples) < num_examples and n:
            take = min(n, num_examples - len(examples))
            examples.extend(batch.images[:take].cpu())
            example_ids.extend(batch.image_ids[:take].cpu())
    bar.close()
    if width is None:
        raise ValueError(f"{desc}: the validation set is empty on every rank (no images were read)")

    def joined(key: str, empty_shape: Tuple[int, ...], kind: torch.dtype) -> Tensor:
        local = torch.cat(parts[key]) if parts[key] else torch.zeros(empty_shape, dtype=kind, device=device)
        return _gather_rows(local)

    example_images = example_image_ids = None
    if num_examples > 0:  # the first images in rank order, so that rank 0 has some even when its share is empty
        size = (0, 3) + image_hw
        local = torch.stack(examples).to(device) if examples else torch.zeros(size, dtype=torch.uint8, device=device)
        local_ids = torch.stack(example_ids).to(device) if example_ids else torch.zeros(0, dtype=torch.long,
                                                                                         device=device)
        example_images = _gather_rows(local)[:num_examples].cpu()
        example_image_ids = _gather_rows(local_ids)[:num_examples].cpu()
    text_tokens = None
    if keep_tokens:
        max_len = _step_max(max((t.shape[1] for t in parts["tokens"]), default=0), device)
        parts["tokens"] = [torch.nn.functional.pad(t, (0, max_len - t.shape[1])) for t in parts["tokens"]]
        text_tokens = joined("tokens", (0, max_len), torch.long)
    return EmbeddedSet(
        image_embeds=joined("image", (0, width), torch.float32),
        image_ids=joined("image_id", (0,), torch.long),
        text_embeds=joined("text", (0, width), torch.float32),
        text_image_ids=joined("text_image_id", (0,), torch.long),
        caption_ids=joined("caption_id", (0,), torch.long),
        text_tokens=text_tokens,
        example_images=example_images,
        example_image_ids=example_image_ids,
    )


def _step_max(value: int, device: torch.device) -> int:
    from zvl_ds import dist

    if not dist.is_distributed():
        return value
    import torch.distributed as tdist

    tensor = torch.tensor([value], dtype=torch.long, device=device)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return int(tensor)


def _progress_bar(enabled: bool, desc: str, total: Optional[int]):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def retrieval_examples(embedded: EmbeddedSet, tokenizer, num_images: int = 8, k: int = 3) -> Optional[np.ndarray]:
    """The examples grid for ``embedded``'s example images: each with its top-``k`` captions (green = correct).

    Needs ``embed_validation(..., num_examples>0, keep_tokens=True)``; returns None when there are no images.
    """
    if embedded.example_images is None or embedded.text_tokens is None or num_images < 1:
        return None
    images = embedded.example_images[:num_images]
    image_ids = embedded.example_image_ids[:num_images]
    device = embedded.image_embeds.device
    # the example images' embeddings: the gathered row of each id (ids are unique after de-duplication)
    unique, ids = deduplicate_images(embedded.image_embeds, embedded.image_ids)
    rows = unique[torch.searchsorted(ids, image_ids.to(device))]
    top = top_captions(rows, embedded.text_embeds, k).cpu()
    tokens = embedded.text_tokens.cpu()
    text_ids = embedded.text_image_ids.cpu()
    captions = [[tokenizer.decode(tokens[j], skip_special_tokens=True) for j in row.tolist()] for row in top]
    correct = [[bool(text_ids[j] == image_id) for j in row.tolist()] for row, image_id in zip(top, image_ids)]
    return render_retrieval_grid(images, captions, correct)


# --------------------------------------------------------------------------------------------------
# Every validation set of a config
# --------------------------------------------------------------------------------------------------

def evaluate_with_examples(cfg, model, tokenizer, device: torch.device, dtype: torch.dtype,
                           names: Optional[Sequence[str]] = None, num_examples: int = 0, progress: bool = True
                           ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Optional[np.ndarray]]]:
    """Retrieval metrics for each validation set (``data.valid_name`` unless ``names``), identical on every
    rank, and on rank 0 an examples grid per set (``num_examples`` images; None elsewhere)."""
    from zvl_ds import dist
    from zvl_ds.data import build_valid_loader

    rank, world_size = dist.get_rank(), dist.get_world_size()
    was_training = model.training
    model.eval()
    metrics: Dict[str, Dict[str, float]] = {}
    grids: Dict[str, Optional[np.ndarray]] = {}
    try:
        for name in list(names or cfg.data.valid_name):
            loader = build_valid_loader(cfg, name, rank, world_size, tokenizer)
            embedded = embed_validation(model, loader, device, dtype, cfg.transforms.normalize, progress=progress,
                                        num_examples=num_examples, keep_tokens=num_examples > 0,
                                        desc=f"eval {name}")
            # one rank does the ranking; the others receive the numbers, or the error that stopped rank 0:
            # a failure there must not leave them waiting for a result that never comes
            result: List[Optional[Dict[str, float]]] = [None]
            failure: Optional[BaseException] = None
            grids[name] = None
            if rank == 0:
                try:
                    result[0] = embedded.metrics()
                    grids[name] = retrieval_examples(embedded, tokenizer, num_examples) if num_examples > 0 else None
                except Exception as error:  # noqa: BLE001  (shared below, then re-raised on every rank)
                    failure = error
                    result[0] = {"error": f"evaluation of {name} failed on rank 0: {type(error).__name__}: {error}"}
            if world_size > 1:
                import torch.distributed as tdist

                tdist.broadcast_object_list(result, src=0)
            if failure is not None:
                raise failure
            if "error" in result[0]:
                raise RuntimeError(result[0]["error"])
            metrics[name] = result[0]
    finally:
        model.train(was_training)
    return metrics, grids


def evaluate_retrieval(cfg, model, tokenizer, device: torch.device, dtype: torch.dtype,
                       names: Optional[Sequence[str]] = None, progress: bool = True) -> Dict[str, Dict[str, float]]:
    """``{dataset: {"i2t_r1", ..., "rsum", ...}}`` for every validation set; the same on every rank."""
    metrics, _ = evaluate_with_examples(cfg, model, tokenizer, device, dtype, names, 0, progress)
    return metrics


def log_retrieval_examples(monitor, grids: Dict[str, Optional[np.ndarray]], step: int) -> None:
    """Log each validation set's examples grid to TensorBoard (``eval/<name>/retrieval_examples``)."""
    for name, grid in grids.items():
        if grid is not None:
            monitor.image(f"eval/{name}/retrieval_examples", grid, step)


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


def _list_images(folder: str, classes: Sequence[str]) -> List[Tuple[str, int]]:
    import os

    samples = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(folder, name)
        for root, _, files in sorted(os.walk(class_dir)):
            samples.extend((os.path.join(root, f), label) for f in sorted(files)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
    return samples


@torch.no_grad()
def build_zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                               max_length: int, device: Optional[torch.device] = None,
                               batch_size: int = 256) -> Tensor:
    """A [d, C] matrix: column c is the normalised mean of the text embeddings of class c's prompts.

    ``templates`` mark the class name with ``{}`` (every occurrence is replaced: ``"a photo of a {}."``);
    prompts are tokenised as in training (``max_length`` = the config's ``model.max_length``). ``model`` is a
    DualEncoder (or anything with ``encode_text(input_ids, attention_mask)`` returning L2-normalised rows).
    """
    if not classnames or not templates:
        raise ValueError(f"need at least one class name and one template, got {len(classnames)} and "
                         f"{len(templates)}")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' for the class name; these have none: {bad}")
    from zvl_ds.data import tokenize

    device = device or _module_device(model)
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    embeds = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = tokenize(tokenizer, prompts[start:start + batch_size], max_length)
        embeds.append(model.encode_text(input_ids.to(device), attention_mask.to(device)).float())
    per_prompt = torch.cat(embeds).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1).T.contiguous()


def list_class_folder_images(folder: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(``(image path, class index)`` for every image under ``folder/<class>/``, class names = sorted folders)."""
    classes = list_class_folders(folder)
    samples = _list_images(folder, classes)
    if not samples:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {folder}")
    return samples, classes


def read_labelled_csv(path: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``image,label`` rows (a header row ``image,label`` is optional) -> (samples, class names sorted).

    Relative image paths are relative to the CSV's folder. A row without two fields is an error naming its line.
    """
    import csv
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV not found: {path}")
    rows: List[Tuple[str, str]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{path}:{line_no}: expected 'image,label', got {','.join(row)!r}")
            if line_no == 1 and [cell.strip().lower() for cell in row] == ["image", "label"]:
                continue
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise ValueError(f"{path} has no image,label rows")
    classes = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    base = os.path.dirname(os.path.abspath(path))
    return [(os.path.join(base, image), index[label]) for image, label in rows], classes


MAX_UNREADABLE_WARNINGS = 5  # per classification run; every unreadable image is counted all the same


def _load_images(paths: Sequence[str], preprocess, warnings_left: int) -> Tuple[List[Tensor], List[int], int]:
    """(preprocessed images, their positions in ``paths``, number unreadable); the first unreadable files are
    reported (``warnings_left``)."""
    from PIL import Image

    images, kept, skipped = [], [], 0
    for position, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                images.append(preprocess(image.convert("RGB")))
        except (OSError, ValueError) as error:  # unreadable, missing or truncated file: skip it, count it
            skipped += 1
            if skipped <= warnings_left:
                print(f"[zvl_ds] skipping unreadable image {path}: {error}", flush=True)
            continue
        kept.append(position)
    return images, kept, skipped


@torch.no_grad()
def count_hits(model, classifier: Tensor, samples: Sequence[Tuple[str, int]], preprocess, batch_size: int,
               device: torch.device, dtype: torch.dtype, num_batches: Optional[int] = None) -> Tensor:
    """``[top-1 hits, top-k hits, images seen, images skipped]`` (long) of ``samples`` against ``classifier``.

    Runs exactly ``num_batches`` forwards (default: as many as the samples need); a batch without a readable
    image runs one blank image whose result is dropped, so that every rank of a sharded model (ZeRO-3) takes
    part in the same number of forwards.
    """
    k = min(5, classifier.shape[1])
    classifier = classifier.to(device).float()
    counts = torch.zeros(4, dtype=torch.long)
    needed = -(-len(samples) // batch_size)
    for index in range(needed if num_batches is None else num_batches):
        chunk = samples[index * batch_size:(index + 1) * batch_size]
        images, kept, skipped = _load_images([path for path, _ in chunk], preprocess,
                                             MAX_UNREADABLE_WARNINGS - int(counts[3]))
        counts[3] += skipped
        if not images and num_batches is None:
            continue
        batch = torch.stack(images) if images else torch.zeros((1, 3) + _image_shape(preprocess))
        logits = model.encode_image(batch.to(device=device, dtype=dtype)).float() @ classifier
        if not images:
            continue
        top = logits.topk(k, dim=1).indices.cpu()
        target = torch.tensor([chunk[i][1] for i in kept]).unsqueeze(1)
        counts[0] += int((top[:, :1] == target).sum())
        counts[1] += int((top == target).any(dim=1).sum())
        counts[2] += len(kept)
    return counts


def _image_shape(preprocess) -> Tuple[int, int]:
    from PIL import Image

    return tuple(preprocess(Image.new("RGB", (8, 8))).shape[1:])  # type: ignore[return-value]


def accuracy_summary(counts: Tensor, num_classes: int, num_samples: int) -> Dict[str, float]:
    hits1, hits5, seen, skipped = (int(c) for c in counts)
    if seen == 0:
        raise ValueError(f"none of the {num_samples} image files could be read")
    return {"top1": 100.0 * hits1 / seen, "top5": 100.0 * hits5 / seen, "topk": float(min(5, num_classes)),
            "num_images": float(seen), "num_skipped": float(skipped), "num_classes": float(num_classes)}


def classify_samples(model, classifier: Tensor, samples: Sequence[Tuple[str, int]], preprocess,
                     batch_size: int = 64, device: Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """Zero-shot top-1/top-5 accuracy (%) of ``(image path, class index)`` samples against ``classifier`` [d, C].

    ``preprocess`` maps a PIL image to a normalised [3, S, S] tensor. Unreadable images are skipped and counted
    (``num_skipped``). With fewer than 5 classes, top-5 is top-C (reported as ``topk``).
    """
    device = device or _module_device(model)
    counts = count_hits(model, classifier, list(samples), preprocess, batch_size, device, dtype)
    return accuracy_summary(counts, classifier.shape[1], len(samples))


def classify_folder(model, classifier: Tensor, folder: str, preprocess, batch_size: int = 64,
                    device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    """``classify_samples`` on ``folder/<class>/<image>``; class c is the c-th sorted sub-folder."""
    classes = list_class_folders(folder)
    if classifier.shape[1] != len(classes):
        raise ValueError(f"classifier has {classifier.shape[1]} classes but {folder} has {len(classes)} class "
                         f"folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    samples, _ = list_class_folder_images(folder)
    return classify_samples(model, classifier, samples, preprocess, batch_size, device, dtype)


def chance_accuracy(num_classes: int) -> Dict[str, float]:
    """Expected top-1 / top-5 (%) of a random guess among ``num_classes`` classes."""
    return {"top1": 100.0 / num_classes, "top5": 100.0 * min(5, num_classes) / num_classes}


def _module_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Zero-shot classification sets of a config (data.zeroshot), every image once over the ranks
# --------------------------------------------------------------------------------------------------


def validation_preprocess(transforms_cfg):
    """PIL image -> normalised float32 [3, S, S] through the config's validation transforms (as the loader)."""
    import random

    from zvl_ds.data import normalize_images
    from zvl_ds.data.transforms import ImageTransform, load_rgb, to_uint8_chw

    transform = ImageTransform(transforms_cfg.valid_transforms, transforms_cfg)

    def preprocess(image) -> Tensor:
        image = load_rgb(image.copy())
        for op in transform.ops:
            image = op(image, random.Random(0))  # validation transforms draw nothing
        uint8 = to_uint8_chw(image.convert("RGB")).unsqueeze(0)
        return normalize_images(uint8, transforms_cfg.normalize, torch.device("cpu"), torch.float32)[0]

    return preprocess


def labelled_images(path: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """A folder laid out by class, or a CSV of image,label rows."""
    return read_labelled_csv(path) if path.lower().endswith(".csv") else list_class_folder_images(path)


def evaluate_zero_shot(cfg, model, tokenizer, device: torch.device, dtype: torch.dtype) -> Dict[str, Dict[str, float]]:
    """``{set: {"top1", "top5", ...}}`` for every ``data.zeroshot`` set, the same on every rank.

    Rank r classifies the samples r, r + W, r + 2W, ...; the counts are summed over the ranks, so every image
    is counted exactly once whatever the world size.
    """
    from zvl_ds import dist
    from zvl_ds.classify import prompt_names, read_templates

    rank, world_size = dist.get_rank(), dist.get_world_size()
    preprocess = validation_preprocess(cfg.transforms)
    batch_size = max(1, cfg.data.batch_size_val // world_size)
    was_training = model.training
    model.eval()
    results: Dict[str, Dict[str, float]] = {}
    try:
        for name, zs in cfg.data.zeroshot.items():
            samples, classes = labelled_images(zs.path)
            names = prompt_names(classes, zs.classes)
            classifier = build_zero_shot_classifier(model, tokenizer, names, read_templates(zs.templates),
                                                    cfg.model.max_length, device)
            mine = samples[rank::world_size]
            num_batches = torch.tensor([-(-len(mine) // batch_size)], dtype=torch.long, device=device)
            if world_size > 1:
                import torch.distributed as tdist

                tdist.all_reduce(num_batches, op=tdist.ReduceOp.MAX)
            counts = count_hits(model, classifier, mine, preprocess, batch_size, device, dtype, int(num_batches))
            if world_size > 1:
                counts = counts.to(device)
                tdist.all_reduce(counts)
            results[name] = accuracy_summary(counts.cpu(), len(classes), len(samples))
    finally:
        model.train(was_training)
    return results
