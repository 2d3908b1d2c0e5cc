"""What the softmax and the sigmoid loss kernels share: input checks, the compute dtype, the all-reduce, the autograd
face whose gradients come out of the forward, and DGA's pass-1 gradients.

Both kernels compute their gradients in closed form while they sweep the logits, so their autograd functions only
save those gradients and scale them in the backward (``ClosedFormGradients``). Each loss returns a per-rank value
whose AVERAGE over ranks is the global-mean loss L: that is the one place where the world size enters, and it is
what an engine that averages gradients over ranks (DeepSpeed) needs. DGA's cached gradients are the gradients of
that same per-rank value (``pass1_gradients``), so the step back-propagates them as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from zvl_ds.runtime.dist import get_world_size, is_distributed


@dataclass
class LossOutput:
    """What a step logs: identical on every rank."""

    loss: torch.Tensor  # scalar, detached: the global-mean loss (soft targets under mixup)
    i2t_acc: float  # top-1 over the global batch, image -> text
    t2i_acc: float  # top-1 over the global batch, text -> image
    # the terms of a loss made of several (distillation: contrastive_loss, distill_loss), each global and detached
    parts: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class CachedGrads:
    """DGA's pass-1 gradients of this rank's share of the loss, for an engine that averages over ranks: pass 2
    back-propagates them as they are, and the engine's average over ranks is the exact full-batch gradient."""

    image: torch.Tensor  # [b, d]: d(per-rank loss)/d(this rank's image embeddings), every rank's rows included
    text: torch.Tensor  # [b, d]: d(per-rank loss)/d(this rank's text embeddings)
    # the loss's learnable scalars: [1] for tau (softmax), [2] for (scale, bias) (sigmoid); back-propagate once
    loss_params: torch.Tensor
    output: LossOutput


def compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """fp32 at least (bf16/fp16 embeddings are promoted); fp64 stays fp64 (used by exactness tests)."""
    return x if x.dtype == torch.float64 else x.float()


def check_embeddings(image: torch.Tensor, text: torch.Tensor, loss_name: str) -> None:
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"{loss_name} needs image and text embeddings of the same shape [b, d], got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    if image.shape[0] == 0:
        raise ValueError(f"{loss_name} got an empty batch")


def check_tiles(chunk_rows: int, chunk_cols: int) -> None:
    if chunk_rows < 1:
        raise ValueError(f"loss.chunk_rows must be >= 1, got {chunk_rows}")
    if chunk_cols < 0:
        raise ValueError(f"loss.chunk_cols must be >= 0 (0 = whole rows), got {chunk_cols}")


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce in place over the ranks (SUM unless ``op``); a no-op in a single process."""
    if is_distributed() and get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=op if op is not None else torch.distributed.ReduceOp.SUM)
    return tensor


class ClosedFormGradients(torch.autograd.Function):
    """Shared backward of the kernels' autograd faces. Their forward computes the gradients of its first output
    with respect to its first three inputs (two embedding matrices and the loss's scalars) in the same pass over
    the logits and saves them; the backward only scales them and casts them back. Every further input is a
    non-tensor argument. Double backward is not supported."""

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grad_first, grad_second, grad_params = ctx.saved_tensors
        needs, dtypes = ctx.needs_input_grad, ctx.dtypes
        return ((grad_first * grad_loss).to(dtypes[0]) if needs[0] else None,
                (grad_second * grad_loss).to(dtypes[1]) if needs[1] else None,
                (grad_params * grad_loss).to(dtypes[2]) if needs[2] else None,
                *([None] * (len(needs) - 3)))


PerRankLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, LossOutput]]


def pass1_gradients(per_rank_loss: PerRankLoss, image_embeds_local: torch.Tensor, text_embeds_local: torch.Tensor,
                    loss_params: torch.Tensor, params_shape: Optional[Tuple[int, ...]] = None) -> CachedGrads:
    """The gradients of ``per_rank_loss`` (a loss's single-pass form, with gather-backward) at this rank's detached
    pass-1 embeddings and the loss's scalars, in the compute dtype."""
    image = compute_dtype(image_embeds_local.detach()).requires_grad_(True)
    text = compute_dtype(text_embeds_local.detach()).requires_grad_(True)
    params = compute_dtype(loss_params.detach())
    params = params.reshape(params_shape if params_shape is not None else params.shape).requires_grad_(True)
    with torch.enable_grad():
        local_loss, output = per_rank_loss(image, text, params)
        grad_image, grad_text, grad_params = torch.autograd.grad(local_loss, [image, text, params])
    return CachedGrads(image=grad_image, text=grad_text, loss_params=grad_params, output=output)
