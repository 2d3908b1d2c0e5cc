"""Symmetric InfoNCE (``NCE``) and coin-flipping ``MixUpNCE``, exact and memory-lean.

Definitions (ZeroVL's loss, mixup and gather; see docs/method.md). With B = global batch, L2-normalised image
rows I and text rows T, temperature tau (dividing), and targets Y:

    i2t_i = logsumexp_j(I_i . T_j / tau) - sum_j Y_ij I_i . T_j / tau       (image i against every text)
    t2i_j = logsumexp_i(T_j . I_i / tau) - sum_i Y_ji T_j . I_i / tau       (text j against every image)
    L     = (1 / B) sum_i 0.5 * (i2t_i + t2i_i)                             (the global-mean loss)

NCE uses Y = I (hard targets). MixUpNCE uses Y = lam * I + (1 - lam) * P with P[i, partner(i)] = 1; the
partner map is an involution, so Y is symmetric and serves both directions. Logged accuracies use hard targets.

Memory: rows are processed ``chunk_rows`` at a time; per chunk the logits (chunk x B) are turned in place into
``softmax - Y``, which gives the gradients of the queries, the keys and tau at once (closed form, below). With
``chunk_cols`` > 0 columns are tiled too, with an online log-sum-exp, so that only chunk_rows x chunk_cols logits
exist whatever B is; with gather-backward the two directions then share their tiles (``_symmetric_tiles``). No
(B x B) or autograd graph of logits is ever kept, and the result equals the unchunked computation.

    dL/dq_i  = (1 / tau) sum_j G_ij k_j          G = softmax(z) - Y,  z = q k^T / tau
    dL/dk_j  = (1 / tau) sum_i G_ij q_i
    dL/dtau  = -(1 / tau) sum_ij G_ij z_ij = -(1 / tau) sum_i q_i . dL/dq_i   (no second pass over z needed)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from zvl_ds.model.mixing import MixupDraw
from zvl_ds.objective.kernel import (CachedGrads, ClosedFormGradients, LossOutput, all_reduce_, check_embeddings,
                                     check_tiles, compute_dtype, pass1_gradients)
from zvl_ds.objective.mixup import partner_index
from zvl_ds.runtime.dist import gather_no_grad, gather_with_grad, get_rank, get_world_size

__all__ = ["CachedGrads", "LossOutput", "contrastive_loss", "loss_and_grads"]  # the first two live in kernel.py


@dataclass(frozen=True)
class _Targets:
    """Soft targets of query rows: weight ``lam`` on column ``self_cols[r]``, 1 - lam on ``partner_cols[r]``."""

    self_cols: torch.Tensor  # [n] long, the global index of each query row
    partner_cols: Optional[torch.Tensor]  # [n] long, or None for hard targets
    lam: float


@dataclass
class _RowBlockResult:
    loss_sum: torch.Tensor  # scalar: sum over the rows of the soft cross-entropy
    correct: torch.Tensor  # scalar long: rows whose arg-max is their own column
    grad_queries: Optional[torch.Tensor]
    grad_keys: Optional[torch.Tensor]
    grad_tau: Optional[torch.Tensor]


def _subtract_targets(residual: torch.Tensor, cols: torch.Tensor, start: int, weight: float) -> None:
    """``residual[r, cols[r] - start] -= weight`` for the rows whose target column lies in this tile, in place.

    Rows whose column lies elsewhere add 0 at a clamped index: no mask is read back to the host."""
    inside = (cols >= start) & (cols < start + residual.shape[1])
    index = (cols - start).clamp_(0, residual.shape[1] - 1)
    residual.scatter_add_(1, index[:, None], (inside.to(residual.dtype) * -weight)[:, None])


def _tiled_soft_cross_entropy_rows(queries: torch.Tensor, keys: torch.Tensor, tau: torch.Tensor,
                                   targets: _Targets, chunk_rows: int, chunk_cols: int, need_grads: bool,
                                   need_key_grads: bool = True) -> _RowBlockResult:
    """``_soft_cross_entropy_rows`` holding only (chunk_rows x chunk_cols) logits, whatever B is.

    Per row chunk, a first sweep over column tiles keeps an online log-sum-exp (running max and rescaled sum)
    and the running arg-max; a second sweep recomputes each tile, turns it into ``softmax - Y`` with the now
    known normaliser and accumulates the same closed-form gradients. The price is one extra (rows x cols x d)
    matmul per tile (4 instead of 3). It serves the plain gather (``gather_backward=False``), where each
    direction has its own constant keys; with gather-backward, ``_symmetric_tiles`` does both directions in
    fewer matmuls than row chunks.
    """
    need_key_grads = need_grads and need_key_grads
    n, num_keys = queries.shape[0], keys.shape[0]
    lam = targets.lam
    loss_sum = queries.new_zeros(())
    correct = torch.zeros((), dtype=torch.long, device=queries.device)
    grad_queries = torch.empty_like(queries) if need_grads else None
    grad_keys = torch.zeros_like(keys) if need_key_grads else None
    tau_sum = queries.new_zeros(())
    inv_tau = 1.0 / tau
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        q = queries[start:stop]
        self_cols = targets.self_cols[start:stop]
        partner_cols = targets.partner_cols[start:stop] if targets.partner_cols is not None else None
        running_max = q.new_full((stop - start,), -float("inf"))
        running_sum = q.new_zeros(stop - start)
        best_value = q.new_full((stop - start,), -float("inf"))
        best_col = torch.zeros(stop - start, dtype=torch.long, device=q.device)
        scaled = q * inv_tau  # [rows, d]: dividing here saves a pass over every tile
        for col in range(0, num_keys, chunk_cols):
            logits = torch.mm(scaled, keys[col:col + chunk_cols].t())
            tile_max, tile_arg = logits.max(dim=1)
            better = tile_max > best_value  # strict: the first maximum wins, as argmax over whole rows
            best_value = torch.where(better, tile_max, best_value)
            best_col = torch.where(better, tile_arg + col, best_col)
            new_max = torch.maximum(running_max, tile_max)
            running_sum = _online_logsumexp(running_max, running_sum, logits.sub_(new_max[:, None]).exp_().sum(1),
                                            new_max)
            running_max = new_max
            del logits
        log_norm = running_max + running_sum.log()
        target_logit = (q * keys[self_cols]).sum(1).mul_(inv_tau) * lam
        if partner_cols is not None:
            target_logit = target_logit + (q * keys[partner_cols]).sum(1).mul_(inv_tau) * (1.0 - lam)
        loss_sum = loss_sum + (log_norm - target_logit).sum()
        correct += (best_col == self_cols).sum()
        if not need_grads:
            continue
        grad_rows = torch.zeros_like(q)
        for col in range(0, num_keys, chunk_cols):
            key_tile = keys[col:col + chunk_cols]
            # the normaliser enters as the matmul's additive term: one pass over the tile, the exp
            residual = torch.addmm(-log_norm[:, None], scaled, key_tile.t()).exp_()
            _subtract_targets(residual, self_cols, col, lam)
            if partner_cols is not None:
                _subtract_targets(residual, partner_cols, col, 1.0 - lam)
            grad_rows.addmm_(residual, key_tile)
            if need_key_grads:
                grad_keys[col:col + chunk_cols].addmm_(residual.t(), q)
            del residual
        tau_sum = tau_sum + (q * grad_rows).sum()  # per chunk: no [n, d] temporary (see _symmetric_tiles)
        grad_queries[start:stop] = grad_rows.mul_(inv_tau)
    if need_key_grads:
        grad_keys.mul_(inv_tau)
    grad_tau = (-tau_sum * inv_tau * inv_tau).reshape(1) if need_grads else None
    return _RowBlockResult(loss_sum, correct, grad_queries, grad_keys, grad_tau)


@dataclass
class _StripResult:
    """One rank's strip of the logits (its image rows against every text column) under the symmetric loss."""

    loss_sum: torch.Tensor  # scalar: this rank's share of B * L (sums over ranks to B * L)
    i2t_correct: torch.Tensor  # scalar long: this rank's image rows whose arg-max is their own text
    t2i_correct: torch.Tensor  # scalar long: this rank's texts whose arg-max over ALL images is their own image
    grad_images: Optional[torch.Tensor]  # [n, d]: d(B * L)/d(this rank's images), complete
    grad_texts: Optional[torch.Tensor]  # [B, d]: this strip's part of d(B * L)/d(every text); sums over ranks
    grad_tau: Optional[torch.Tensor]  # [1]: this strip's part of d(B * L)/dtau; sums over ranks


def _online_logsumexp(running_max: torch.Tensor, running_sum: torch.Tensor, shifted_exp_sum: torch.Tensor,
                      new_max: torch.Tensor) -> torch.Tensor:
    """The running sum of exp(z - max) after a tile: the old sum rescaled to ``new_max``, plus the tile's."""
    return running_sum * torch.exp(running_max - new_max) + shifted_exp_sum


def _earlier_than_own(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[rows x cols] mask of the pairs whose column index is smaller than the row index (global indices)."""
    return cols[None, :] < rows[:, None]


def _symmetric_tiles(images: torch.Tensor, texts: torch.Tensor, tau: torch.Tensor, targets: _Targets,
                     row_offset: int, chunk_rows: int, chunk_cols: int, need_grads: bool) -> _StripResult:
    """Both directions of the loss from one strip of logits, z = images @ texts.T / tau, tile by tile.

    ``images`` are the global rows ``row_offset + i``; ``texts`` every column. i2t needs each row's log-sum-exp
    and t2i each column's: both come from the same tiles. A first sweep keeps online statistics (running max
    and rescaled sum of exp) of the rows and of the columns, and the own pairs' logits; the column ones are
    then combined over ranks, since every rank holds a strip of rows. With both normalisers known, a second
    sweep recomputes each tile and turns it into dL/dz, for symmetric targets Y

        G = 0.5 softmax_rows(z) + 0.5 softmax_columns(z) - Y,

    which gives the gradients of the images (complete: every column of their rows is here), of the texts (this
    strip's part) and of tau. Per tile: 4 matmuls of (rows x cols x d) for both directions together (the logits
    in each sweep, then the two gradients), where two row-wise passes need 6. Only chunk_rows x chunk_cols
    logits exist at a time.

    Accuracy is argmax's: a sample is a hit when its own pair reaches the maximum and no earlier index does.
    The second sweep looks for such earlier ties (a cheap compare on the tiles that hold earlier indices).
    """
    n, global_batch = images.shape[0], texts.shape[0]
    device = images.device
    lam = targets.lam
    inv_tau = 1.0 / tau
    column_ids = torch.arange(global_batch, device=device)
    row_ids = column_ids[row_offset:row_offset + n]
    # Pass 1: online statistics of the rows (per row chunk) and of the columns (whole strip)
    row_max = images.new_full((n,), -float("inf"))
    row_sum = images.new_zeros(n)
    own_logit = images.new_empty(n)  # z_ii from the tiles themselves, to compare with maxima taken from tiles
    column_max = images.new_full((global_batch,), -float("inf"))
    column_sum = images.new_zeros(global_batch)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        scaled = images[start:stop] * inv_tau
        for col in range(0, global_batch, chunk_cols):
            end = min(col + chunk_cols, global_batch)
            logits = torch.mm(scaled, texts[col:end].t())
            first, last = max(start, col - row_offset), min(stop, end - row_offset)  # own pairs in this tile
            if first < last:
                own_logit[first:last] = logits[torch.arange(first - start, last - start, device=device),
                                               torch.arange(first + row_offset - col, last + row_offset - col,
                                                            device=device)]
            tile_max = torch.maximum(row_max[start:stop], logits.amax(dim=1))
            row_sum[start:stop] = _online_logsumexp(row_max[start:stop], row_sum[start:stop],
                                                    torch.exp(logits - tile_max[:, None]).sum(1), tile_max)
            row_max[start:stop] = tile_max
            tile_max = torch.maximum(column_max[col:end], logits.amax(dim=0))
            column_sum[col:end] = _online_logsumexp(column_max[col:end], column_sum[col:end],
                                                    logits.sub_(tile_max[None, :]).exp_().sum(0), tile_max)
            column_max[col:end] = tile_max
            del logits
    # every rank's columns: rescale each rank's sums to the global maximum, then add them up
    local_column_max = column_max.clone()
    all_reduce_(column_max, torch.distributed.ReduceOp.MAX)
    all_reduce_(column_sum.mul_(torch.exp(local_column_max - column_max)))
    del local_column_max
    row_lse, column_lse = row_max + row_sum.log(), column_max + column_sum.log()
    # Loss: half the row and half the column normalisers of this rank's samples, minus the target logits of its
    # rows, which Y's symmetry lets a rank count for both directions (every target pair lies in some strip)
    target_sum = images.new_zeros(())
    grad_images = torch.empty_like(images) if need_grads else None
    grad_texts = torch.zeros_like(texts) if need_grads else None
    tau_sum = images.new_zeros(())
    row_tied = torch.zeros(n, dtype=torch.bool, device=device)  # an earlier column reaches the row's max
    column_tied = torch.zeros(global_batch, dtype=torch.bool, device=device)  # an earlier row reaches the max
    # exp(z - lse - log 2) = 0.5 softmax: the halves of G come out of the exps themselves
    row_shift, column_shift = row_lse + math.log(2.0), column_lse + math.log(2.0)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        q = images[start:stop]
        self_cols = targets.self_cols[start:stop]
        partner_cols = targets.partner_cols[start:stop] if targets.partner_cols is not None else None
        scaled = q * inv_tau  # as in pass 1, so each tile's logits are the same numbers as there
        target = own_logit[start:stop] * lam  # the own pairs' logits, kept from the tiles of pass 1
        if partner_cols is not None:
            target = target + (scaled * texts[partner_cols]).sum(1) * (1.0 - lam)
        target_sum = target_sum + target.sum()
        grad_rows = torch.zeros_like(q) if need_grads else None
        first_row, end_row = row_offset + start, row_offset + stop
        for col in range(0, global_batch, chunk_cols):
            end = min(col + chunk_cols, global_batch)
            text_tile = texts[col:end]
            logits = torch.mm(scaled, text_tile.t())
            if col < end_row - 1:  # some column here comes before some row's own column
                ties = logits >= row_max[start:stop, None]
                if end > first_row:
                    ties &= _earlier_than_own(row_ids[start:stop], column_ids[col:end])
                row_tied[start:stop] |= ties.any(dim=1)
            if end > first_row + 1:  # some row here comes before some column's own row
                ties = logits >= column_max[None, col:end]
                if col < end_row:
                    ties &= _earlier_than_own(column_ids[col:end], row_ids[start:stop]).t()
                column_tied[col:end] |= ties.any(dim=0)
            if not need_grads:
                continue
            residual = torch.sub(logits, column_shift[None, col:end]).exp_()
            residual.add_(logits.sub_(row_shift[start:stop, None]).exp_())
            del logits
            _subtract_targets(residual, self_cols, col, lam)
            if partner_cols is not None:
                _subtract_targets(residual, partner_cols, col, 1.0 - lam)
            grad_rows.addmm_(residual, text_tile)
            grad_texts[col:end].addmm_(residual.t(), q)
            del residual
        if need_grads:
            # dL/dtau = -(1 / tau^2) sum_i <x_i, (G T)_i>, per chunk so that no [n, d] temporary exists
            tau_sum = tau_sum + (q * grad_rows).sum()
            grad_images[start:stop] = grad_rows.mul_(inv_tau)
    all_reduce_(column_tied, torch.distributed.ReduceOp.MAX)
    own_columns = slice(row_offset, row_offset + n)
    loss_sum = 0.5 * (row_lse.sum() + column_lse[own_columns].sum()) - target_sum
    i2t_correct = ((own_logit >= row_max) & ~row_tied).sum()
    t2i_correct = ((own_logit >= column_max[own_columns]) & ~column_tied[own_columns]).sum()
    if not need_grads:
        return _StripResult(loss_sum, i2t_correct, t2i_correct, None, None, None)
    grad_texts.mul_(inv_tau)
    return _StripResult(loss_sum, i2t_correct, t2i_correct, grad_images, grad_texts,
                        (-tau_sum * inv_tau * inv_tau).reshape(1))


def _soft_cross_entropy_rows(queries: torch.Tensor, keys: torch.Tensor, tau: torch.Tensor, targets: _Targets,
                             chunk_rows: int, need_grads: bool, need_key_grads: bool = True,
                             chunk_cols: int = 0) -> _RowBlockResult:
    """Sum over query rows of the soft cross-entropy of ``queries @ keys.T / tau``, with exact gradients.

    Holds at most one (chunk_rows x B) logits block at a time; log-sum-exp keeps it finite at tiny tau.
    ``need_grads`` gives the query and tau gradients, plus the key gradient if ``need_key_grads``.
    ``chunk_cols`` > 0 tiles the columns too (see ``_tiled_soft_cross_entropy_rows``).
    """
    if chunk_cols > 0:
        return _tiled_soft_cross_entropy_rows(queries, keys, tau, targets, chunk_rows, chunk_cols, need_grads,
                                              need_key_grads)
    need_key_grads = need_grads and need_key_grads
    n, num_keys = queries.shape[0], keys.shape[0]
    lam = targets.lam
    loss_sum = queries.new_zeros(())
    correct = torch.zeros((), dtype=torch.long, device=queries.device)
    grad_queries = torch.empty_like(queries) if need_grads else None
    grad_keys = torch.zeros_like(keys) if need_key_grads else None
    inv_tau = 1.0 / tau
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        rows = torch.arange(stop - start, device=queries.device)
        q = queries[start:stop]
        self_cols = targets.self_cols[start:stop]
        logits = torch.mm(q, keys.t()).mul_(inv_tau)
        log_norm = torch.logsumexp(logits, dim=1)
        target_logit = logits[rows, self_cols] * lam
        if targets.partner_cols is not None:
            partner_cols = targets.partner_cols[start:stop]
            target_logit = target_logit + logits[rows, partner_cols] * (1.0 - lam)
        loss_sum = loss_sum + (log_norm - target_logit).sum()
        correct += (logits.argmax(dim=1) == self_cols).sum()
        if not need_grads:
            continue
        residual = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place: the block's only big buffer
        residual.index_put_((rows, self_cols), residual.new_full((stop - start,), -lam), accumulate=True)
        if targets.partner_cols is not None:
            residual.index_put_((rows, partner_cols), residual.new_full((stop - start,), lam - 1.0),
                                accumulate=True)
        grad_queries[start:stop] = torch.mm(residual, keys).mul_(inv_tau)
        if need_key_grads:
            grad_keys.addmm_(residual.t(), q)
        del residual, logits
    if need_key_grads:
        grad_keys.mul_(inv_tau)
    if need_grads:
        grad_tau = -(queries * grad_queries).sum().reshape(1) * inv_tau
    else:
        grad_tau = None
    return _RowBlockResult(loss_sum, correct, grad_queries, grad_keys, grad_tau)


class _ChunkedSoftCrossEntropy(ClosedFormGradients):
    """Autograd face of ``_soft_cross_entropy_rows``: one direction, queries against keys."""

    @staticmethod
    def forward(ctx, queries, keys, tau, targets: _Targets, chunk_rows: int, chunk_cols: int = 0):
        need_grads = any(ctx.needs_input_grad[:3])
        with torch.no_grad():
            result = _soft_cross_entropy_rows(compute_dtype(queries), compute_dtype(keys), compute_dtype(tau),
                                              targets, chunk_rows,
                                              need_grads, need_key_grads=ctx.needs_input_grad[1],
                                              chunk_cols=chunk_cols)
        ctx.dtypes = (queries.dtype, keys.dtype, tau.dtype)
        if need_grads:
            ctx.save_for_backward(result.grad_queries, result.grad_keys, result.grad_tau)
        ctx.mark_non_differentiable(result.correct)
        return result.loss_sum, result.correct


class _SymmetricTiledNCE(ClosedFormGradients):
    """Autograd face of ``_symmetric_tiles``: both directions from this rank's image rows against every text.

    Its gradients are this strip's part of the gradient of the summed loss, not the gradient of the value it
    returns; summed over ranks (the texts through ``gather_with_grad``'s backward) they are exact."""

    @staticmethod
    def forward(ctx, images, texts, tau, targets: _Targets, row_offset: int, chunk_rows: int, chunk_cols: int):
        need_grads = any(ctx.needs_input_grad[:3])
        with torch.no_grad():
            result = _symmetric_tiles(compute_dtype(images), compute_dtype(texts), compute_dtype(tau), targets,
                                      row_offset, chunk_rows, chunk_cols, need_grads)
        ctx.dtypes = (images.dtype, texts.dtype, tau.dtype)
        if need_grads:
            ctx.save_for_backward(result.grad_images, result.grad_texts, result.grad_tau)
        ctx.mark_non_differentiable(result.i2t_correct, result.t2i_correct)
        return result.loss_sum, result.i2t_correct, result.t2i_correct


def _check_inputs(image: torch.Tensor, text: torch.Tensor, temperature: torch.Tensor, chunk_rows: int,
                  chunk_cols: int = 0) -> None:
    check_embeddings(image, text, "contrastive loss")
    if temperature.numel() != 1:
        raise ValueError(f"temperature must hold one value (shape (1,)), got shape {tuple(temperature.shape)}")
    check_tiles(chunk_rows, chunk_cols)


def _resolve_partner(mixup: Optional[MixupDraw], partner: Optional[torch.Tensor], global_batch: int,
                     world_size: int, per_rank: int, device: torch.device) -> Optional[torch.Tensor]:
    """The partner map under mixup: given, or by default the reversal inside each rank's whole batch."""
    if mixup is None:
        return None
    if partner is None:
        partner = partner_index(global_batch, world_size, per_rank)
    partner = torch.as_tensor(partner, dtype=torch.long, device=device)
    if partner.shape != (global_batch,):
        raise ValueError(f"mixup partner must be a LongTensor of length {global_batch} (the global batch), "
                         f"got shape {tuple(partner.shape)}")
    if partner.min() < 0 or partner.max() >= global_batch:
        raise ValueError(f"mixup partner indices must lie in [0, {global_batch}), got range "
                         f"[{int(partner.min())}, {int(partner.max())}]")
    if not torch.equal(partner[partner], torch.arange(global_batch, device=device)):
        raise ValueError("mixup partner map must be its own inverse (partner[partner[i]] == i) so that the "
                         "soft targets are symmetric; use zvl_ds.objective.mixup.partner_index")
    return partner


def _local_targets(rank: int, per_rank: int, partner: Optional[torch.Tensor], mixup: Optional[MixupDraw],
                   device: torch.device) -> _Targets:
    self_cols = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=device)
    if mixup is None:
        return _Targets(self_cols, None, 1.0)
    return _Targets(self_cols, partner[self_cols], float(mixup.lam))


def _global_output(local_loss_sum: torch.Tensor, i2t_correct: torch.Tensor, t2i_correct: torch.Tensor,
                   global_batch: int) -> LossOutput:
    """One all-reduce of (loss sum, correct counts) gives every rank the same global figures."""
    stats = torch.stack([local_loss_sum.detach().double(), i2t_correct.double(), t2i_correct.double()])
    all_reduce_(stats)
    loss = (stats[0] / global_batch).float()
    return LossOutput(loss=loss, i2t_acc=float(stats[1]) / global_batch, t2i_acc=float(stats[2]) / global_batch)


def contrastive_loss(image_embeds_local: torch.Tensor, text_embeds_local: torch.Tensor,
                     temperature: torch.Tensor, *, mixup: Optional[MixupDraw] = None,
                     partner: Optional[torch.Tensor] = None, gather_backward: bool = True,
                     chunk_rows: int = 1024, chunk_cols: int = 0) -> Tuple[torch.Tensor, LossOutput]:
    """This rank's loss for the single-pass runner, and the global figures for logging.

    Local rows (b per rank) against the gathered global columns (B = b * world size), targets at the global
    indices; returns ``0.5 * (i2t + t2i)`` summed over local rows and divided by b. A data-parallel engine
    averages gradients over ranks, which then gives:

    - ``gather_backward=True``: exactly the gradient of the global-mean loss L, temperature included (the
      gathered columns carry gradient back to the ranks that own them, see ``gather_with_grad``).
    - ``gather_backward=False`` (ZeroVL's plain gather): the gathered columns, this rank's own included, are
      constants; each modality learns only in its query role. The gradient equals that of L computed with
      detached key columns: for embeddings, exactly the query-side half of the full gradient.

    ``mixup``: soft targets ``lam`` on the pair and ``1 - lam`` on ``partner`` (a global index map of length
    B; default: reversal inside each rank's batch, which is what the model's mixing does in a single pass).
    The embeddings are promoted to fp32 for the loss (fp64 stays fp64). ``chunk_cols`` > 0: logits tiles of
    chunk_rows x chunk_cols instead of chunk_rows x B (same result within rounding).
    """
    _check_inputs(image_embeds_local, text_embeds_local, temperature, chunk_rows, chunk_cols)
    world_size, rank = get_world_size(), get_rank()
    per_rank = image_embeds_local.shape[0]
    global_batch = per_rank * world_size
    device = image_embeds_local.device
    image_local = compute_dtype(image_embeds_local)
    text_local = compute_dtype(text_embeds_local)
    tau = compute_dtype(temperature).reshape(1)
    partner = _resolve_partner(mixup, partner, global_batch, world_size, per_rank, device)
    targets = _local_targets(rank, per_rank, partner, mixup, device)
    if chunk_cols > 0 and gather_backward:
        # both directions from one strip of tiles: this rank's images against every text (2/3 of the matmuls)
        local_sum, i2t_correct, t2i_correct = _SymmetricTiledNCE.apply(
            image_local, gather_with_grad(text_local), tau, targets, rank * per_rank, chunk_rows, chunk_cols)
        return local_sum / per_rank, _global_output(local_sum, i2t_correct, t2i_correct, global_batch)
    gather = gather_with_grad if gather_backward else gather_no_grad
    image_all = gather(image_local)
    text_all = gather(text_local)
    i2t_sum, i2t_correct = _ChunkedSoftCrossEntropy.apply(image_local, text_all, tau, targets, chunk_rows,
                                                          chunk_cols)
    t2i_sum, t2i_correct = _ChunkedSoftCrossEntropy.apply(text_local, image_all, tau, targets, chunk_rows,
                                                          chunk_cols)
    local_sum = 0.5 * (i2t_sum + t2i_sum)
    output = _global_output(local_sum, i2t_correct, t2i_correct, global_batch)
    return local_sum / per_rank, output


def loss_and_grads(image_embeds_local: torch.Tensor, text_embeds_local: torch.Tensor, temperature: torch.Tensor,
                   *, mixup: Optional[MixupDraw] = None, partner: Optional[torch.Tensor] = None,
                   chunk_rows: int = 1024, chunk_cols: int = 0) -> CachedGrads:
    """DGA's pass-1 gradients from this rank's detached embeddings: those of ``contrastive_loss``'s per-rank value
    with gather-backward, whose average over ranks is L (see ``kernel.CachedGrads``).

    ``image``/``text`` are complete: this rank's rows as queries plus its samples as keys in every rank's rows
    (gathered back by ``gather_with_grad``'s backward). ``loss_params`` is this rank's part of the tau gradient;
    the engine's average over ranks completes it. Gradients are fp32 (fp64 for fp64 inputs). ``partner``
    defaults as in ``contrastive_loss``; under DGA pass ``partner_index(B, world_size, chunk)`` with the per-rank
    chunk, since the model mixes within each chunk's forward.
    """
    def per_rank_loss(image, text, tau):
        return contrastive_loss(image, text, tau, mixup=mixup, partner=partner, gather_backward=True,
                                chunk_rows=chunk_rows, chunk_cols=chunk_cols)

    return pass1_gradients(per_rank_loss, image_embeds_local, text_embeds_local, temperature, params_shape=(1,))
