"""The pairwise sigmoid loss (``SigLIP``), exact under DGA and gather-backward, tiled over rows and columns.

Definition. With B = global batch, L2-normalised image rows x and text rows y, a scale t > 0 and a bias b:

    u_ij = t <x_i, y_j> + b,    z_ij = +1 if i == j else -1
    L    = (1 / B^2) sum_ij softplus(-z_ij u_ij)        (= -log sigmoid(z_ij u_ij), computed stably)

Normalisation: L is the MEAN over all B x B pairs. SigLIP's paper sums over the pairs and divides by B only
(sum over j, mean over i); that is B times this L, so its gradients are B times ours and its learning rates
correspond to ours times B. Dividing by B^2 keeps the loss value (about log 2 at a random start with b = 0)
and gradient scale independent of the batch.

Gradients in closed form. softplus(-z u)' = sigmoid(u) - [z = +1], so with G = sigmoid(U) - I:

    dL/dx_i = (t / B^2) sum_j G_ij y_j      dL/dy_j = (t / B^2) sum_i G_ij x_i
    dL/dt   = (1 / B^2) sum_ij G_ij <x_i, y_j> = (1 / t) sum_i <x_i, dL/dx_i>     dL/db = (1 / B^2) sum_ij G_ij

They are computed tile by tile (``chunk_rows`` x ``chunk_cols`` logits at a time; 0 columns = whole rows),
so neither a B x B matrix nor an autograd graph of logits ever exists. Both directions are in the one sum
(the loss is symmetric in images and texts), so each rank's image rows meet all gathered text columns once.

Mixup has no SigLIP variant here: its soft targets are defined for the softmax loss (``MixUpNCE``); a
half-positive pair under a sigmoid would be a new loss, not ZeroVL's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from zvl_ds.objective.kernel import (CachedGrads, ClosedFormGradients, LossOutput, all_reduce_, check_embeddings,
                                     check_tiles, compute_dtype, pass1_gradients)
from zvl_ds.runtime.dist import gather_with_grad, get_rank, get_world_size


@dataclass
class _TileResult:
    loss_sum: torch.Tensor  # scalar: sum over this rank's rows and all columns of softplus(-z u)
    diagonal: torch.Tensor  # [n]: <x_i, y_i> of this rank's rows, taken from the tiles (for accuracy)
    row_max: torch.Tensor  # [n]: max_j <x_i, y_j>
    column_max: torch.Tensor  # [B]: max over this rank's rows of <x_i, y_j>
    grad_queries: Optional[torch.Tensor]  # [n, d]: sum_j G_ij y_j * t (not yet divided by B^2)
    grad_keys: Optional[torch.Tensor]  # [B, d]: sum_i G_ij x_i * t
    grad_scale_bias: Optional[torch.Tensor]  # [2]: (sum G_ij s_ij, sum G_ij)


def _sigmoid_pairs(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                   row_offset: int, chunk_rows: int, chunk_cols: int, need_grads: bool) -> _TileResult:
    """Sums over query rows (global indices ``row_offset + i``) against every key column, one tile at a time."""
    n, num_keys = queries.shape[0], keys.shape[0]
    width = chunk_cols if chunk_cols > 0 else num_keys
    loss_sum = queries.new_zeros(())
    diagonal = queries.new_zeros(n)
    row_max = queries.new_full((n,), -float("inf"))
    column_max = queries.new_full((num_keys,), -float("inf"))
    grad_queries = torch.zeros_like(queries) if need_grads else None
    grad_keys = torch.zeros_like(keys) if need_grads else None
    bias_sum = queries.new_zeros(())
    scale_sum = queries.new_zeros(())
    for r0 in range(0, n, chunk_rows):
        r1 = min(r0 + chunk_rows, n)
        q = queries[r0:r1]
        for c0 in range(0, num_keys, width):
            c1 = min(c0 + width, num_keys)
            sims = torch.mm(q, keys[c0:c1].t())
            # the diagonal pairs of this tile: rows whose global index falls in [c0, c1)
            first = max(r0, c0 - row_offset)
            rows = torch.arange(first, max(first, min(r1, c1 - row_offset)), device=q.device)
            local_rows, cols = rows - r0, rows + row_offset - c0
            diagonal[rows] = sims[local_rows, cols]
            row_max[r0:r1] = torch.maximum(row_max[r0:r1], sims.max(dim=1).values)
            column_max[c0:c1] = torch.maximum(column_max[c0:c1], sims.max(dim=0).values)
            logits = sims.mul_(scale).add_(bias)  # in place: the tile's only big buffer besides softplus's
            # softplus(u) for every pair, minus u on the diagonal: softplus(-u) = softplus(u) - u
            loss_sum = loss_sum + F.softplus(logits).sum() - logits[local_rows, cols].sum()
            if not need_grads:
                continue
            residual = logits.sigmoid_()
            residual[local_rows, cols] -= 1.0
            bias_sum = bias_sum + residual.sum()
            grad_queries[r0:r1].addmm_(residual, keys[c0:c1])
            grad_keys[c0:c1].addmm_(residual.t(), q)
            del residual, logits, sims
        if need_grads:
            # sum_ij G_ij s_ij = sum_i <x_i, sum_j G_ij y_j>: no second pass over the similarities, and taken
            # per row chunk so that no [n, d] temporary exists
            scale_sum = scale_sum + (q * grad_queries[r0:r1]).sum()
    if not need_grads:
        return _TileResult(loss_sum, diagonal, row_max, column_max, None, None, None)
    grad_queries.mul_(scale)
    grad_keys.mul_(scale)
    return _TileResult(loss_sum, diagonal, row_max, column_max, grad_queries, grad_keys,
                       torch.stack([scale_sum, bias_sum]))


class _SigmoidPairsFunction(ClosedFormGradients):
    """Autograd face of ``_sigmoid_pairs``: gradients come out of the forward and are only scaled in the shared
    backward. Double backward is not supported."""

    @staticmethod
    def forward(ctx, queries, keys, scale_bias, row_offset: int, chunk_rows: int, chunk_cols: int):
        need_grads = any(ctx.needs_input_grad[:3])
        with torch.no_grad():
            sb = compute_dtype(scale_bias)
            result = _sigmoid_pairs(compute_dtype(queries), compute_dtype(keys), sb[0], sb[1], row_offset,
                                    chunk_rows, chunk_cols, need_grads)
        ctx.dtypes = (queries.dtype, keys.dtype, scale_bias.dtype)
        if need_grads:
            ctx.save_for_backward(result.grad_queries, result.grad_keys, result.grad_scale_bias)
        ctx.mark_non_differentiable(result.diagonal, result.row_max, result.column_max)
        return result.loss_sum, result.diagonal, result.row_max, result.column_max


def _check_inputs(image: torch.Tensor, text: torch.Tensor, scale_bias: torch.Tensor, chunk_rows: int,
                  chunk_cols: int) -> None:
    check_embeddings(image, text, "sigmoid loss")
    if scale_bias.shape != (2,):
        raise ValueError(f"sigmoid loss needs (scale, bias) as a tensor of shape (2,), got "
                         f"{tuple(scale_bias.shape)}")
    check_tiles(chunk_rows, chunk_cols)


def _global_output(local_sum: torch.Tensor, diagonal: torch.Tensor, row_max: torch.Tensor,
                   column_max: torch.Tensor, row_offset: int, global_batch: int) -> LossOutput:
    """Loss = sum / B^2 and top-1 accuracies (the own pair reaches the maximum; ties count as hits)."""
    column_max = all_reduce_(column_max.detach().clone(), torch.distributed.ReduceOp.MAX)
    own_columns = column_max[row_offset:row_offset + diagonal.shape[0]]
    stats = torch.stack([local_sum.detach().double(), (diagonal >= row_max).sum().double(),
                         (diagonal >= own_columns).sum().double()])
    all_reduce_(stats)
    return LossOutput(loss=(stats[0] / global_batch ** 2).float(), i2t_acc=float(stats[1]) / global_batch,
                      t2i_acc=float(stats[2]) / global_batch)


def sigmoid_loss(image_embeds_local: torch.Tensor, text_embeds_local: torch.Tensor, scale_bias: torch.Tensor,
                 *, chunk_rows: int = 1024, chunk_cols: int = 0) -> Tuple[torch.Tensor, LossOutput]:
    """This rank's share of L for the single-pass runner, and the global figures for logging.

    ``scale_bias``: the tensor (t, b), shape (2,), differentiable. This rank's image rows meet every gathered
    text column; the texts are gathered WITH gradient (the only way the text tower learns here). The returned
    value is this rank's pair sum divided by B^2 / world size, so an engine that averages gradients over ranks
    gets exactly dL (embeddings, t and b).
    """
    _check_inputs(image_embeds_local, text_embeds_local, scale_bias, chunk_rows, chunk_cols)
    world_size, rank = get_world_size(), get_rank()
    per_rank = image_embeds_local.shape[0]
    global_batch = per_rank * world_size
    text_all = gather_with_grad(compute_dtype(text_embeds_local))
    local_sum, diagonal, row_max, column_max = _SigmoidPairsFunction.apply(
        compute_dtype(image_embeds_local), text_all, compute_dtype(scale_bias), rank * per_rank, chunk_rows,
        chunk_cols)
    output = _global_output(local_sum, diagonal, row_max, column_max, rank * per_rank, global_batch)
    return local_sum * (world_size / global_batch ** 2), output


def sigmoid_loss_and_grads(image_embeds_local: torch.Tensor, text_embeds_local: torch.Tensor,
                           scale_bias: torch.Tensor, *, chunk_rows: int = 1024, chunk_cols: int = 0) -> CachedGrads:
    """DGA's pass-1 gradients from this rank's detached embeddings: those of ``sigmoid_loss``'s per-rank value,
    whose average over ranks is L (see ``kernel.CachedGrads``). ``loss_params`` holds this rank's part of
    dL/d(t, b), shape (2,), to back-propagate once per step."""
    def per_rank_loss(image, text, params):
        return sigmoid_loss(image, text, params, chunk_rows=chunk_rows, chunk_cols=chunk_cols)

    return pass1_gradients(per_rank_loss, image_embeds_local, text_embeds_local, scale_bias, params_shape=(2,))
