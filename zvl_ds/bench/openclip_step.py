"""OpenCLIP's contrastive training step with ``--accum-freq``, for side-by-side benchmarks with DGA.

open_clip_train's loop with ``accum_freq > 1``: embed every micro-batch without gradients and cache the
features; then, for each micro-batch, recompute it with gradients, put its fresh features in place of its
cached ones, compute ``ClipLoss`` over the whole batch and back-propagate; one optimizer step at the end. The
loss (a full batch x batch logit matrix) is thus computed once per micro-batch, dropout is not replayed, and the
logit scale collects the whole loss's gradient once per micro-batch (accum_freq times the full-batch gradient).

``ClipLoss`` is imported from ``open_clip`` when it is installed (the ``openclip`` extra); otherwise a copy of
its single-process computation below is used. ``clip_loss`` says which one ran.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MicroBatch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # normalised images, input ids, attention mask


def clip_loss_copy(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
                   ) -> torch.Tensor:
    """open_clip's ``ClipLoss`` in one process: symmetric cross-entropy of ``logit_scale`` x cosine logits."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clip_loss() -> Tuple[LossFn, str]:
    """open_clip's ``ClipLoss`` when importable, else ``clip_loss_copy``; with the name of the one chosen."""
    try:
        from open_clip.loss import ClipLoss
    except Exception:  # not installed, or one of its own imports (ftfy, regex, ...) missing
        return clip_loss_copy, "zvl_ds copy of open_clip ClipLoss (open_clip not importable)"
    loss = ClipLoss()
    return (lambda image, text, scale: loss(image, text, scale)), "open_clip.loss.ClipLoss"


def _features(model, micro_batch: MicroBatch):
    images, input_ids, attention_mask = micro_batch
    out = model(images=images, input_ids=input_ids, attention_mask=attention_mask)
    # open_clip's logit_scale multiplies the logits; zvl_ds's temperature divides them
    return out["image_embeds"], out["text_embeds"], 1.0 / out["temperature"]


def accum_freq_step(model, optimizer, micro_batches: Sequence[MicroBatch], loss_fn: LossFn,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                    ) -> torch.Tensor:
    """One optimizer step of open_clip_train's ``accum_freq > 1`` branch over ``micro_batches``; the loss."""
    cached_images: List[torch.Tensor] = []
    cached_texts: List[torch.Tensor] = []
    with torch.no_grad():
        for micro_batch in micro_batches:
            with autocast():
                image, text, _ = _features(model, micro_batch)
            cached_images.append(image)
            cached_texts.append(text)
    optimizer.zero_grad()
    loss = torch.zeros(())
    for index, micro_batch in enumerate(micro_batches):
        with autocast():
            image, text, logit_scale = _features(model, micro_batch)
            all_images = torch.cat(cached_images[:index] + [image] + cached_images[index + 1:])
            all_texts = torch.cat(cached_texts[:index] + [text] + cached_texts[index + 1:])
            loss = loss_fn(all_images, all_texts, logit_scale.reshape(()))
        loss.backward()
    optimizer.step()
    return loss.detach()
