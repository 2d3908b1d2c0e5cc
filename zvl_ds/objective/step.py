"""One exact optimizer step on a DeepSpeed engine: decoupled gradient accumulation (DGA) or single pass.

DGA (ZeroVL's ``clip_bsgs``; GradCache's idea) makes the contrastive batch independent of memory:

1. pass 1, no autograd: embed every chunk of this rank's batch, remembering the RNG state before each chunk;
2. gather the embeddings of all ranks and compute the loss and its gradient with respect to this rank's
   embeddings and the temperature once (``loss.loss_and_grads``, chunked over rows; for a SigLIP model,
   ``sigmoid_loss.sigmoid_loss_and_grads`` and its scale and bias instead of the temperature);
3. pass 2: for each chunk restore its RNG state (dropout repeats exactly), recompute it with autograd and
   back-propagate the cached gradient; the temperature's gradient enters once;
4. one gradient reduction and the optimizer step.

No host synchronisation happens inside the chunk loops: per-chunk results stay on the device and the few values
the host needs (finite loss, temperature, accuracies) are read once per step. Named ``torch.profiler`` ranges
(``zvl.*``, see ``profile_range``) let ``python -m zvl_ds.bench profile`` split a step into its parts.

Gradient bookkeeping: ``loss_and_grads`` returns gradients whose SUM over ranks is the full-batch gradient,
while DeepSpeed AVERAGES gradients over ranks, so pass 2 back-propagates ``world_size`` times them.

DeepSpeed treats every backward as a gradient accumulation boundary unless told otherwise: ZeRO-1/2 then keep
only the last backward's gradient, and ZeRO-3 adds the previous step's gradient to parameters the first backward
did not touch (docs/deepspeed.md). ZeRO 1-3 therefore run pass 2 inside ``engine.coalesce_grad_reduction()``
(one reduction when the block ends); ZeRO 0 marks only the last backward as the accumulation boundary.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from zvl_ds.objective.softmax_loss import CachedGrads, LossOutput, contrastive_loss, loss_and_grads
from zvl_ds.objective.mixup import MixupDraw
from zvl_ds.runtime.profile_ranges import profile_range
from zvl_ds.objective.sigmoid_loss import sigmoid_loss, sigmoid_loss_and_grads


@dataclass
class StepBatch:
    """One rank's share of a global batch. Images are uint8 (normalised chunk by chunk on the device)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

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


@dataclass
class StepOptions:
    chunk: int  # samples per forward on this rank (per-rank DGA chunk)
    world_size: int
    chunk_rows: int  # logit rows computed at once inside the loss
    chunk_cols: int = 0  # logit columns per tile inside the loss; 0: whole rows
    gather_backward: bool = True  # single-pass runner only; DGA always yields the full gradient
    # Moves a uint8 image chunk to the device and normalises it to the engine's dtype.
    prepare_images: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    device: torch.device = torch.device("cpu")


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


def _loss_parameters(out: Dict[str, Optional[torch.Tensor]]) -> torch.Tensor:
    """The loss's learnable scalars in the model output: (t, b) for SigLIP (a model built for it returns them),
    else the temperature."""
    scale_bias = out.get("logit_scale_bias")
    return scale_bias if scale_bias is not None else out["temperature"]


def _reported_temperature(params: torch.Tensor) -> float:
    """tau for the logs; SigLIP's logits are t * similarity + b, so 1 / t plays tau's part there."""
    values = params.detach().reshape(-1)
    return float(1.0 / values[0]) if values.numel() == 2 else float(values[0])


def _pass1_gradients(image: torch.Tensor, text: torch.Tensor, params: torch.Tensor, mixup: Optional[MixupDraw],
                     partner: Optional[torch.Tensor], options: StepOptions) -> CachedGrads:
    if params.numel() == 2:
        if mixup is not None:
            raise ValueError("the sigmoid loss has no mixup variant")
        return sigmoid_loss_and_grads(image, text, params, chunk_rows=options.chunk_rows,
                                      chunk_cols=options.chunk_cols)
    return loss_and_grads(image, text, params, mixup=mixup, partner=partner, chunk_rows=options.chunk_rows,
                          chunk_cols=options.chunk_cols)


def _single_pass_loss(image: torch.Tensor, text: torch.Tensor, params: torch.Tensor, mixup: Optional[MixupDraw],
                      partner: Optional[torch.Tensor], options: StepOptions) -> Tuple[torch.Tensor, LossOutput]:
    if params.numel() == 2:
        if mixup is not None:
            raise ValueError("the sigmoid loss has no mixup variant")
        return sigmoid_loss(image, text, params, chunk_rows=options.chunk_rows, chunk_cols=options.chunk_cols)
    return contrastive_loss(image, text, params, mixup=mixup, partner=partner,
                            gather_backward=options.gather_backward, chunk_rows=options.chunk_rows,
                            chunk_cols=options.chunk_cols)


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


def dga_step(engine, batch: StepBatch, options: StepOptions, mixup: Optional[MixupDraw],
             partner: Optional[torch.Tensor], timer=None) -> StepResult:
    """One DGA optimizer step (ZeroVL's ``clip_bsgs`` runner), exact for any number of chunks."""
    phase = _phases(timer)
    bounds = _chunk_bounds(len(batch), options.chunk)
    snapshots = []
    image_parts, text_parts = [], []
    with phase("pass1"), torch.no_grad():
        for bound in bounds:
            snapshots.append(_rng_snapshot(options.device))
            out = _forward(engine, _chunk_inputs(batch, bound.start, bound.stop, options), mixup)
            image_parts.append(out["image_embeds"].float())
            text_parts.append(out["text_embeds"].float())
            loss_params = _loss_parameters(out).float()
    with phase("loss"):
        cached = _pass1_gradients(torch.cat(image_parts), torch.cat(text_parts), loss_params, mixup, partner,
                                  options)
    del image_parts, text_parts
    loss_value = cached.output.loss
    tau = _reported_temperature(loss_params)
    # The loss is global (identical on every rank), so every rank takes the same decision without talking.
    if not _is_finite(loss_value):
        return _skipped("non-finite loss", float(loss_value), tau)

    scale = float(options.world_size)
    grad_image = cached.image * scale
    grad_text = cached.text * scale
    grad_temperature = cached.temperature * scale
    stage = engine.zero_optimization_stage()
    with phase("pass2"):
        reduction = engine.coalesce_grad_reduction() if stage > 0 else contextlib.nullcontext()
        with reduction:
            for index, (bound, snapshot) in enumerate(zip(bounds, snapshots)):
                _rng_restore(snapshot, options.device)
                out = _forward(engine, _chunk_inputs(batch, bound.start, bound.stop, options), mixup)
                surrogate = ((out["image_embeds"].float() * grad_image[bound]).sum()
                             + (out["text_embeds"].float() * grad_text[bound]).sum())
                params = _loss_parameters(out)
                if index == 0 and params.requires_grad:  # the loss's scalars enter once per step
                    surrogate = surrogate + (params.float() * grad_temperature).sum()
                if stage == 0:
                    engine.set_gradient_accumulation_boundary(index == len(bounds) - 1)
                _backward(engine, surrogate)
    with phase("optimizer"):
        applied = _optimizer_step(engine)
    output = cached.output
    return StepResult(applied=applied, loss=float(output.loss), i2t_acc=output.i2t_acc, t2i_acc=output.t2i_acc,
                      temperature=tau, skip_reason=None if applied else "fp16 overflow")


def single_pass_step(engine, batch: StepBatch, options: StepOptions, mixup: Optional[MixupDraw],
                     partner: Optional[torch.Tensor], timer=None) -> StepResult:
    """ZeroVL's plain ``clip`` runner: one forward and one backward over this rank's batch."""
    phase = _phases(timer)
    with phase("pass1"):
        out = _forward(engine, _chunk_inputs(batch, 0, len(batch), options), mixup)
        loss_params = _loss_parameters(out).float()
    with phase("loss"):
        loss, output = _single_pass_loss(out["image_embeds"].float(), out["text_embeds"].float(), loss_params,
                                         mixup, partner, options)
    tau = _reported_temperature(loss_params)
    if not _is_finite(output.loss):
        return _skipped("non-finite loss", float(output.loss), tau)
    with phase("pass2"):
        _backward(engine, loss)
    with phase("optimizer"):
        applied = _optimizer_step(engine)
    return StepResult(applied=applied, loss=float(output.loss), i2t_acc=output.i2t_acc, t2i_acc=output.t2i_acc,
                      temperature=tau, skip_reason=None if applied else "fp16 overflow")


RUNNERS: Dict[str, Callable[..., StepResult]] = {"clip_bsgs": dga_step, "clip": single_pass_step}


class TrainingAborted(RuntimeError):
    pass


class SkipPolicy:
    """Counts skipped steps; too many in a row means the run is diverging and must stop, not spin."""

    def __init__(self, max_in_a_row: int, total: int = 0):
        self.max_in_a_row = max_in_a_row
        self.total = total
        self.in_a_row = 0

    def record(self, result: StepResult, step: int, last_checkpoint: Optional[str]) -> None:
        if result.applied:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingAborted(f"{self.in_a_row} consecutive steps skipped up to step {step} "
                                  f"(last: {result.skip_reason}); last good checkpoint: "
                                  f"{last_checkpoint or 'none written yet'}")
