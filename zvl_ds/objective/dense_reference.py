"""The textbook dense losses over the full B x B logits, with plain autograd and no chunking.

They are the one reference every optimised loss is checked against (the unit and multi-process tests, in fp64
where asked; the exactness tool) and the naive baseline the loss benchmark measures. Nothing here is shared
with ``loss.py`` or ``sigmoid_loss.py``, so agreement with them is evidence, not a tautology.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F


def mixup_targets(batch: int, lam: float, partner: torch.Tensor, dtype: torch.dtype,
                  device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Y = lam * I + (1 - lam) * P with P[i, partner(i)] = 1: the soft targets of MixUpNCE."""
    swap = torch.zeros(batch, batch, dtype=dtype, device=device)
    swap[torch.arange(batch, device=device), torch.as_tensor(partner, device=device)] = 1.0
    return lam * torch.eye(batch, dtype=dtype, device=device) + (1.0 - lam) * swap


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def dense_contrastive_loss(image: torch.Tensor, text: torch.Tensor, temperature: Union[torch.Tensor, float],
                           lam: Optional[float] = None, partner: Optional[torch.Tensor] = None,
                           detach_keys: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE: 0.5 * (image->text + text->image) cross-entropy, each the mean over the B rows.

    Hard targets (the identity) without ``lam``; with ``lam`` and ``partner`` the soft MixUpNCE targets, used
    transposed for text->image. ``detach_keys`` stops the gradient through the side being compared against in
    each direction (what a gather without a backward pass computes)."""
    image_keys = image.detach() if detach_keys else image
    text_keys = text.detach() if detach_keys else text
    image_to_text = image @ text_keys.t() / temperature
    text_to_image = text @ image_keys.t() / temperature if detach_keys else image_to_text.t()
    batch = image.shape[0]
    if lam is None:
        labels = torch.arange(batch, device=image.device)
        return 0.5 * (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels))
    if partner is None:
        raise ValueError("soft targets (lam) need the partner map")
    targets = mixup_targets(batch, lam, partner, image_to_text.dtype, image_to_text.device)
    return 0.5 * (_soft_cross_entropy(image_to_text, targets) + _soft_cross_entropy(text_to_image, targets.t()))


def dense_sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: Union[torch.Tensor, float],
                       bias: Union[torch.Tensor, float]) -> torch.Tensor:
    """SigLIP: mean over all B x B pairs of -log sigmoid(z_ij (scale <x_i, y_j> + bias)), z = +1 on the
    diagonal and -1 elsewhere."""
    signs = 2 * torch.eye(image.shape[0], dtype=image.dtype, device=image.device) - 1
    return -F.logsigmoid(signs * (scale * image @ text.t() + bias)).mean()


def _soft_targets_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j softmax(teacher)_j log_softmax(student)_j."""
    return -(F.softmax(teacher_logits, dim=1) * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()


def dense_softmax_distillation(image: torch.Tensor, text: torch.Tensor, temperature: Union[torch.Tensor, float],
                               teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                               teacher_scale: Union[torch.Tensor, float]) -> torch.Tensor:
    """OpenCLIP's DistillClipLoss term: the teacher's softmax against the student's log-softmax over each row
    (image -> text) and each column (text -> image), averaged. The student's logits are divided by its temperature,
    the teacher's multiplied by its scale."""
    student = image @ text.t() / temperature
    teacher = teacher_scale * teacher_image @ teacher_text.t()
    return 0.5 * (_soft_targets_cross_entropy(teacher, student) + _soft_targets_cross_entropy(teacher.t(), student.t()))


def dense_sigmoid_distillation(image: torch.Tensor, text: torch.Tensor, scale: Union[torch.Tensor, float],
                               bias: Union[torch.Tensor, float], teacher_image: torch.Tensor,
                               teacher_text: torch.Tensor, teacher_scale: float, teacher_bias: float,
                               target: str = "bce") -> torch.Tensor:
    """The sigmoid distillation term, the mean over all B x B pairs. ``bce``: the binary cross-entropy of the
    student's logit u against the probability sigmoid(v); ``mobileclip2``: -log sigmoid(y u) with the soft sign
    y = 2 sigmoid(v) - 1 of the teacher's logit v (MobileCLIP2's published DistillSigLipLoss)."""
    student = scale * image @ text.t() + bias
    teacher = teacher_scale * teacher_image @ teacher_text.t() + teacher_bias
    if target == "mobileclip2":
        return -F.logsigmoid((2 * torch.sigmoid(teacher) - 1) * student).mean()
    return F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher))
