"""The losses behind one interface: what the step asks of a loss, whichever it is.

A step needs four things of a loss: its learnable scalars in the model's output, the temperature to log, the
single-pass loss (this rank's share, for an engine that averages gradients over ranks) and, for DGA, the
gradients of that share at pass 1's embeddings. ``SoftmaxLoss`` (``NCE``, ``MixUpNCE``) and ``SigmoidLoss``
(``SigLIP``) answer them; ``build_loss`` picks one from the config, so the step never looks at shapes or names.
The tiling options (``loss.chunk_rows``, ``loss.chunk_cols``) and the gather mode belong to the loss. Every loss
takes the step's teacher embeddings too (``teacher``): ``distill_loss.DistilledLoss`` uses them, these two refuse them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from zvl_ds.model.mixing import MixupDraw
from zvl_ds.objective.kernel import CachedGrads, LossOutput
from zvl_ds.objective.sigmoid_loss import sigmoid_loss, sigmoid_loss_and_grads
from zvl_ds.objective.softmax_loss import contrastive_loss, loss_and_grads

ModelOutput = Dict[str, Optional[torch.Tensor]]


def _refuse_teacher(teacher) -> None:
    if teacher is not None:
        raise ValueError("teacher embeddings given to a loss without distillation (distill.teacher is not set)")


@dataclass(frozen=True)
class SoftmaxLoss:
    """Symmetric InfoNCE over the global batch (``NCE``; ``MixUpNCE`` when a step passes a mixup draw), with a
    temperature tau that divides the logits."""

    chunk_rows: int = 1024
    chunk_cols: int = 0
    gather_backward: bool = True  # single pass only: DGA always yields the full gradient
    name: str = "NCE"

    def loss_params(self, out: ModelOutput) -> torch.Tensor:
        return out["temperature"]

    def logged_temperature(self, params: torch.Tensor) -> float:
        return float(params.detach().reshape(-1)[0])

    def single_pass(self, image: torch.Tensor, text: torch.Tensor, params: torch.Tensor,
                    mixup: Optional[MixupDraw], partner: Optional[torch.Tensor],
                    teacher=None) -> Tuple[torch.Tensor, LossOutput]:
        _refuse_teacher(teacher)
        return contrastive_loss(image, text, params, mixup=mixup, partner=partner,
                                gather_backward=self.gather_backward, chunk_rows=self.chunk_rows,
                                chunk_cols=self.chunk_cols)

    def loss_and_grads(self, image: torch.Tensor, text: torch.Tensor, params: torch.Tensor,
                       mixup: Optional[MixupDraw], partner: Optional[torch.Tensor], teacher=None) -> CachedGrads:
        _refuse_teacher(teacher)
        return loss_and_grads(image, text, params, mixup=mixup, partner=partner, chunk_rows=self.chunk_rows,
                              chunk_cols=self.chunk_cols)


@dataclass(frozen=True)
class SigmoidLoss:
    """The pairwise sigmoid loss (``SigLIP``) with a learnable scale and bias; it has no mixup variant."""

    chunk_rows: int = 1024
    chunk_cols: int = 0
    name: str = "SigLIP"

    def loss_params(self, out: ModelOutput) -> torch.Tensor:
        scale_bias = out.get("logit_scale_bias")
        if scale_bias is None:
            raise ValueError("the sigmoid loss needs a model built for it (loss.name: SigLIP), which returns its "
                             "scale and bias as logit_scale_bias")
        return scale_bias

    def logged_temperature(self, params: torch.Tensor) -> float:
        """SigLIP's logits are t * similarity + b, so 1 / t plays tau's part in the logs."""
        return float(1.0 / params.detach().reshape(-1)[0])

    def single_pass(self, image: torch.Tensor, text: torch.Tensor, params: torch.Tensor,
                    mixup: Optional[MixupDraw], partner: Optional[torch.Tensor],
                    teacher=None) -> Tuple[torch.Tensor, LossOutput]:
        _refuse_teacher(teacher)
        self._refuse_mixup(mixup)
        return sigmoid_loss(image, text, params, chunk_rows=self.chunk_rows, chunk_cols=self.chunk_cols)

    def loss_and_grads(self, image: torch.Tensor, text: torch.Tensor, params: torch.Tensor,
                       mixup: Optional[MixupDraw], partner: Optional[torch.Tensor], teacher=None) -> CachedGrads:
        _refuse_teacher(teacher)
        self._refuse_mixup(mixup)
        return sigmoid_loss_and_grads(image, text, params, chunk_rows=self.chunk_rows, chunk_cols=self.chunk_cols)

    @staticmethod
    def _refuse_mixup(mixup: Optional[MixupDraw]) -> None:
        if mixup is not None:
            raise ValueError("the sigmoid loss has no mixup variant")


def build_loss(loss_cfg) -> "SoftmaxLoss | SigmoidLoss":
    """The loss that ``loss.name`` names, with its tiling (``LossConfig``)."""
    if loss_cfg.name == "SigLIP":
        return SigmoidLoss(chunk_rows=loss_cfg.chunk_rows, chunk_cols=loss_cfg.chunk_cols)
    return SoftmaxLoss(chunk_rows=loss_cfg.chunk_rows, chunk_cols=loss_cfg.chunk_cols,
                       gather_backward=loss_cfg.nce_loss.gather_backward, name=loss_cfg.name)
