"""Distillation behind the step's loss interface (``losses.py``): the student's own loss and a teacher's soft targets
over the global batch, ``contrastive_weight * L_student + weight * L_distill``, exact under DGA and gather.

The teacher's embeddings reach the loss as ``TeacherEmbeddings``: this rank's samples, computed once per step
without autograd. An online teacher embeds them in the step's pass 1 (``step.py``); a stored teacher would hand
them over with the batch (``StepBatch.teacher_embeddings``); the loss does not know which. The teacher's texts are
gathered once per step; its image rows stay local (each rank holds a strip of the logits: its image rows against
every text). The terms' kernels are ``distill_kernels.py``: tiled, their working memory independent of B.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch

from zvl_ds.model.mixing import MixupDraw
from zvl_ds.objective.distill_kernels import SigmoidDistillFunction, SoftmaxDistillFunction
from zvl_ds.objective.kernel import (CachedGrads, LossOutput, all_reduce_, check_embeddings, check_tiles, compute_dtype,
                                     pass1_gradients)
from zvl_ds.objective.losses import SigmoidLoss, SoftmaxLoss
from zvl_ds.runtime.dist import gather_no_grad, gather_with_grad, get_rank, get_world_size


@dataclass(frozen=True)
class TeacherEmbeddings:
    """The teacher's L2-normalised embeddings of this rank's samples, in the batch's order, without autograd."""

    image: torch.Tensor  # [b, d_T]
    text: torch.Tensor  # [b, d_T]


def _distill_output(loss_sum: torch.Tensor, divisor: float, own: torch.Tensor, row_max: torch.Tensor,
                    column_max: torch.Tensor, row_offset: int, global_batch: int) -> LossOutput:
    """The term's global value and the student's top-1 accuracies (the own pair reaches the maximum)."""
    column_max = all_reduce_(column_max.detach().clone(), torch.distributed.ReduceOp.MAX)
    own_columns = column_max[row_offset:row_offset + own.shape[0]]
    stats = torch.stack([loss_sum.detach().double(), (own >= row_max).sum().double(),
                         (own >= own_columns).sum().double()])
    all_reduce_(stats)
    return LossOutput(loss=(stats[0] / divisor).float(), i2t_acc=float(stats[1]) / global_batch,
                      t2i_acc=float(stats[2]) / global_batch)


def _check(image: torch.Tensor, text: torch.Tensor, teacher_image: torch.Tensor, teacher_texts: torch.Tensor,
           chunk_rows: int, chunk_cols: int) -> None:
    check_embeddings(image, text, "distillation")
    if teacher_image.dim() != 2 or teacher_image.shape[0] != image.shape[0]:
        raise ValueError(f"distillation: the teacher's image embeddings {tuple(teacher_image.shape)} do not match "
                         f"this rank's {image.shape[0]} samples")
    if teacher_texts.shape != (image.shape[0] * get_world_size(), teacher_image.shape[1]):
        raise ValueError(f"distillation: the teacher's gathered texts {tuple(teacher_texts.shape)} do not match the "
                         f"global batch of {image.shape[0] * get_world_size()} and width {teacher_image.shape[1]}")
    check_tiles(chunk_rows, chunk_cols)


def softmax_distillation(image_local: torch.Tensor, text_local: torch.Tensor, tau: torch.Tensor,
                         teacher_image_local: torch.Tensor, teacher_texts: torch.Tensor, teacher_scale: float, *,
                         chunk_rows: int = 1024, chunk_cols: int = 0) -> Tuple[torch.Tensor, LossOutput]:
    """This rank's share of the softmax term (``DistillClipLoss``) and its global figures: the value whose average
    over ranks is L_d, differentiable in the student's embeddings (texts gathered with gradient) and tau.
    ``teacher_texts`` are every rank's teacher text embeddings, already gathered."""
    _check(image_local, text_local, teacher_image_local, teacher_texts, chunk_rows, chunk_cols)
    world_size, rank, per_rank = get_world_size(), get_rank(), image_local.shape[0]
    global_batch = per_rank * world_size
    texts = gather_with_grad(compute_dtype(text_local))
    loss_sum, own, row_max, column_max = SoftmaxDistillFunction.apply(
        compute_dtype(image_local), texts, compute_dtype(tau).reshape(1), teacher_image_local, teacher_texts,
        float(teacher_scale), rank * per_rank, chunk_rows, chunk_cols)
    output = _distill_output(loss_sum, global_batch, own, row_max, column_max, rank * per_rank, global_batch)
    return loss_sum / per_rank, output


def sigmoid_distillation(image_local: torch.Tensor, text_local: torch.Tensor, scale_bias: torch.Tensor,
                         teacher_image_local: torch.Tensor, teacher_texts: torch.Tensor, teacher_scale: float,
                         teacher_bias: float, target: str = "bce", *, chunk_rows: int = 1024,
                         chunk_cols: int = 0) -> Tuple[torch.Tensor, LossOutput]:
    """This rank's share of the sigmoid term (``DistillSigLipLoss``, the mean over B^2 pairs) and its global
    figures, differentiable in the student's embeddings and its (scale, bias)."""
    _check(image_local, text_local, teacher_image_local, teacher_texts, chunk_rows, chunk_cols)
    world_size, rank, per_rank = get_world_size(), get_rank(), image_local.shape[0]
    global_batch = per_rank * world_size
    texts = gather_with_grad(compute_dtype(text_local))
    loss_sum, own, row_max, column_max = SigmoidDistillFunction.apply(
        compute_dtype(image_local), texts, compute_dtype(scale_bias), teacher_image_local, teacher_texts,
        float(teacher_scale), float(teacher_bias), target, rank * per_rank, chunk_rows, chunk_cols)
    output = _distill_output(loss_sum, global_batch ** 2, own, row_max, column_max, rank * per_rank, global_batch)
    return loss_sum * (world_size / global_batch ** 2), output


@dataclass(frozen=True)
class _GatheredTeacher:
    image: torch.Tensor  # [b, d_T] this rank's
    texts: torch.Tensor  # [B, d_T] every rank's


@dataclass(frozen=True)
class DistilledLoss:
    """The student's loss (``base``) plus the distillation term of its family: softmax for NCE, sigmoid for SigLIP.

    ``teacher_scale`` multiplies the teacher's cosine similarities; ``teacher_bias`` is added to them (sigmoid).
    Every method takes the step's ``teacher`` (``TeacherEmbeddings``), which must be given."""

    base: Union[SoftmaxLoss, SigmoidLoss]
    weight: float
    contrastive_weight: float
    teacher_scale: float
    teacher_bias: Optional[float] = None
    sigmoid_target: str = "bce"

    def __post_init__(self):
        if isinstance(self.base, SigmoidLoss) and self.teacher_bias is None:
            raise ValueError("sigmoid distillation needs the teacher's logit bias (distill.bias)")

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def sigmoid(self) -> bool:
        return isinstance(self.base, SigmoidLoss)

    def loss_params(self, out) -> torch.Tensor:
        return self.base.loss_params(out)

    def logged_temperature(self, params: torch.Tensor) -> float:
        return self.base.logged_temperature(params)

    def single_pass(self, image: torch.Tensor, text: torch.Tensor, params: torch.Tensor,
                    mixup: Optional[MixupDraw], partner: Optional[torch.Tensor],
                    teacher: Optional[TeacherEmbeddings] = None) -> Tuple[torch.Tensor, LossOutput]:
        return self._combined(self.base, image, text, params, mixup, partner, self._gathered(teacher))

    def loss_and_grads(self, image: torch.Tensor, text: torch.Tensor, params: torch.Tensor,
                       mixup: Optional[MixupDraw], partner: Optional[torch.Tensor],
                       teacher: Optional[TeacherEmbeddings] = None) -> CachedGrads:
        """DGA's pass-1 gradients of the combined per-rank value (see ``kernel.CachedGrads``); the teacher's texts
        are gathered once, here."""
        exact = replace(self.base, gather_backward=True) if isinstance(self.base, SoftmaxLoss) else self.base
        gathered = self._gathered(teacher)

        def per_rank_loss(image_, text_, params_):
            return self._combined(exact, image_, text_, params_, mixup, partner, gathered)

        return pass1_gradients(per_rank_loss, image, text, params, params_shape=(2,) if self.sigmoid else (1,))

    def _gathered(self, teacher: Optional[TeacherEmbeddings]) -> _GatheredTeacher:
        if teacher is None:
            raise ValueError("distillation needs the teacher's embeddings of the batch (TeacherEmbeddings)")
        return _GatheredTeacher(compute_dtype(teacher.image.detach()), gather_no_grad(compute_dtype(teacher.text)))

    def _distillation(self, image, text, params, teacher: _GatheredTeacher) -> Tuple[torch.Tensor, LossOutput]:
        tiles = {"chunk_rows": self.base.chunk_rows, "chunk_cols": self.base.chunk_cols}
        if self.sigmoid:
            return sigmoid_distillation(image, text, params, teacher.image, teacher.texts, self.teacher_scale,
                                        self.teacher_bias, self.sigmoid_target, **tiles)
        return softmax_distillation(image, text, params, teacher.image, teacher.texts, self.teacher_scale, **tiles)

    def _combined(self, base, image, text, params, mixup, partner, teacher: _GatheredTeacher
                  ) -> Tuple[torch.Tensor, LossOutput]:
        """``contrastive_weight * base + weight * distillation``: the per-rank value and the global figures; the
        accuracies are the student's own loss's (the distillation kernel's when that loss is not computed)."""
        value, distilled = self._distillation(image, text, params, teacher)
        value = self.weight * value
        parts = {"distill_loss": distilled.loss}
        loss, accuracies = self.weight * distilled.loss, distilled
        if self.contrastive_weight > 0:
            own_value, own = base.single_pass(image, text, params, mixup, partner)
            value = value + self.contrastive_weight * own_value
            parts["contrastive_loss"] = own.loss
            loss, accuracies = loss + self.contrastive_weight * own.loss, own
        return value, LossOutput(loss=loss, i2t_acc=accuracies.i2t_acc, t2i_acc=accuracies.t2i_acc, parts=parts)
