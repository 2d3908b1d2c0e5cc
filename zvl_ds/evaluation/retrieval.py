"""Retrieval evaluation of every validation set of a config: embed on all ranks, rank on rank 0, share the result.

The pieces: ``embed`` (distributed embedding), ``metrics`` (the recalls), ``grid`` (the TensorBoard examples).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as tdist

from zvl_ds.config import Config
from zvl_ds.data import build_valid_loader
from zvl_ds.data.sources import resolve_dataset
from zvl_ds.data.teacher_store import ShardEmbeddings, header_problem
from zvl_ds.evaluation.embed import EmbeddedSet, embed_validation
from zvl_ds.evaluation.grid import render_retrieval_grid
from zvl_ds.evaluation.metrics import deduplicate_images, retrieval_metrics, top_captions
from zvl_ds.runtime import dist


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


def evaluate_with_examples(cfg, model, tokenizer, device: torch.device, dtype: torch.dtype,
                           names: Optional[Sequence[str]] = None, num_examples: int = 0, progress: bool = True
                           ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Optional[np.ndarray]]]:
    """Retrieval metrics for each validation set (``data.valid_name`` unless ``names``), identical on every
    rank, and on rank 0 an examples grid per set (``num_examples`` images; None elsewhere)."""
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


def stored_teacher_metrics(cfg: Config, name: str, identity: Dict[str, str]
                           ) -> Tuple[Optional[Dict[str, float]], Optional[str]]:
    """A stored teacher's retrieval figures on validation set ``name``, from the embeddings stored beside its shards
    (its evaluation view of each image and of every caption: what evaluating the teacher itself gives, up to their
    fp16 rounding); each sample is one image. (None, why) when some shard has no complete embeddings of it."""
    dataset = resolve_dataset(cfg.data, name, cfg.data.valid_splits)
    for path in dataset.shards:
        problem = header_problem(path, identity)
        if problem is not None:
            return None, f"{path}: {problem}"
    images, image_ids, texts, owners = [], [], [], []
    first = 0
    for path in dataset.shards:
        stored = ShardEmbeddings.load(path)
        counts = stored.offsets[1:] - stored.offsets[:-1]
        ids = torch.arange(first, first + counts.numel())
        readable = torch.tensor([key not in stored.header.missing for key in stored.header.keys], dtype=torch.bool)
        images.append(stored.image[readable].float())
        image_ids.append(ids[readable])
        texts.append(stored.text.float())
        owners.append(ids.repeat_interleave(counts))
        first += counts.numel()
    return retrieval_metrics(torch.cat(images), torch.cat(image_ids), torch.cat(texts), torch.cat(owners)), None
