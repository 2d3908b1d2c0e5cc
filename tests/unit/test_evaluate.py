"""Retrieval metrics against hand-computed cases and an argsort reference, the retrieval-examples grid, and
chance-level metrics. Distributed evaluation and the evaluate tool are in tests/dist/test_evaluate_distributed.py."""
import numpy as np
import pytest
import torch

from zvl_ds.evaluation.grid import render_retrieval_grid
from zvl_ds.evaluation.metrics import retrieval_metrics, top_captions

T = torch.tensor

# A hand-checked case with ties and several captions per image (2-d, exact arithmetic).
#   images  I0(id 10)=[1,0]  I1(id 20)=[0,1]  I2(id 30)=[1,1]
#   captions c0->10 [1,0]  c1->10 [0,1]  c2->20 [1,0]  c3->30 [.5,.5]  c4->20 [0,.5]
IMAGES = T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
IMAGE_IDS = T([10, 20, 30])
TEXTS = T([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.0, 0.5]])
TEXT_IMAGE_IDS = T([10, 10, 20, 30, 20])
# I2T (best caption; ties with wrong captions count against the query):
#   I0 scores c0..c4 = 1,0,1,.5,0 ; best positive c0=1 ; wrong c2=1 ties      -> rank 2
#   I1 scores        = 0,1,0,.5,.5; best positive c4=.5; wrong c1=1, c3=.5    -> rank 3
#   I2 scores        = 1,1,1,1,.5 ; positive c3=1      ; wrong c0,c1,c2 tie   -> rank 4
I2T_RANKS = [2, 3, 4]
# T2I: c0 true I0=1, I2=1 ties -> 2 ; c1 true I0=0, all >= 0 -> 3 ; c2 true I1=0, all >= 0 -> 3 ;
#      c3 true I2=1, others .5 -> 1 ; c4 true I1=.5, I2=.5 ties -> 2
T2I_RANKS = [2, 3, 3, 1, 2]


def _expected(i2t, t2i, num_images, without_captions=0):
    out = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        ranks = np.array(ranks, dtype=float)
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks <= k))
        out[f"{prefix}_mean_rank"] = float(ranks.mean())
        out[f"{prefix}_median_rank"] = float(np.median(ranks))
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    out["num_images"] = float(num_images)
    out["num_texts"] = float(len(t2i))
    out["num_images_without_captions"] = float(without_captions)
    return out


def _assert_metrics(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_hand_computed_ties_and_several_captions():
    got = retrieval_metrics(IMAGES, IMAGE_IDS, TEXTS, TEXT_IMAGE_IDS)
    _assert_metrics(got, _expected(I2T_RANKS, T2I_RANKS, 3))
    assert got["i2t_r1"] == 0.0 and got["t2i_r1"] == 20.0 and got["rsum"] == 420.0
    assert got["t2i_mean_rank"] == pytest.approx(2.2)


def test_image_without_captions_is_a_distractor_not_a_query():
    # I3 (id 40) = [2,0] has no caption: I2T still has 3 queries; in T2I it outranks or ties where its score
    # is >= the true one: c0 (2>=1) -> 3, c1 (0>=0) -> 4, c2 (2>=0) -> 4, c3 (1>=1) -> 2, c4 (0<.5) -> 2
    images = torch.cat([IMAGES, T([[2.0, 0.0]])])
    got = retrieval_metrics(images, T([10, 20, 30, 40]), TEXTS, TEXT_IMAGE_IDS)
    _assert_metrics(got, _expected(I2T_RANKS, [3, 4, 4, 2, 2], 4, without_captions=1))


def test_duplicate_image_rows_keep_the_first_occurrence_and_order_does_not_matter():
    # id 20 appears three times (a padded sampler would do that); later copies are ignored even if they differ
    images = torch.cat([IMAGES[[2]], IMAGES[[1]], IMAGES[[0]], IMAGES[[1]], T([[5.0, 5.0]])])
    ids = T([30, 20, 10, 20, 20])
    perm = torch.tensor([3, 0, 4, 2, 1])
    got = retrieval_metrics(images, ids, TEXTS[perm], TEXT_IMAGE_IDS[perm])
    _assert_metrics(got, _expected(I2T_RANKS, [T2I_RANKS[i] for i in perm.tolist()], 3))


def test_single_image():
    got = retrieval_metrics(T([[0.6, 0.8]]), T([7]), T([[1.0, 0.0], [0.0, 1.0]]), T([7, 7]))
    _assert_metrics(got, _expected([1], [1, 1], 1))
    assert got["rsum"] == 600.0


def test_collapsed_model_gets_no_credit_from_ties():
    # every embedding equal: pessimistic ties put each true match behind all wrong candidates
    images, texts = torch.ones(12, 4), torch.ones(24, 4)
    ids = torch.arange(12)
    got = retrieval_metrics(images, ids, texts, ids.repeat(2))
    assert got["rsum"] == 0.0
    assert got["i2t_mean_rank"] == 23.0  # 22 wrong captions ahead of the best of its two
    assert got["t2i_mean_rank"] == 12.0


def test_missing_image_id_is_a_clear_error():
    with pytest.raises(ValueError, match=r"2 caption\(s\) refer to 2 image_id\(s\).*: 5, 99"):
        retrieval_metrics(IMAGES, IMAGE_IDS, torch.cat([TEXTS, TEXTS[:2]]), torch.cat([TEXT_IMAGE_IDS, T([99, 5])]))


@pytest.mark.parametrize("images, ids, texts, text_ids, message", [
    (torch.zeros(0, 2), T([], dtype=torch.long), TEXTS, TEXT_IMAGE_IDS, "at least one image"),
    (IMAGES, IMAGE_IDS, torch.zeros(0, 2), T([], dtype=torch.long), "at least one image and one caption"),
    (IMAGES, IMAGE_IDS[:2], TEXTS, TEXT_IMAGE_IDS, "3 image rows vs 2 ids"),
    (IMAGES, IMAGE_IDS, torch.ones(5, 3), TEXT_IMAGE_IDS, "differ in width"),
    (torch.full((3, 2), float("nan")), IMAGE_IDS, TEXTS, TEXT_IMAGE_IDS, "NaN or inf"),
])
def test_bad_inputs(images, ids, texts, text_ids, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, ids, texts, text_ids)


def _random_case(seed, num_images=37, captions_per_image=3, dim=16):
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=1)
    ids = torch.randperm(1000, generator=gen)[:num_images]
    text_ids = ids.repeat_interleave(captions_per_image)
    texts = torch.nn.functional.normalize(images.repeat_interleave(captions_per_image, 0)
                                          + 0.9 * torch.randn(len(text_ids), dim, generator=gen), dim=1)
    return images, ids, texts, text_ids


def _argsort_reference(images, ids, texts, text_ids):
    """Independent reference: float64 full matrix, descending argsort, position of the first true match."""
    sims = images.double().numpy() @ texts.double().numpy().T
    ids, text_ids = ids.numpy(), text_ids.numpy()
    i2t = [1 + int(np.flatnonzero(text_ids[np.argsort(-row, kind="stable")] == ids[i])[0])
           for i, row in enumerate(sims)]
    t2i = [1 + int(np.flatnonzero(ids[np.argsort(-col, kind="stable")] == text_ids[j])[0])
           for j, col in enumerate(sims.T)]
    return _expected(i2t, t2i, len(ids))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_argsort_reference_and_is_block_size_invariant(seed):
    images, ids, texts, text_ids = _random_case(seed)
    want = _argsort_reference(images, ids, texts, text_ids)
    assert 0 < want["i2t_r1"] < 100 and 0 < want["t2i_r1"] < 100  # a case where ranking actually matters
    for block_size in (1, 2, 7, 36, 37, 1024):
        _assert_metrics(retrieval_metrics(images, ids, texts, text_ids, block_size=block_size), want)


def test_top_captions():
    assert top_captions(IMAGES[[0]], TEXTS[[4, 3, 0]], k=2).tolist() == [[2, 1]]  # scores 0, .5, 1
    assert top_captions(IMAGES, TEXTS[:2], k=3).shape == (3, 2)


# ------------------------------------------------------------------------------------------------ grid

def test_render_retrieval_grid_places_images_and_marks_hits():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[0, 0] = 200  # red
    images[1, 2] = 180  # blue
    captions = [["a red square", "a blue square " * 20, "nothing"], ["x", "y", "z"]]
    correct = [[True, False, False], [False, False, False]]
    grid = render_retrieval_grid(images, captions, correct=correct, thumb_size=64, text_width=300)
    padding, row_height = 6, 64 + 12
    assert grid.dtype == np.uint8 and grid.shape == (2 * row_height, 64 + 300 + 18, 3)
    assert (grid[padding:padding + 64, padding:padding + 64] == [200, 0, 0]).all()
    assert (grid[row_height + padding:row_height + padding + 64, padding:padding + 64] == [0, 0, 180]).all()
    text_area = grid[:, 64 + 2 * padding:]
    green = text_area[..., 1].astype(int) - text_area[..., 0].astype(int) > 40  # grey text has R == G
    assert green[:row_height].sum() > 20  # the correct caption of row 0 is drawn in green
    assert green[row_height:].sum() == 0  # row 1 has no correct caption
    assert (text_area[row_height:].max(axis=2) > 100).sum() > 20  # but its captions are drawn
    assert (text_area[:, -2:] == [24, 24, 24]).all()  # a too-long caption is cut, not drawn past the edge


def test_render_retrieval_grid_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 images but 1 caption lists"):
        render_retrieval_grid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [["a"]])
    with pytest.raises(ValueError, match="uint8"):
        render_retrieval_grid(torch.zeros(1, 3, 8, 8), [["a"]])


def test_chance_metrics_hand_computed():
    from zvl_ds.evaluation.metrics import chance_metrics

    two = chance_metrics(num_images=2, num_texts=2)  # one caption each: a coin flip at K=1, certain at K>=2
    assert two["i2t_r1"] == pytest.approx(50.0) and two["t2i_r1"] == pytest.approx(50.0)
    assert two["i2t_r5"] == 100.0 and two["t2i_r10"] == 100.0
    # 200 images x 5 captions: T2I R@1 = 1/200; I2T R@1 = 5/1000; I2T R@5 = 1 - C(995,5)/C(1000,5)
    demo = chance_metrics(num_images=200, num_texts=1000)
    assert demo["t2i_r1"] == pytest.approx(0.5) and demo["i2t_r1"] == pytest.approx(0.5)
    expected = 1 - (995 * 994 * 993 * 992 * 991) / (1000 * 999 * 998 * 997 * 996)
    assert demo["i2t_r5"] == pytest.approx(100 * expected)
    assert demo["rsum"] == pytest.approx(sum(v for k, v in demo.items() if k != "rsum"))
