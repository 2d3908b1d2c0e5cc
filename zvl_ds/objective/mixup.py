"""Coin-flipping mixup (ZeroVL ``MixUpNCE``): one draw per optimizer step, shared by every rank.

Each step draws one lambda ~ Beta(beta, beta) and one coin. Heads mixes the images (pixels), tails mixes the
texts (projected embeddings, before L2 normalisation); never both. A sample's mixing partner is its mirror
position inside the batch the model forward sees (``x.flip(0)``), so the contrastive target of sample i puts
weight lambda on i and 1 - lambda on its partner, in both directions.

ZeroVL draws from one ``np.random.RandomState(2021)`` owned by the model, so the sequence depends on how many
steps ran before (a resume restarts it). Here the draw is a pure function of ``(seed, step)``: every rank gets
the same draw without communicating, and a resumed run repeats exactly what an uninterrupted one would do.
"""
from __future__ import annotations

import numpy as np
import torch

from zvl_ds.model.mixing import MixupDraw


def draw_mixup(seed: int, step: int, beta: float) -> MixupDraw:
    """The mixup of optimizer step ``step``: lambda ~ Beta(beta, beta), then the coin gamma ~ U(0, 1).

    gamma > 0.5 mixes images, otherwise texts (ZeroVL's rule). The generator is seeded by ``(seed, step)``.
    """
    if beta <= 0:
        raise ValueError(f"loss.mixup.beta must be > 0, got {beta}")
    if seed < 0 or step < 0:
        raise ValueError(f"draw_mixup needs a non-negative seed and step, got seed={seed} step={step}")
    rng = np.random.default_rng([seed, step])
    lam = float(rng.beta(beta, beta))
    gamma = float(rng.random())
    return MixupDraw(lam=lam, side="image" if gamma > 0.5 else "text")


def partner_index(global_batch: int, world_size: int, chunk: int) -> torch.Tensor:
    """Global index of each sample's mixup partner: the mirror position inside its chunk.

    Rank r holds global samples ``[r*b, (r+1)*b)`` with ``b = global_batch / world_size``, and forwards them in
    contiguous chunks of ``chunk`` samples (the DGA sub-batch, or the whole per-rank batch for the single-pass
    runner). Each forward mixes its batch with ``flip(0)`` of itself, so position p of a chunk pairs with
    position ``chunk - 1 - p``. Because ranks and chunks are contiguous, this is a reversal inside consecutive
    blocks of ``chunk`` global indices. The map is its own inverse, so the target matrix is symmetric.
    """
    if global_batch < 1 or world_size < 1 or chunk < 1:
        raise ValueError(f"partner_index needs positive sizes, got global_batch={global_batch} "
                         f"world_size={world_size} chunk={chunk}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
    per_rank = global_batch // world_size
    if per_rank % chunk:
        raise ValueError(f"the per-rank batch {per_rank} (= {global_batch} / {world_size} ranks) is not "
                         f"divisible by the chunk {chunk}")
    index = torch.arange(global_batch)
    start = (index // chunk) * chunk
    return start + (chunk - 1) - (index - start)
