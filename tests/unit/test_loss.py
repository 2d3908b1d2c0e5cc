"""Single-process checks of the chunked loss, its cached-gradient form, and the mixup draws.

The reference everywhere is a plain full-batch PyTorch computation written here (B x B logits, explicit soft
targets, autograd), independent of zvl_ds.objective.softmax_loss. Multi-process checks live in tests/dist/test_dist_gather.py.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zvl_ds.objective.dense_reference import dense_contrastive_loss
from zvl_ds.objective.softmax_loss import contrastive_loss, loss_and_grads
from zvl_ds.model.mixing import MixupDraw, mix_images
from zvl_ds.objective.mixup import draw_mixup, partner_index


def reversed_blocks(batch: int, block: int) -> torch.Tensor:
    """Partner map written out independently: reverse each consecutive block of `block` indices."""
    out = []
    for start in range(0, batch, block):
        out.extend(reversed(range(start, start + block)))
    return torch.tensor(out)



def leaves(batch=11, dim=6, tau=0.05, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1).requires_grad_(True)
    text = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1).requires_grad_(True)
    temperature = torch.tensor([tau], dtype=dtype, requires_grad=True)
    return image, text, temperature


def assert_close_rel(actual, expected, rel=1e-5):
    scale = expected.abs().max().clamp(min=1e-12)
    assert (actual - expected).abs().max() <= rel * scale, (actual, expected)


MIXUPS = [None, MixupDraw(lam=0.3, side="image"), MixupDraw(lam=0.85, side="text")]


# ---------------------------------------------------------------------------------------------- loss


def test_hand_computed_two_pairs():
    # Orthogonal unit pairs at tau = 1: each row's logits are (1, 0) -> loss log(1 + e) - 1; both right.
    image = torch.eye(2)
    text = torch.eye(2)
    loss, out = contrastive_loss(image, text, torch.tensor([1.0]), mixup=None, partner=None,
                                 gather_backward=True, chunk_rows=1)
    assert loss.item() == pytest.approx(math.log(1 + math.e) - 1, abs=1e-6)
    assert out.loss.item() == pytest.approx(math.log(1 + math.e) - 1, abs=1e-6)
    assert (out.i2t_acc, out.t2i_acc) == (1.0, 1.0)
    # lam = 0.5 with the pair swapped in: every row is -0.5*(1) - 0.5*(0) + log(1 + e)
    _, mixed = contrastive_loss(image, text, torch.tensor([1.0]), mixup=MixupDraw(0.5, "image"),
                                partner=torch.tensor([1, 0]), gather_backward=True, chunk_rows=2)
    assert mixed.loss.item() == pytest.approx(math.log(1 + math.e) - 0.5, abs=1e-6)


def test_hand_computed_asymmetric_mixup():
    # lam = 0.8 tells the pair's own weight from its partner's (lam = 0.5 cannot). tau = 1, logits S = I T^T:
    # image 0 = (1, 0), image 1 = (0.6, 0.8), texts the unit axes, so S = [[1, 0], [0.6, 0.8]]; sample i puts
    # weight lam on itself and 1 - lam on the other sample, in both directions
    lam = 0.8
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    text = torch.eye(2, dtype=torch.float64)
    image_to_text = [-(lam * 1.0 + (1 - lam) * 0.0) + math.log(math.exp(1.0) + math.exp(0.0)),
                     -((1 - lam) * 0.6 + lam * 0.8) + math.log(math.exp(0.6) + math.exp(0.8))]
    text_to_image = [-(lam * 1.0 + (1 - lam) * 0.6) + math.log(math.exp(1.0) + math.exp(0.6)),
                     -((1 - lam) * 0.0 + lam * 0.8) + math.log(math.exp(0.0) + math.exp(0.8))]
    expected = (sum(image_to_text) / 2 + sum(text_to_image) / 2) / 2
    for side in ("image", "text"):
        for chunk_rows in (1, 2):
            loss, _ = contrastive_loss(image, text, torch.tensor([1.0], dtype=torch.float64),
                                       mixup=MixupDraw(lam, side), partner=torch.tensor([1, 0]),
                                       gather_backward=True, chunk_rows=chunk_rows)
            assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert dense_contrastive_loss(image, text, torch.tensor([1.0], dtype=torch.float64), lam,
                                  torch.tensor([1, 0])).item() == pytest.approx(expected, abs=1e-12)


def test_accuracy_counts_hard_top1():
    # texts 0 and 1 swapped relative to images: rows 0 and 1 wrong, row 2 right -> 1/3 both ways
    image = torch.eye(3)
    text = torch.eye(3)[[1, 0, 2]]
    _, out = contrastive_loss(image, text, torch.tensor([0.1]), mixup=None, partner=None,
                              gather_backward=True, chunk_rows=2)
    assert out.i2t_acc == pytest.approx(1 / 3)
    assert out.t2i_acc == pytest.approx(1 / 3)


@pytest.mark.parametrize("mixup", MIXUPS, ids=["nce", "mix_image", "mix_text"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 11, 50])
def test_chunked_equals_full_batch_reference(mixup, chunk_rows):
    image, text, tau = leaves()
    partner = reversed_blocks(11, 11) if mixup else None
    loss, out = contrastive_loss(image, text, tau, mixup=mixup, partner=partner, gather_backward=True,
                                 chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss, [image, text, tau])
    ref = dense_contrastive_loss(image, text, tau, None if mixup is None else mixup.lam, partner)
    ref_grads = torch.autograd.grad(ref, [image, text, tau])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for got, want in zip(grads, ref_grads):
        assert_close_rel(got, want, rel=1e-10)


@pytest.mark.parametrize("mixup", MIXUPS, ids=["nce", "mix_image", "mix_text"])
def test_chunk_sizes_agree_in_fp32(mixup):
    image, text, tau = leaves(batch=24, dim=16, dtype=torch.float32, seed=3)
    partner = partner_index(24, 1, 6) if mixup else None
    results = []
    for chunk_rows in (1, 5, 7, 24, 1000):
        cached = loss_and_grads(image, text, tau, mixup=mixup, partner=partner, chunk_rows=chunk_rows)
        results.append(cached)
    for other in results[1:]:
        assert other.output.loss.item() == pytest.approx(results[0].output.loss.item(), rel=1e-6)
        for field in ("image", "text", "loss_params"):
            assert_close_rel(getattr(other, field), getattr(results[0], field), rel=1e-5)


@pytest.mark.parametrize("mixup", MIXUPS, ids=["nce", "mix_image", "mix_text"])
def test_cached_gradients_equal_autograd(mixup):
    image, text, tau = leaves(batch=12, seed=5)
    partner = partner_index(12, 1, 4) if mixup else None
    cached = loss_and_grads(image, text, tau, mixup=mixup, partner=partner, chunk_rows=5)
    ref = dense_contrastive_loss(image, text, tau, None if mixup is None else mixup.lam, partner)
    ref_image, ref_text, ref_tau = torch.autograd.grad(ref, [image, text, tau])
    assert cached.output.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert_close_rel(cached.image, ref_image, rel=1e-10)
    assert_close_rel(cached.text, ref_text, rel=1e-10)
    assert cached.loss_params.shape == (1,)
    assert_close_rel(cached.loss_params, ref_tau, rel=1e-10)
    # the cached form takes detached inputs: nothing flows back into the caller's graph
    assert image.grad is None and tau.grad is None


@pytest.mark.parametrize("mixup", MIXUPS, ids=["nce", "mix_image", "mix_text"])
def test_column_tiles_equal_full_batch_reference_in_fp64(mixup):
    image, text, tau = leaves(batch=13, seed=21)
    partner = partner_index(13, 1, 13) if mixup else None
    ref = dense_contrastive_loss(image, text, tau, None if mixup is None else mixup.lam, partner)
    ref_grads = torch.autograd.grad(ref, [image, text, tau])
    for chunk_rows, chunk_cols in ((1, 1), (4, 3), (5, 7), (13, 13), (6, 100)):
        cached = loss_and_grads(image, text, tau, mixup=mixup, partner=partner, chunk_rows=chunk_rows,
                                chunk_cols=chunk_cols)
        assert cached.output.loss.item() == pytest.approx(ref.item(), rel=1e-6)  # logged in fp32
        for got, want in zip((cached.image, cached.text, cached.loss_params), ref_grads):
            assert_close_rel(got, want, rel=1e-10)


@pytest.mark.parametrize("mixup", MIXUPS, ids=["nce", "mix_image", "mix_text"])
def test_column_tiles_equal_row_chunks_in_fp32(mixup):
    image, text, tau = leaves(batch=40, dim=16, tau=0.01, dtype=torch.float32, seed=4)
    partner = partner_index(40, 1, 10) if mixup else None
    rows_only = loss_and_grads(image, text, tau, mixup=mixup, partner=partner, chunk_rows=7)
    for chunk_cols in (1, 3, 11, 40, 64):
        tiled = loss_and_grads(image, text, tau, mixup=mixup, partner=partner, chunk_rows=7, chunk_cols=chunk_cols)
        assert tiled.output.loss.item() == pytest.approx(rows_only.output.loss.item(), rel=1e-6)
        assert (tiled.output.i2t_acc, tiled.output.t2i_acc) == (rows_only.output.i2t_acc, rows_only.output.t2i_acc)
        for field in ("image", "text", "loss_params"):
            assert_close_rel(getattr(tiled, field), getattr(rows_only, field), rel=1e-5)


def test_column_tiles_stable_at_smallest_temperature():
    # the online log-sum-exp rescales its running sum: logits up to 1000 never reach exp unshifted
    image, text, tau = leaves(batch=16, dim=8, tau=0.001, dtype=torch.float32, seed=7)
    cached = loss_and_grads(image, text, tau, chunk_rows=3, chunk_cols=5)
    image64, text64, tau64 = (x.detach().double().requires_grad_(True) for x in (image, text, tau))
    ref = dense_contrastive_loss(image64, text64, tau64)
    ref_grads = torch.autograd.grad(ref, [image64, text64, tau64])
    assert cached.output.loss.item() == pytest.approx(ref.item(), rel=1e-4)
    for got, want in zip((cached.image, cached.text, cached.loss_params), ref_grads):
        assert_close_rel(got.double(), want, rel=1e-4)


def test_column_tile_accuracy_takes_the_first_maximum():
    # rows 0 and 1 tie on both text columns: argmax over a whole row picks the first column, and so must tiles
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    tau = torch.tensor([0.1])
    for chunk_cols in (0, 1):
        _, output = contrastive_loss(image, text, tau, chunk_rows=1, chunk_cols=chunk_cols)
        assert (output.i2t_acc, output.t2i_acc) == (0.5, 0.5)


def test_column_tile_accuracy_with_many_ties_equals_argmax():
    # one-hot embeddings from 3 directions: every row and column ties with others, before and after its own
    # index and across tiles; the tiled accuracy must be argmax's (first maximum) in both directions
    gen = torch.Generator().manual_seed(5)
    batch = 14
    image = F.one_hot(torch.randint(0, 3, (batch,), generator=gen), 4).double()
    text = F.one_hot(torch.randint(0, 3, (batch,), generator=gen), 4).double()
    text[::4] = image[::4]  # some own pairs reach the maximum
    logits = image @ text.t()
    hard = torch.arange(batch)
    want = ((logits.argmax(1) == hard).double().mean().item(), (logits.argmax(0) == hard).double().mean().item())
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    tau = torch.tensor([0.1], dtype=torch.float64)
    for chunk_rows, chunk_cols in ((1, 1), (2, 3), (5, 4), (14, 14), (3, 100), (4, 0)):
        _, output = contrastive_loss(image, text, tau, chunk_rows=chunk_rows, chunk_cols=chunk_cols)
        assert (output.i2t_acc, output.t2i_acc) == pytest.approx(want, abs=1e-12), (chunk_rows, chunk_cols)


def test_stable_at_smallest_temperature():
    # tau = 0.001: logits up to 1000 overflow a naive exp in fp32; log-sum-exp keeps everything finite
    image, text, tau = leaves(batch=16, dim=8, tau=0.001, dtype=torch.float32, seed=7)
    partner = partner_index(16, 1, 16)
    for mixup in (None, MixupDraw(0.4, "text")):
        cached = loss_and_grads(image, text, tau, mixup=mixup, partner=partner, chunk_rows=3)
        for tensor in (cached.output.loss, cached.image, cached.text, cached.loss_params):
            assert torch.isfinite(tensor).all()
        image64, text64, tau64 = (x.detach().double().requires_grad_(True) for x in (image, text, tau))
        ref = dense_contrastive_loss(image64, text64, tau64, None if mixup is None else mixup.lam, partner)
        ref_grads = torch.autograd.grad(ref, [image64, text64, tau64])
        assert cached.output.loss.item() == pytest.approx(ref.item(), rel=1e-4)
        for got, want in zip((cached.image, cached.text, cached.loss_params), ref_grads):
            assert_close_rel(got.double(), want, rel=1e-4)
    assert torch.isinf(torch.exp(torch.tensor(1000.0)))  # why a naive softmax would fail here


def test_gather_backward_off_equals_detached_keys():
    image, text, tau = leaves(batch=9, seed=11)
    loss, _ = contrastive_loss(image, text, tau, mixup=None, partner=None, gather_backward=False, chunk_rows=4)
    grads = torch.autograd.grad(loss, [image, text, tau])
    ref = dense_contrastive_loss(image, text, tau, detach_keys=True)
    ref_grads = torch.autograd.grad(ref, [image, text, tau])
    full_grads = torch.autograd.grad(dense_contrastive_loss(image, text, tau), [image, text])
    for got, want in zip(grads, ref_grads):
        assert_close_rel(got, want, rel=1e-10)
    # and it is NOT the full gradient: the key-side terms are missing
    assert (grads[0] - full_grads[0]).abs().max() > 1e-3 * full_grads[0].abs().max()


def test_bf16_embeddings_are_promoted_and_grads_keep_dtype():
    image, text, tau = leaves(batch=8, dim=8, dtype=torch.float32)
    image16 = image.detach().bfloat16().requires_grad_(True)
    loss, _ = contrastive_loss(image16, text, tau, mixup=None, partner=None, gather_backward=True, chunk_rows=3)
    assert loss.dtype == torch.float32
    loss.backward()
    assert image16.grad.dtype == torch.bfloat16 and torch.isfinite(image16.grad.float()).all()


def test_negative_chunk_cols_is_named():
    image, text, tau = leaves(batch=4)
    with pytest.raises(ValueError, match="chunk_cols"):
        contrastive_loss(image, text, tau, chunk_cols=-1)


def test_bad_inputs_are_named():
    image, text, tau = leaves(batch=4)
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(image, text[:3], tau, mixup=None, partner=None, gather_backward=True, chunk_rows=2)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(image, text, torch.ones(2), mixup=None, partner=None, gather_backward=True, chunk_rows=2)
    with pytest.raises(ValueError, match="chunk_rows"):
        contrastive_loss(image, text, tau, mixup=None, partner=None, gather_backward=True, chunk_rows=0)
    with pytest.raises(ValueError, match="own inverse"):
        contrastive_loss(image, text, tau, mixup=MixupDraw(0.5, "image"), partner=torch.tensor([1, 2, 3, 0]),
                         gather_backward=True, chunk_rows=2)
    with pytest.raises(ValueError, match="length 4"):
        contrastive_loss(image, text, tau, mixup=MixupDraw(0.5, "image"), partner=torch.tensor([1, 0]),
                         gather_backward=True, chunk_rows=2)


def test_default_partner_is_reversal_of_the_local_batch():
    image, text, tau = leaves(batch=6, seed=2)
    mixup = MixupDraw(0.2, "image")
    loss, _ = contrastive_loss(image, text, tau, mixup=mixup, partner=None, gather_backward=True, chunk_rows=4)
    ref = dense_contrastive_loss(image, text, tau, 0.2, torch.tensor([5, 4, 3, 2, 1, 0]))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------- mixup


def test_draw_is_a_function_of_seed_and_step():
    assert draw_mixup(2021, 7, 0.1) == draw_mixup(2021, 7, 0.1)
    draws = [draw_mixup(2021, step, 0.1) for step in range(50)]
    # differs across steps (Beta(0.1, 0.1) rounds to exactly 1.0 now and then, so a few lams may repeat)
    assert draw_mixup(2021, 7, 0.1) != draw_mixup(2021, 8, 0.1)
    assert len({d.lam for d in draws}) >= 45
    assert draw_mixup(2021, 7, 0.1) != draw_mixup(2022, 7, 0.1)
    assert {d.side for d in draws} == {"image", "text"}


def _beta_continued_fraction(x, a, b):
    """The continued fraction of the incomplete beta function, by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return fraction


def beta_cdf(x, a, b):
    """P(X <= x) for X ~ Beta(a, b): the regularised incomplete beta function, written out (no scipy)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean; reflect above it
        return 1.0 - beta_cdf(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a


def test_beta_cdf_matches_closed_forms():
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert beta_cdf(x, 1.0, 1.0) == pytest.approx(x, abs=1e-12)  # the uniform
        assert beta_cdf(x, 2.0, 2.0) == pytest.approx(3 * x ** 2 - 2 * x ** 3, abs=1e-12)
        assert beta_cdf(x, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-12)
    assert beta_cdf(0.5, 0.1, 0.1) == pytest.approx(0.5, abs=1e-12)  # symmetric


def kolmogorov_smirnov_distance(samples, cdf):
    """sup |empirical CDF - cdf| over the samples."""
    ordered = np.sort(samples)
    n = len(ordered)
    expected = np.array([cdf(value) for value in ordered])
    return max((np.arange(1, n + 1) / n - expected).max(), (expected - np.arange(n) / n).max())


# Kolmogorov-Smirnov at n = 4000 draws: the distance exceeds 1.95 / sqrt(n) = 0.031 with probability 1e-3 under
# the right distribution. Measured with seed 0: 0.014 (beta 0.1) and 0.021 (beta 2); drawn from Beta(1.5 beta,
# 1.5 beta) instead: 0.076 and 0.062, from Beta(beta / 1.5, beta / 1.5): 0.086 and 0.062.
MIXUP_DRAWS = 4000
KS_CRITICAL = 1.95 / math.sqrt(MIXUP_DRAWS)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_lambda_is_beta_distributed_and_coin_fair(beta):
    draws = [draw_mixup(0, step, beta) for step in range(MIXUP_DRAWS)]
    lams = np.array([d.lam for d in draws])
    distance = kolmogorov_smirnov_distance(lams, lambda x: beta_cdf(x, beta, beta))
    assert distance < KS_CRITICAL, f"lambda is not Beta({beta}, {beta}): KS distance {distance:.4f}"
    heads = np.mean([d.side == "image" for d in draws])
    assert abs(heads - 0.5) < 0.03


def test_draw_rejects_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        draw_mixup(0, 0, 0.0)
    with pytest.raises(ValueError, match="lam"):
        MixupDraw(1.5, "image")
    with pytest.raises(ValueError, match="side"):
        MixupDraw(0.5, "both")


def test_partner_index_hand_checked():
    assert partner_index(8, 2, 2).tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    assert partner_index(12, 2, 3).tolist() == [2, 1, 0, 5, 4, 3, 8, 7, 6, 11, 10, 9]
    assert partner_index(6, 1, 6).tolist() == [5, 4, 3, 2, 1, 0]
    assert partner_index(12, 3, 4).tolist() == reversed_blocks(12, 4).tolist()
    with pytest.raises(ValueError, match="world size"):
        partner_index(10, 3, 1)
    with pytest.raises(ValueError, match="chunk"):
        partner_index(12, 2, 4)


def test_mix_images_hand_checked():
    images = torch.stack([torch.full((3, 2, 2), float(v)) for v in (0.0, 1.0, 2.0)])
    mixed = mix_images(images, 0.25)
    # row i = 0.25 * x_i + 0.75 * x_(2-i)
    assert mixed[:, 0, 0, 0].tolist() == [1.5, 1.0, 0.5]
    assert torch.equal(mix_images(images, 1.0), images)
    with pytest.raises(ValueError, match="images"):
        mix_images(torch.zeros(3, 4), 0.5)


# ---------------------------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_benchmark_runs_both_methods_in_fresh_processes_and_skips_what_cannot_fit():
    from zvl_ds.bench.loss import benchmark_loss

    results = benchmark_loss(batch_sizes=(512,), dim=16, chunk_rows=100, verbose=False)
    chunked, naive = results["chunked@512"], results["naive@512"]
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-5)  # same loss, two implementations
    for result in (chunked, naive):
        assert result["seconds"] > 0 and result["peak_extra_bytes"] >= 0
    huge = benchmark_loss(batch_sizes=(10 ** 6,), dim=16, methods=("naive",), verbose=False)["naive@1000000"]
    assert "GiB available" in huge["skipped"]


@pytest.mark.slow  # three fresh interpreters and a B = 4096 loss in each: about 20 s on a 2-core CPU
def test_benchmark_kernels_agree_and_tiles_need_less_working_memory():
    from zvl_ds.bench.loss import benchmark_loss

    # One resident-size measurement per kernel, so the margins are set far above the few MiB by which a
    # process's resident size moves on its own (allocator arenas reusing the warm-up's pages, page granularity):
    # rows of 2048 x 4096 fp32 logits are a 32 MiB block plus a temporary of its size (measured 65 MiB), tiles of
    # 2048 x 64 are 512 KiB each (measured 2 MiB). The figures themselves belong to python -m zvl_ds.bench loss.
    results = benchmark_loss(batch_sizes=(4096,), dim=32, chunk_rows=2048, chunk_cols=64,
                             methods=("rows", "tiled", "siglip"), verbose=False)
    rows, tiled, siglip = results["rows@4096"], results["tiled@4096"], results["siglip@4096"]
    assert tiled["loss"] == pytest.approx(rows["loss"], rel=1e-5)  # same NCE loss, two tilings
    assert siglip["loss"] > 0 and siglip["seconds"] > 0
    assert rows["working_mib"] >= 32.0, rows  # at least the one logits block, whatever the allocator reuses
    assert tiled["working_mib"] < 16.0, tiled  # 16 MiB above the tiles: no noise of a few MiB crosses it
