"""One way to build a training step from a config, used by the trainer, ``verify_exactness`` and the benchmarks.

A configured step (``step.Step``) is the runner (``runner.name``: DGA or single pass), its options (the per-rank
chunk, the loss with its tiling, how images reach the device and are normalised there, the distillation teacher),
the mixup partner map, and the per-step draws: the global RNG's seed (``runner.stable_random: step``) and the mixup
draw. Building them in one place keeps every caller's step identical to the trainer's.
"""
from __future__ import annotations

from typing import Optional

import torch

from zvl_ds.config import Config
from zvl_ds.data.transforms import ImageTransform
from zvl_ds.model.teacher import StoredTeacher, Teacher
from zvl_ds.objective.distill_loss import DistilledLoss
from zvl_ds.objective.losses import build_loss
from zvl_ds.objective.mixup import partner_index
from zvl_ds.objective.step import RUNNERS, ImagePreparation, OnlineTeacher, Step, StepOptions


def distilled_loss(cfg: Config, base, teacher_scale: float, teacher_bias: Optional[float]) -> DistilledLoss:
    """The student's loss ``base`` with the distillation term of ``cfg.distill``, at the teacher's logit scale and bias
    (an online teacher's, resolved by ``load_teacher``; a stored teacher's, recorded with its embeddings)."""
    return DistilledLoss(base, weight=cfg.distill.weight, contrastive_weight=cfg.distill.contrastive_weight,
                         teacher_scale=teacher_scale, teacher_bias=teacher_bias,
                         sigmoid_target=cfg.distill.sigmoid_target)


def build_step(cfg: Config, world_size: int, rank: int, device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float32, teacher: Optional[Teacher] = None,
               stored: Optional[StoredTeacher] = None) -> Step:
    """The step of ``cfg`` on one of ``world_size`` ranks, for an engine on ``device`` computing in ``dtype``;
    with ``teacher`` (``zvl_ds.model.teacher.load_teacher``) the distillation of ``cfg.distill`` by a teacher run in
    the step, with ``stored`` (``stored_teacher``) by the teacher's embeddings that come with each batch
    (``StepBatch.teacher_embeddings``)."""
    chunk = cfg.per_rank_chunk(world_size)
    mixup = cfg.loss.name == "MixUpNCE"
    loss = build_loss(cfg.loss)
    student_images = ImagePreparation(cfg.transforms.normalize, device, dtype)
    online = None
    if stored is not None:
        loss = distilled_loss(cfg, loss, stored.scale, stored.bias)
    elif teacher is not None:
        loss = distilled_loss(cfg, loss, teacher.scale, teacher.bias)
        # the loader hands over the crops at the larger side of the two; each view is made from them
        student_size = ImageTransform(cfg.transforms.train_transforms, cfg.transforms).size
        student_images = ImagePreparation(cfg.transforms.normalize, device, dtype, size=student_size)
        online = OnlineTeacher(teacher.model, ImagePreparation(teacher.normalize, device, dtype,
                                                               size=teacher.image_size))
    options = StepOptions(chunk=chunk, loss=loss, prepare_images=student_images, device=device, teacher=online)
    # the model mixes inside each forward, so the partner map pairs samples within each per-rank chunk
    partner = partner_index(cfg.data.batch_size, world_size, chunk).to(device) if mixup else None
    return Step(runner=RUNNERS[cfg.runner.name], options=options, partner=partner, seed=cfg.seed, rank=rank,
                mixup_beta=cfg.loss.mixup.beta if mixup else None,
                reseed_each_step=cfg.runner.stable_random == "step")
