"""The distillation terms, tiled and memory-flat like the losses: a frozen teacher's view of the global batch as
soft targets for the student's logits. Each rank holds a strip of the logits: its own image rows against every
text column; only (chunk_rows x chunk_cols) tiles of student and teacher logits exist at a time, whatever B is.

Softmax (OpenCLIP's ``DistillClipLoss``). Student logits z = x y^T / tau, teacher logits t = s_T x' y'^T (x', y' the
teacher's embeddings of the same samples, s_T its logit scale). With P the teacher's softmax and log S the student's
log-softmax, over each row (image -> text) and each column (text -> image):

    L_d = (1 / B) sum_i 0.5 * (-sum_j P^row_ij log S^row_ij) + (1 / B) sum_j 0.5 * (-sum_i P^col_ij log S^col_ij)
    B L_d = 0.5 sum_i lse^row_i(z) + 0.5 sum_j lse^col_j(z) - 0.5 sum_ij (P^row_ij + P^col_ij) z_ij

so dB L_d / dz = G = 0.5 (S^row + S^col) - 0.5 (P^row + P^col). A first sweep over the tiles keeps online
log-sum-exps of z and t over rows and columns (the column ones combined over ranks, since every rank holds a strip
of rows); a second sweep recomputes each tile, forms G and accumulates the same closed-form gradients as the NCE
kernel (``softmax_loss``): images (G y / tau, complete), texts (G^T x / tau, this strip's part) and tau
(-(1 / tau^2) sum_i <x_i, (G y)_i>).

Sigmoid (the pairwise binary cross-entropy against the teacher's probabilities, ``bce``, the default; or the
formulation of MobileCLIP2's published ``DistillSigLipLoss``, ``mobileclip2``). Student logits u = t <x_i, y_j> + b,
teacher logits v = s_T <x'_i, y'_j> + b_T, and per pair

    bce:          l_ij = p_ij softplus(-u) + (1 - p_ij) softplus(u),  p = sigmoid(v)  dl/du = sigmoid(u) - p
    mobileclip2:  l_ij = -log sigmoid(y_ij u_ij),  y_ij = 2 sigmoid(v_ij) - 1      dl/du = -y sigmoid(-y u)

    L_d = (1 / B^2) sum_ij l_ij

the mean over the B x B pairs, as zvl_ds's SigLIP loss (``sigmoid_loss``). MobileCLIP2 (and SigLIP) sum over the
columns and average over the rows, B times this; the contrastive and distillation terms share the normalisation
either way, so their weights mean the same. One sweep: no normaliser is needed.

The teacher's numbers are constants (no gradient); this rank's teacher image rows and every teacher text enter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from zvl_ds.objective.kernel import ClosedFormGradients, all_reduce_, compute_dtype
from zvl_ds.objective.softmax_loss import _online_logsumexp


@dataclass
class DistillStrip:
    """One rank's strip of a distillation term (its image rows against every text column)."""

    loss_sum: torch.Tensor  # scalar: this rank's share of the summed term (B L_d softmax, B^2 L_d sigmoid)
    own_logit: torch.Tensor  # [n]: the student's own-pair similarity of each row (for the logged accuracies)
    row_max: torch.Tensor  # [n]: the row's largest student similarity
    column_max: torch.Tensor  # [B]: each column's largest student similarity over this strip's rows
    grad_images: Optional[torch.Tensor]  # [n, d]: complete
    grad_texts: Optional[torch.Tensor]  # [B, d]: this strip's part; sums over ranks
    grad_params: Optional[torch.Tensor]  # [1] tau's part (softmax), [2] (scale, bias) parts (sigmoid)


class _OnlineLse:
    """Running log-sum-exp of a stream of tiles along one axis: a running max and the sum of exp(x - max)."""

    def __init__(self, size: int, like: torch.Tensor):
        self.max = like.new_full((size,), -float("inf"))
        self.sum = like.new_zeros(size)

    def add(self, where: slice, tile: torch.Tensor, dim: int) -> None:
        new_max = torch.maximum(self.max[where], tile.amax(dim=dim))
        shift = new_max[:, None] if dim == 1 else new_max[None, :]
        self.sum[where] = _online_logsumexp(self.max[where], self.sum[where], torch.exp(tile - shift).sum(dim),
                                            new_max)
        self.max[where] = new_max

    def combine_over_ranks(self) -> None:
        """Every rank's partial statistics of the same entries: rescale each to the global max, then add."""
        local_max = self.max.clone()
        all_reduce_(self.max, torch.distributed.ReduceOp.MAX)
        all_reduce_(self.sum.mul_(torch.exp(local_max - self.max)))

    def value(self) -> torch.Tensor:
        return self.max + self.sum.log()


def _own_pairs(tile: torch.Tensor, start: int, stop: int, col: int, end: int, row_offset: int, own: torch.Tensor):
    """Copy the tile's own pairs (global row index == column index) into ``own`` (indexed by local row)."""
    first, last = max(start, col - row_offset), min(stop, end - row_offset)
    if first < last:
        device = tile.device
        own[first:last] = tile[torch.arange(first - start, last - start, device=device),
                               torch.arange(first + row_offset - col, last + row_offset - col, device=device)]


def softmax_distill_strip(images: torch.Tensor, texts: torch.Tensor, tau: torch.Tensor, teacher_images: torch.Tensor,
                          teacher_texts: torch.Tensor, teacher_scale: float, row_offset: int, chunk_rows: int,
                          chunk_cols: int, need_grads: bool) -> DistillStrip:
    """The softmax distillation term (module docstring) over the strip of global rows ``row_offset + i``."""
    n, global_batch = images.shape[0], texts.shape[0]
    width = chunk_cols if chunk_cols > 0 else global_batch
    inv_tau = 1.0 / tau
    student_rows, student_cols = _OnlineLse(n, images), _OnlineLse(global_batch, images)
    teacher_rows, teacher_cols = _OnlineLse(n, images), _OnlineLse(global_batch, images)
    own_logit = images.new_zeros(n)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        scaled, teacher_scaled = images[start:stop] * inv_tau, teacher_images[start:stop] * teacher_scale
        for col in range(0, global_batch, width):
            end = min(col + width, global_batch)
            logits = torch.mm(scaled, texts[col:end].t())
            _own_pairs(logits, start, stop, col, end, row_offset, own_logit)
            student_rows.add(slice(start, stop), logits, 1)
            student_cols.add(slice(col, end), logits, 0)
            del logits
            teacher_logits = torch.mm(teacher_scaled, teacher_texts[col:end].t())
            teacher_rows.add(slice(start, stop), teacher_logits, 1)
            teacher_cols.add(slice(col, end), teacher_logits, 0)
            del teacher_logits
    # the column maxima of z are tau times the similarities': kept for the logged t2i accuracy
    column_max = student_cols.max.clone()
    student_cols.combine_over_ranks()
    teacher_cols.combine_over_ranks()
    # exp(x - lse - log 2) = 0.5 softmax: the halves of G come out of the exps themselves
    half = math.log(2.0)
    row_lse, column_lse = student_rows.value(), student_cols.value()
    row_shift, column_shift = row_lse + half, column_lse + half
    teacher_row_shift, teacher_column_shift = teacher_rows.value() + half, teacher_cols.value() + half
    cross_sum = images.new_zeros(())
    grad_images = torch.empty_like(images) if need_grads else None
    grad_texts = torch.zeros_like(texts) if need_grads else None
    tau_sum = images.new_zeros(())
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        q = images[start:stop]
        scaled, teacher_scaled = q * inv_tau, teacher_images[start:stop] * teacher_scale
        grad_rows = torch.zeros_like(q) if need_grads else None
        for col in range(0, global_batch, width):
            end = min(col + width, global_batch)
            text_tile = texts[col:end]
            teacher_logits = torch.mm(teacher_scaled, teacher_texts[col:end].t())
            targets = torch.sub(teacher_logits, teacher_column_shift[None, col:end]).exp_()
            targets.add_(teacher_logits.sub_(teacher_row_shift[start:stop, None]).exp_())
            del teacher_logits
            logits = torch.mm(scaled, text_tile.t())
            cross_sum = cross_sum + (targets * logits).sum()  # 0.5 (P_row + P_col) . z
            if not need_grads:
                continue
            residual = torch.sub(logits, column_shift[None, col:end]).exp_()
            residual.add_(logits.sub_(row_shift[start:stop, None]).exp_()).sub_(targets)
            del logits, targets
            grad_rows.addmm_(residual, text_tile)
            grad_texts[col:end].addmm_(residual.t(), q)
            del residual
        if need_grads:
            tau_sum = tau_sum + (q * grad_rows).sum()  # per chunk: no [n, d] temporary
            grad_images[start:stop] = grad_rows.mul_(inv_tau)
    own_columns = slice(row_offset, row_offset + n)
    loss_sum = 0.5 * (row_lse.sum() + column_lse[own_columns].sum()) - cross_sum
    result = DistillStrip(loss_sum, own_logit, student_rows.max, column_max, None, None, None)
    if need_grads:
        result.grad_images, result.grad_texts = grad_images, grad_texts.mul_(inv_tau)
        result.grad_params = (-tau_sum * inv_tau * inv_tau).reshape(1)
    return result


def _sigmoid_pair_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: str):
    """(sum over the tile of l_ij, dl/du as a tile) of one sigmoid variant; ``teacher_logits`` is consumed."""
    if target == "mobileclip2":
        signs = teacher_logits.sigmoid_().mul_(2.0).sub_(1.0)  # y = 2 sigmoid(v) - 1
        signed = signs * student_logits
        loss = F.softplus(-signed).sum()  # -log sigmoid(y u)
        return loss, signed.neg_().sigmoid_().mul_(signs).neg_()  # -y sigmoid(-y u)
    if target == "bce":
        probabilities = teacher_logits.sigmoid_()
        # p softplus(-u) + (1 - p) softplus(u) = softplus(u) - p u
        loss = F.softplus(student_logits).sum() - (probabilities * student_logits).sum()
        return loss, student_logits.sigmoid().sub_(probabilities)
    raise ValueError(f"distill.sigmoid_target: unknown target {target!r} (bce, mobileclip2)")


def sigmoid_distill_strip(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                          teacher_images: torch.Tensor, teacher_texts: torch.Tensor, teacher_scale: float,
                          teacher_bias: float, target: str, row_offset: int, chunk_rows: int, chunk_cols: int,
                          need_grads: bool) -> DistillStrip:
    """The sigmoid distillation term's pair sum (module docstring) over the strip of global rows ``row_offset + i``;
    the gradients are those of the sum (the caller divides by B^2)."""
    n, global_batch = images.shape[0], texts.shape[0]
    width = chunk_cols if chunk_cols > 0 else global_batch
    loss_sum = images.new_zeros(())
    own_logit = images.new_zeros(n)
    row_max = images.new_full((n,), -float("inf"))
    column_max = images.new_full((global_batch,), -float("inf"))
    grad_images = torch.zeros_like(images) if need_grads else None
    grad_texts = torch.zeros_like(texts) if need_grads else None
    scale_sum, bias_sum = images.new_zeros(()), images.new_zeros(())
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        q, teacher_scaled = images[start:stop], teacher_images[start:stop] * teacher_scale
        for col in range(0, global_batch, width):
            end = min(col + width, global_batch)
            sims = torch.mm(q, texts[col:end].t())
            _own_pairs(sims, start, stop, col, end, row_offset, own_logit)
            row_max[start:stop] = torch.maximum(row_max[start:stop], sims.amax(dim=1))
            column_max[col:end] = torch.maximum(column_max[col:end], sims.amax(dim=0))
            logits = sims.mul_(scale).add_(bias)
            teacher_logits = torch.mm(teacher_scaled, teacher_texts[col:end].t()).add_(teacher_bias)
            tile_loss, residual = _sigmoid_pair_terms(logits, teacher_logits, target)
            loss_sum = loss_sum + tile_loss
            del logits, teacher_logits, sims
            if not need_grads:
                continue
            bias_sum = bias_sum + residual.sum()
            grad_images[start:stop].addmm_(residual, texts[col:end])
            grad_texts[col:end].addmm_(residual.t(), q)
            del residual
        if need_grads:  # sum_ij G_ij s_ij = sum_i <x_i, sum_j G_ij y_j>, per row chunk
            scale_sum = scale_sum + (q * grad_images[start:stop]).sum()
    result = DistillStrip(loss_sum, own_logit, row_max, column_max, None, None, None)
    if need_grads:
        result.grad_images, result.grad_texts = grad_images.mul_(scale), grad_texts.mul_(scale)
        result.grad_params = torch.stack([scale_sum, bias_sum])
    return result


class SoftmaxDistillFunction(ClosedFormGradients):
    """Autograd face of ``softmax_distill_strip``: differentiable in the student's images, texts and tau. Its
    gradients are this strip's part of the gradient of the summed term; summed over ranks (the texts through
    ``gather_with_grad``'s backward) they are exact."""

    @staticmethod
    def forward(ctx, images, texts, tau, teacher_images, teacher_texts, teacher_scale: float, row_offset: int,
                chunk_rows: int, chunk_cols: int):
        need_grads = any(ctx.needs_input_grad[:3])
        with torch.no_grad():
            strip = softmax_distill_strip(compute_dtype(images), compute_dtype(texts), compute_dtype(tau),
                                          compute_dtype(teacher_images), compute_dtype(teacher_texts),
                                          teacher_scale, row_offset, chunk_rows, chunk_cols, need_grads)
        ctx.dtypes = (images.dtype, texts.dtype, tau.dtype)
        if need_grads:
            ctx.save_for_backward(strip.grad_images, strip.grad_texts, strip.grad_params)
        ctx.mark_non_differentiable(strip.own_logit, strip.row_max, strip.column_max)
        return strip.loss_sum, strip.own_logit, strip.row_max, strip.column_max


class SigmoidDistillFunction(ClosedFormGradients):
    """Autograd face of ``sigmoid_distill_strip``: differentiable in the student's images, texts and (scale, bias)."""

    @staticmethod
    def forward(ctx, images, texts, scale_bias, teacher_images, teacher_texts, teacher_scale: float,
                teacher_bias: float, target: str, row_offset: int, chunk_rows: int, chunk_cols: int):
        need_grads = any(ctx.needs_input_grad[:3])
        with torch.no_grad():
            params = compute_dtype(scale_bias)
            strip = sigmoid_distill_strip(compute_dtype(images), compute_dtype(texts), params[0], params[1],
                                          compute_dtype(teacher_images), compute_dtype(teacher_texts),
                                          teacher_scale, teacher_bias, target, row_offset, chunk_rows, chunk_cols,
                                          need_grads)
        ctx.dtypes = (images.dtype, texts.dtype, scale_bias.dtype)
        if need_grads:
            ctx.save_for_backward(strip.grad_images, strip.grad_texts, strip.grad_params)
        ctx.mark_non_differentiable(strip.own_logit, strip.row_max, strip.column_max)
        return strip.loss_sum, strip.own_logit, strip.row_max, strip.column_max
