"""Embedding a validation set on every rank, each sample exactly once, safely under ZeRO-3.

Under ZeRO-3 every forward gathers the sharded parameters collectively, so all ranks must run the same number
of forwards with the same modalities even when their shares differ in length; ranks first agree on each step
(``_agree_step``) and the results are gathered in rank order with uneven row counts (``_gather_rows``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as tdist
from torch import Tensor
from tqdm.auto import tqdm

from zvl_ds.data import normalize_images
from zvl_ds.evaluation.metrics import retrieval_metrics
from zvl_ds.runtime import dist


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
    if not dist.is_distributed():
        return x

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

    shape = torch.zeros(4, dtype=torch.long, device=device)
    count = torch.zeros(1, dtype=torch.long, device=device)
    if batch is not None:
        shape = torch.tensor([1, batch.images.shape[2], batch.images.shape[3], batch.input_ids.shape[1]],
                             dtype=torch.long, device=device)
        count[0] = batch.images.shape[0]
    if dist.is_distributed():

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

    if not dist.is_distributed():
        return value

    tensor = torch.tensor([value], dtype=torch.long, device=device)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return int(tensor)


def _progress_bar(enabled: bool, desc: str, total: Optional[int]):

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)
