"""One exact optimizer step on a DeepSpeed engine: decoupled gradient accumulation (DGA) or single pass.

DGA (ZeroVL's ``clip_bsgs``; GradCache's idea) makes the contrastive batch independent of memory:

1. pass 1, no autograd: embed every chunk of this rank's batch, remembering the RNG state before each chunk (with
   distillation, the frozen teacher first embeds the same chunks, or its stored embeddings come with the batch);
2. gather the embeddings of all ranks and compute the loss and its gradient with respect to this rank's
   embeddings and the loss's learnable scalars once (``options.loss.loss_and_grads``, tiled: the temperature
   of the softmax loss, or the scale and bias of the sigmoid loss; ``losses.py``);
3. pass 2: for each chunk restore its RNG state (dropout repeats exactly), recompute it with autograd and
   back-propagate the cached gradient; the temperature's gradient enters once;
4. one gradient reduction and the optimizer step.

No host synchronisation happens inside the chunk loops: per-chunk results stay on the device and the few values
the host needs (finite loss, temperature, accuracies) are read once per step. Named ``torch.profiler`` ranges
(``zvl.*``, see ``profile_range``) let ``python -m zvl_ds.bench profile`` split a step into its parts.

Gradient bookkeeping: the cached gradients are those of this rank's share of the loss, whose AVERAGE over ranks
is the full-batch loss (``kernel.CachedGrads``), so pass 2 back-propagates them as they are and DeepSpeed's
average over ranks is the exact full-batch gradient.

DeepSpeed treats every backward as a gradient accumulation boundary unless told otherwise: ZeRO-1/2 then keep
only the last backward's gradient, and ZeRO-3 adds the previous step's gradient to parameters the first backward
did not touch (docs/deepspeed.md). ZeRO 1-3 therefore run pass 2 inside ``engine.coalesce_grad_reduction()``
(one reduction when the block ends); ZeRO 0 marks only the last backward as the accumulation boundary.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch

from zvl_ds.config import NormalizeConfig
from zvl_ds.data.transforms import normalize_images
from zvl_ds.model.mixing import MixupDraw
from zvl_ds.objective.distill_loss import DistilledLoss, TeacherEmbeddings
from zvl_ds.objective.losses import SigmoidLoss, SoftmaxLoss
from zvl_ds.objective.mixup import draw_mixup
from zvl_ds.observe.profile_ranges import profile_range


@dataclass
class StepBatch:
    """One rank's share of a global batch. Images are uint8 (normalised chunk by chunk on the device).

    With distillation: the teacher's token ids of the same captions (an online teacher reads them), or the
    teacher's embeddings of the samples themselves (``teacher_embeddings``: a stored teacher; the step then runs
    no teacher)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    teacher_input_ids: Optional[torch.Tensor] = None
    teacher_attention_mask: Optional[torch.Tensor] = None
    teacher_embeddings: Optional[TeacherEmbeddings] = None

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class StepResult:
    applied: bool  # False when the step was skipped (non-finite loss, fp16 overflow)
    loss: float
    i2t_acc: float
    t2i_acc: float
    temperature: float
    skip_reason: Optional[str] = None
    parts: Dict[str, float] = field(default_factory=dict)  # a loss's terms (distillation), for the logs


@dataclass(frozen=True)
class ImagePreparation:
    """A uint8 image chunk -> normalised images on the device in the engine's dtype (``transforms.normalize``).

    Images travel to the device as uint8, a quarter of float32, and are normalised there one chunk at a time, so
    the float copy of a whole per-rank batch never exists."""

    normalize: NormalizeConfig
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    # the view's side: larger images are resized down to it on the device (a student and its teacher see two
    # sizes of one crop); None: as given
    size: Optional[int] = None

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return normalize_images(images_uint8, self.normalize, self.device, self.dtype, self.size)


@dataclass
class OnlineTeacher:
    """A frozen teacher run in the step's pass 1: its module (or, at ZeRO-3, its partitioned engine) in eval mode,
    and its own view of the images (its size and normalisation, from the same uint8 crops)."""

    model: Callable[..., Dict[str, Optional[torch.Tensor]]]
    prepare_images: ImagePreparation

    @torch.no_grad()
    def embed(self, images_uint8: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        device = self.prepare_images.device
        out = self.model(images=self.prepare_images(images_uint8), input_ids=input_ids.to(device, non_blocking=True),
                         attention_mask=attention_mask.to(device, non_blocking=True))
        return out["image_embeds"].float(), out["text_embeds"].float()


@dataclass
class StepOptions:
    chunk: int  # samples per forward on this rank (per-rank DGA chunk)
    # losses.build_loss(cfg.loss), or with a teacher distill_loss.DistilledLoss; it carries its own tiling
    loss: Union[SoftmaxLoss, SigmoidLoss, DistilledLoss]
    # Moves a uint8 image chunk to the device and normalises it (ImagePreparation); None: images are used as given
    prepare_images: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    device: torch.device = torch.device("cpu")
    teacher: Optional[OnlineTeacher] = None  # distill.source: online


@dataclass
class Step:
    """A step as the config describes it (``build.build_step``); ``step(engine, batch, index)`` runs optimizer
    step ``index``."""

    runner: Callable[..., StepResult]
    options: StepOptions
    partner: Optional[torch.Tensor]  # the mixup partner map over the global batch; None without mixup
    seed: int
    rank: int
    mixup_beta: Optional[float]  # Beta(beta, beta) of the mixup draw; None when the loss has no mixup
    reseed_each_step: bool  # runner.stable_random == "step"

    def mixup(self, index: int) -> Optional[MixupDraw]:
        """Step ``index``'s mixup draw: the same on every rank and on a resumed run."""
        return draw_mixup(self.seed, index, self.mixup_beta) if self.mixup_beta is not None else None

    def seed_rng(self, index: int) -> None:
        """Seed the global RNG for step ``index`` on this rank (``runner.stable_random: step``; else nothing)."""
        if self.reseed_each_step:
            torch.manual_seed(step_seed(self.seed, index, self.rank))

    def __call__(self, engine, batch: StepBatch, index: int, timer=None) -> StepResult:
        self.seed_rng(index)
        return self.runner(engine, batch, self.options, self.mixup(index), self.partner, timer)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNG at the start of a step (``runner.stable_random: step``).

    A resumed run replays dropout exactly, and ranks draw independent streams (ZeroVL seeds every rank with the
    step alone, which correlates dropout across ranks).
    """
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] % (2 ** 63))


def _rng_snapshot(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snapshot, device: torch.device) -> None:
    cpu, cuda = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _chunk_inputs(batch: StepBatch, start: int, stop: int, options: StepOptions):
    with profile_range("zvl.host_to_device"):
        images = batch.images[start:stop]
        images = options.prepare_images(images) if options.prepare_images else images
        input_ids = batch.input_ids[start:stop].to(options.device, non_blocking=True)
        attention_mask = batch.attention_mask[start:stop].to(options.device, non_blocking=True)
    return images, input_ids, attention_mask


def _forward(engine, inputs, mixup):
    images, input_ids, attention_mask = inputs
    with profile_range("zvl.forward"):
        return engine(images=images, input_ids=input_ids, attention_mask=attention_mask, mixup=mixup)


def _backward(engine, surrogate: torch.Tensor) -> None:
    with profile_range("zvl.backward"):
        engine.backward(surrogate)


def _chunk_bounds(size: int, chunk: int) -> List[slice]:
    if size % chunk:
        raise ValueError(f"per-rank batch {size} is not a multiple of the per-rank chunk {chunk}")
    return [slice(start, start + chunk) for start in range(0, size, chunk)]


def _is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def _skipped(reason: str, loss: float = math.nan, temperature: float = math.nan) -> StepResult:
    return StepResult(applied=False, loss=loss, i2t_acc=math.nan, t2i_acc=math.nan, temperature=temperature,
                      skip_reason=reason)


def _phases(timer):
    """A step phase: timed by ``timer`` when given, and a ``zvl.<phase>`` profiler range when profiling."""
    def phase(name: str):
        stack = contextlib.ExitStack()
        if timer is not None:
            stack.enter_context(timer.phase(name))
        stack.enter_context(profile_range(f"zvl.{name}"))
        return stack
    return phase


def _optimizer_step(engine) -> bool:
    """Step; False when DeepSpeed skipped it (fp16 overflow in any chunk)."""
    skipped_before = getattr(engine, "skipped_steps", 0)
    with profile_range("zvl.optimizer_step"):
        engine.step()
    return getattr(engine, "skipped_steps", 0) == skipped_before


def _teacher_embeddings(batch: StepBatch, options: StepOptions, bounds: List[slice]) -> Optional[TeacherEmbeddings]:
    """The teacher's embeddings of this rank's samples, once per step and without autograd: handed over with the
    batch (a stored teacher), else embedded chunk by chunk by the online teacher; None without distillation. An
    eval-mode teacher draws no random numbers, so the student's dropout replay is untouched."""
    if batch.teacher_embeddings is not None:
        return TeacherEmbeddings(batch.teacher_embeddings.image.to(options.device),
                                 batch.teacher_embeddings.text.to(options.device))
    if options.teacher is None:
        return None
    if batch.teacher_input_ids is None or batch.teacher_attention_mask is None:
        raise ValueError("an online teacher needs the batch's teacher token ids (the loader makes them)")
    image_parts, text_parts = [], []
    for bound in bounds:
        with profile_range("zvl.teacher_forward"):
            image, text = options.teacher.embed(batch.images[bound], batch.teacher_input_ids[bound],
                                                batch.teacher_attention_mask[bound])
        image_parts.append(image)
        text_parts.append(text)
    return TeacherEmbeddings(torch.cat(image_parts), torch.cat(text_parts))


def _timed_teacher(phase, batch: StepBatch, options: StepOptions, bounds: List[slice]
                   ) -> Optional[TeacherEmbeddings]:
    """``_teacher_embeddings`` as the step's ``teacher`` phase (timed and profiled), when there is a teacher."""
    if options.teacher is None and batch.teacher_embeddings is None:
        return None
    with phase("teacher"):
        return _teacher_embeddings(batch, options, bounds)


def _parts(output) -> Dict[str, float]:
    return {name: float(value) for name, value in output.parts.items()}


def dga_step(engine, batch: StepBatch, options: StepOptions, mixup: Optional[MixupDraw],
             partner: Optional[torch.Tensor], timer=None) -> StepResult:
    """One DGA optimizer step (ZeroVL's ``clip_bsgs`` runner), exact for any number of chunks."""
    phase = _phases(timer)
    bounds = _chunk_bounds(len(batch), options.chunk)
    teacher = _timed_teacher(phase, batch, options, bounds)
    snapshots = []
    image_parts, text_parts = [], []
    with phase("pass1"), torch.no_grad():
        for bound in bounds:
            snapshots.append(_rng_snapshot(options.device))
            out = _forward(engine, _chunk_inputs(batch, bound.start, bound.stop, options), mixup)
            image_parts.append(out["image_embeds"].float())
            text_parts.append(out["text_embeds"].float())
            loss_params = options.loss.loss_params(out).float()
    with phase("loss"):
        cached = options.loss.loss_and_grads(torch.cat(image_parts), torch.cat(text_parts), loss_params, mixup,
                                             partner, teacher=teacher)
    del image_parts, text_parts, teacher
    loss_value = cached.output.loss
    tau = options.loss.logged_temperature(loss_params)
    # The loss is global (identical on every rank), so every rank takes the same decision without talking.
    if not _is_finite(loss_value):
        return _skipped("non-finite loss", float(loss_value), tau)

    stage = engine.zero_optimization_stage()
    with phase("pass2"):
        reduction = engine.coalesce_grad_reduction() if stage > 0 else contextlib.nullcontext()
        with reduction:
            for index, (bound, snapshot) in enumerate(zip(bounds, snapshots)):
                _rng_restore(snapshot, options.device)
                out = _forward(engine, _chunk_inputs(batch, bound.start, bound.stop, options), mixup)
                surrogate = ((out["image_embeds"].float() * cached.image[bound]).sum()
                             + (out["text_embeds"].float() * cached.text[bound]).sum())
                params = options.loss.loss_params(out)
                if index == 0 and params.requires_grad:  # the loss's scalars enter once per step
                    surrogate = surrogate + (params.float() * cached.loss_params).sum()
                if stage == 0:
                    engine.set_gradient_accumulation_boundary(index == len(bounds) - 1)
                _backward(engine, surrogate)
    with phase("optimizer"):
        applied = _optimizer_step(engine)
    output = cached.output
    return StepResult(applied=applied, loss=float(output.loss), i2t_acc=output.i2t_acc, t2i_acc=output.t2i_acc,
                      temperature=tau, skip_reason=None if applied else "fp16 overflow", parts=_parts(output))


def single_pass_step(engine, batch: StepBatch, options: StepOptions, mixup: Optional[MixupDraw],
                     partner: Optional[torch.Tensor], timer=None) -> StepResult:
    """ZeroVL's plain ``clip`` runner: one forward and one backward over this rank's batch."""
    phase = _phases(timer)
    teacher = _timed_teacher(phase, batch, options, [slice(0, len(batch))])
    with phase("pass1"):
        out = _forward(engine, _chunk_inputs(batch, 0, len(batch), options), mixup)
        loss_params = options.loss.loss_params(out).float()
    with phase("loss"):
        loss, output = options.loss.single_pass(out["image_embeds"].float(), out["text_embeds"].float(),
                                                loss_params, mixup, partner, teacher=teacher)
    tau = options.loss.logged_temperature(loss_params)
    if not _is_finite(output.loss):
        return _skipped("non-finite loss", float(output.loss), tau)
    with phase("pass2"):
        _backward(engine, loss)
    with phase("optimizer"):
        applied = _optimizer_step(engine)
    return StepResult(applied=applied, loss=float(output.loss), i2t_acc=output.i2t_acc, t2i_acc=output.t2i_acc,
                      temperature=tau, skip_reason=None if applied else "fp16 overflow", parts=_parts(output))


RUNNERS: Dict[str, Callable[..., StepResult]] = {"clip_bsgs": dga_step, "clip": single_pass_step}
