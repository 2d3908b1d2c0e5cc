"""The distillation terms against independent references, in one process and fp64: the textbook dense losses
(``dense_reference``), OpenCLIP's own ``DistillClipLoss`` (value and gradients), and MobileCLIP2's published
``DistillSigLipLoss`` formula; whole rows and tiles of every shape, with the student's loss and the weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from zvl_ds.objective.dense_reference import (dense_contrastive_loss, dense_sigmoid_distillation, dense_sigmoid_loss,
                                              dense_softmax_distillation)
from zvl_ds.objective.distill_loss import (DistilledLoss, TeacherEmbeddings, sigmoid_distillation,
                                           softmax_distillation)
from zvl_ds.objective.losses import SigmoidLoss, SoftmaxLoss

BATCH, DIM, TEACHER_DIM = 12, 8, 10
TILES = [(5, 0), (12, 0), (5, 3), (4, 5), (1, 1), (12, 12)]  # (chunk_rows, chunk_cols); 0 = whole rows
TEACHER_SCALE, TEACHER_BIAS = 20.0, -3.0


def embeddings(seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)

    def unit(rows, width):
        return F.normalize(torch.randn(rows, width, generator=generator, dtype=dtype), dim=1)

    return unit(BATCH, DIM), unit(BATCH, DIM), unit(BATCH, TEACHER_DIM), unit(BATCH, TEACHER_DIM)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def assert_same(actual, expected, tolerance=1e-12):
    for got, want in zip(actual, expected):
        scale = max(float(want.abs().max()), 1e-30)
        assert float((got - want).abs().max()) / scale <= tolerance


@pytest.mark.parametrize("chunk_rows,chunk_cols", TILES)
def test_softmax_distillation_equals_the_dense_term_and_its_gradients(chunk_rows, chunk_cols):
    image, text, teacher_image, teacher_text = embeddings()
    tau = torch.tensor([0.07], dtype=torch.float64)
    a, b, t = leaves(image, text, tau)
    value, output = softmax_distillation(a, b, t, teacher_image, teacher_text, TEACHER_SCALE, chunk_rows=chunk_rows,
                                         chunk_cols=chunk_cols)
    grads = torch.autograd.grad(value, [a, b, t])
    ra, rb, rt = leaves(image, text, tau)
    expected = dense_softmax_distillation(ra, rb, rt, teacher_image, teacher_text, TEACHER_SCALE)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-13)
    assert float(output.loss) == pytest.approx(float(expected.detach()), rel=1e-6)  # logged in fp32
    assert_same(grads, torch.autograd.grad(expected, [ra, rb, rt]))


@pytest.mark.parametrize("target", ["mobileclip2", "bce"])
@pytest.mark.parametrize("chunk_rows,chunk_cols", TILES)
def test_sigmoid_distillation_equals_the_dense_term_and_its_gradients(target, chunk_rows, chunk_cols):
    image, text, teacher_image, teacher_text = embeddings(1)
    scale_bias = torch.tensor([5.0, -2.0], dtype=torch.float64)
    a, b, p = leaves(image, text, scale_bias)
    value, output = sigmoid_distillation(a, b, p, teacher_image, teacher_text, TEACHER_SCALE, TEACHER_BIAS, target,
                                         chunk_rows=chunk_rows, chunk_cols=chunk_cols)
    grads = torch.autograd.grad(value, [a, b, p])
    ra, rb, rp = leaves(image, text, scale_bias)
    expected = dense_sigmoid_distillation(ra, rb, rp[0], rp[1], teacher_image, teacher_text, TEACHER_SCALE,
                                          TEACHER_BIAS, target)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-13)
    assert float(output.loss) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert_same(grads, torch.autograd.grad(expected, [ra, rb, rp]))


def test_the_default_sigmoid_target_is_the_cross_entropy_against_the_teachers_probabilities():
    """The issue's term, written out: -[p log sigmoid(u) + (1 - p) log sigmoid(-u)], p = sigmoid(v), the mean over
    the pairs; what ``sigmoid_distillation`` and ``DistilledLoss`` compute when no target is named."""
    image, text, teacher_image, teacher_text = embeddings(4)
    u = 5.0 * image @ text.t() - 2.0
    p = torch.sigmoid(TEACHER_SCALE * teacher_image @ teacher_text.t() + TEACHER_BIAS)
    written_out = -(p * F.logsigmoid(u) + (1 - p) * F.logsigmoid(-u)).mean()
    scale_bias = torch.tensor([5.0, -2.0], dtype=torch.float64)
    value, _ = sigmoid_distillation(image, text, scale_bias, teacher_image, teacher_text, TEACHER_SCALE, TEACHER_BIAS)
    assert float(value) == pytest.approx(float(written_out), rel=1e-12)
    loss = DistilledLoss(SigmoidLoss(), weight=1.0, contrastive_weight=0.0, teacher_scale=TEACHER_SCALE,
                         teacher_bias=TEACHER_BIAS)
    combined, _ = loss.single_pass(image, text, scale_bias, None, None,
                                   teacher=TeacherEmbeddings(teacher_image, teacher_text))
    assert float(combined) == pytest.approx(float(written_out), rel=1e-12)


def test_the_two_sigmoid_targets_differ_and_agree_on_hard_teachers():
    """MobileCLIP2's soft sign and the binary cross-entropy are different losses (at p = 1/2 the first is flat),
    and the same one where the teacher is certain (p in {0, 1}: y = +-1)."""
    image, text, teacher_image, teacher_text = embeddings(2)
    u = 5.0 * image @ text.t() - 2.0
    flat = dense_sigmoid_distillation(image, text, 5.0, -2.0, teacher_image, teacher_text, 0.0, 0.0, "mobileclip2")
    assert float(flat) == pytest.approx(math.log(2.0), rel=1e-12)  # y = 0: -log sigmoid(0), whatever the student
    bce = dense_sigmoid_distillation(image, text, 5.0, -2.0, teacher_image, teacher_text, 0.0, 0.0, "bce")
    assert abs(float(bce) - math.log(2.0)) > 1e-3
    hard = {target: dense_sigmoid_distillation(image, text, 5.0, -2.0, teacher_image, teacher_text, 0.0, 1e4,
                                               target) for target in ("mobileclip2", "bce")}
    assert float(hard["mobileclip2"]) == pytest.approx(float(hard["bce"]), rel=1e-12)
    assert float(hard["bce"]) == pytest.approx(float(F.softplus(-u).mean()), rel=1e-12)


def test_sigmoid_normalisation_against_mobileclip2s_published_formula():
    """MobileCLIP2's DistillSigLipLoss (apple/ml-mobileclip, training/open_clip_v2.patch) takes the teacher's logits
    v = s_T x' y'^T + b_T, the labels 2 sigmoid(v) - 1, and -log sigmoid(labels * u) summed over the columns and
    averaged over the rows: B times zvl_ds's mean over the B^2 pairs, as its SigLIP loss is B times ours."""
    image, text, teacher_image, teacher_text = embeddings(3)
    student = 5.0 * image @ text.t() - 2.0
    labels = 2.0 * torch.sigmoid(TEACHER_SCALE * teacher_image @ teacher_text.t() + TEACHER_BIAS) - 1.0
    published = -F.logsigmoid(labels * student).sum(dim=1).mean(dim=0)
    ours = dense_sigmoid_distillation(image, text, 5.0, -2.0, teacher_image, teacher_text, TEACHER_SCALE,
                                      TEACHER_BIAS, "mobileclip2")
    assert float(ours) * BATCH == pytest.approx(float(published), rel=1e-12)


def open_clip_loss():
    open_clip_loss_module = pytest.importorskip("open_clip.loss")
    return open_clip_loss_module.DistillClipLoss()


@pytest.mark.parametrize("chunk_rows,chunk_cols", [(5, 0), (5, 3)])
def test_softmax_distillation_equals_open_clips_distill_clip_loss(chunk_rows, chunk_cols):
    """The same embeddings through OpenCLIP's DistillClipLoss (logit scale = 1 / tau) and through ours: the distillation
    term and its gradients with respect to both embeddings and the student's logit scale."""
    image, text, teacher_image, teacher_text = embeddings(4)
    a, b = leaves(image, text)
    logit_scale = torch.tensor(1.0 / 0.07, dtype=torch.float64, requires_grad=True)
    _, theirs = open_clip_loss()(a, b, logit_scale, teacher_image, teacher_text,
                                 torch.tensor(TEACHER_SCALE, dtype=torch.float64))
    their_grads = torch.autograd.grad(theirs, [a, b, logit_scale])
    ra, rb = leaves(image, text)
    our_scale = torch.tensor(1.0 / 0.07, dtype=torch.float64, requires_grad=True)
    ours, _ = softmax_distillation(ra, rb, (1.0 / our_scale).reshape(1), teacher_image, teacher_text, TEACHER_SCALE,
                                   chunk_rows=chunk_rows, chunk_cols=chunk_cols)
    our_grads = torch.autograd.grad(ours, [ra, rb, our_scale])
    print(f"DistillClipLoss: value {float((ours - theirs).detach()):.1e}, gradients relative "
          + ", ".join(f"{float((g - w).abs().max() / w.abs().max()):.1e}" for g, w in zip(our_grads, their_grads)))
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-13)
    assert_same(our_grads, their_grads)


@pytest.mark.parametrize("contrastive_weight", [0.0, 0.5])
def test_distilled_loss_equals_open_clips_weighted_sum_under_dga(contrastive_weight):
    """``DistilledLoss`` (the step's interface) against OpenCLIP's two terms with the weights: the single-pass value,
    and DGA's cached gradients (those of the same value, at pass 1's embeddings)."""
    image, text, teacher_image, teacher_text = embeddings(5)
    loss = DistilledLoss(SoftmaxLoss(chunk_rows=5, chunk_cols=3), weight=0.7, contrastive_weight=contrastive_weight,
                         teacher_scale=TEACHER_SCALE)
    teacher = TeacherEmbeddings(teacher_image, teacher_text)
    a, b = leaves(image, text)
    logit_scale = torch.tensor(1.0 / 0.07, dtype=torch.float64, requires_grad=True)
    contrastive, distill = open_clip_loss()(a, b, logit_scale, teacher_image, teacher_text,
                                            torch.tensor(TEACHER_SCALE, dtype=torch.float64))
    theirs = contrastive_weight * contrastive + 0.7 * distill
    their_image, their_text, their_scale = torch.autograd.grad(theirs, [a, b, logit_scale])
    tau = torch.tensor([0.07], dtype=torch.float64)
    cached = loss.loss_and_grads(image, text, tau, None, None, teacher=teacher)
    value, output = loss.single_pass(image, text, tau, None, None, teacher=teacher)
    assert float(value) == pytest.approx(float(theirs.detach()), rel=1e-12)
    assert float(output.loss) == pytest.approx(float(theirs.detach()), rel=1e-6)
    assert float(output.parts["distill_loss"]) == pytest.approx(float(distill.detach()), rel=1e-6)
    assert ("contrastive_loss" in output.parts) == (contrastive_weight > 0)
    assert_same([cached.image, cached.text], [their_image, their_text])
    # d/dtau from d/d(logit scale): the scale is 1 / tau
    assert float(cached.loss_params) == pytest.approx(float(their_scale) * -1.0 / 0.07 ** 2, rel=1e-12)


def test_sigmoid_distilled_loss_is_the_weighted_sum_of_the_dense_terms():
    image, text, teacher_image, teacher_text = embeddings(6)
    loss = DistilledLoss(SigmoidLoss(chunk_rows=4, chunk_cols=5), weight=2.0, contrastive_weight=0.3,
                         teacher_scale=TEACHER_SCALE, teacher_bias=TEACHER_BIAS, sigmoid_target="bce")
    scale_bias = torch.tensor([6.0, -4.0], dtype=torch.float64)
    cached = loss.loss_and_grads(image, text, scale_bias, None, None,
                                 teacher=TeacherEmbeddings(teacher_image, teacher_text))
    a, b, p = leaves(image, text, scale_bias)
    dense = (0.3 * dense_sigmoid_loss(a, b, p[0], p[1])
             + 2.0 * dense_sigmoid_distillation(a, b, p[0], p[1], teacher_image, teacher_text, TEACHER_SCALE,
                                                TEACHER_BIAS, "bce"))
    assert_same([cached.image, cached.text, cached.loss_params], torch.autograd.grad(dense, [a, b, p]))
    assert float(cached.output.loss) == pytest.approx(float(dense.detach()), rel=1e-6)


def test_pure_distillation_logs_the_students_accuracies():
    """Without the student's own loss (contrastive_weight 0) the accuracies come from the distillation kernel's
    tiles: the same as the contrastive kernel's."""
    image, text, teacher_image, teacher_text = embeddings(7)
    text = F.normalize(text + 1.0 * image, dim=1)  # some pairs right, some wrong (i2t 10 of 12, t2i 9)
    teacher = TeacherEmbeddings(teacher_image, teacher_text)
    tau = torch.tensor([0.07], dtype=torch.float64)
    pure = DistilledLoss(SoftmaxLoss(chunk_rows=5, chunk_cols=3), weight=1.0, contrastive_weight=0.0,
                         teacher_scale=TEACHER_SCALE)
    _, pure_output = pure.single_pass(image, text, tau, None, None, teacher=teacher)
    _, own = SoftmaxLoss(chunk_rows=5, chunk_cols=3).single_pass(image, text, tau, None, None)
    assert 0 < own.i2t_acc < 1 and own.i2t_acc != own.t2i_acc
    assert (pure_output.i2t_acc, pure_output.t2i_acc) == (own.i2t_acc, own.t2i_acc)
    assert float(dense_contrastive_loss(image, text, tau)) > 0  # the student's own loss exists; it is not logged


def test_a_loss_without_distillation_refuses_teacher_embeddings_and_one_with_needs_them():
    image, text, teacher_image, teacher_text = embeddings(8)
    tau = torch.tensor([0.07], dtype=torch.float64)
    with pytest.raises(ValueError, match="without distillation"):
        SoftmaxLoss().single_pass(image, text, tau, None, None, teacher=TeacherEmbeddings(teacher_image,
                                                                                         teacher_text))
    with pytest.raises(ValueError, match="teacher's embeddings"):
        DistilledLoss(SoftmaxLoss(), 1.0, 1.0, TEACHER_SCALE).loss_and_grads(image, text, tau, None, None)
    with pytest.raises(ValueError, match="bias"):
        DistilledLoss(SigmoidLoss(), 1.0, 1.0, TEACHER_SCALE)
    with pytest.raises(ValueError, match="do not match"):
        softmax_distillation(image, text, tau, teacher_image[:5], teacher_text, TEACHER_SCALE)


def test_the_tiles_bound_the_logits_whatever_the_batch(monkeypatch):
    """Every matrix product of the kernel has at most chunk_rows x chunk_cols outputs, at B = 64 as at B = 12: its
    working memory does not grow with B (only the [B] statistics and the [B, d] gradients do)."""
    import zvl_ds.objective.distill_kernels as kernels

    largest = []
    original = torch.mm

    def watched(a, b):
        out = original(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(kernels.torch, "mm", watched)
    for batch in (12, 64):
        generator = torch.Generator().manual_seed(batch)
        rows = [F.normalize(torch.randn(batch, width, generator=generator), dim=1)
                for width in (DIM, DIM, TEACHER_DIM, TEACHER_DIM)]
        largest.clear()
        kernels.softmax_distill_strip(*rows[:2], torch.tensor([0.07]), *rows[2:], TEACHER_SCALE, 0, 4, 6, True)
        assert max(largest) == 4 * 6
        largest.clear()
        kernels.sigmoid_distill_strip(rows[0], rows[1], torch.tensor(5.0), torch.tensor(-2.0), rows[2], rows[3],
                                      TEACHER_SCALE, TEACHER_BIAS, "mobileclip2", 0, 4, 6, True)
        assert max(largest) == 4 * 6
