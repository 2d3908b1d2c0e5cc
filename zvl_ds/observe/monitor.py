"""Metrics: TensorBoard scalars/text/images on rank 0 (and the same to any other sink, such as Weights & Biases in
``wandb_sink.py``), a console line, and per-phase step timing."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from typing import Dict, Iterator, Optional, Sequence

import torch

from zvl_ds.base.errors import UserError

LOG = logging.getLogger(__name__)


class SideOutputError(UserError):
    """A side output of a run (TensorBoard events, eval_metrics.jsonl, sample_keys) could not be written."""


class PhaseTimer:
    """Wall time per named phase of a step (data wait, pass 1, loss, pass 2, optimizer).

    On GPUs the device is synchronised at phase edges so that asynchronous kernels are charged to the phase
    that launched them.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def pop(self) -> Dict[str, float]:
        result = dict(self.seconds)
        self.seconds.clear()
        return result


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory since the last reset (CUDA), or this process's peak resident size (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Monitor:
    """Writes on rank 0 only; other ranks get a silent monitor so call sites need no rank checks.

    ``sinks`` get every scalar and image TensorBoard gets (each has ``scalars``, ``image`` and ``close``), whether
    TensorBoard is on or not."""

    def __init__(self, run_dir: str, enabled: bool, use_tensorboard: bool, total_steps: int, sinks: Sequence = ()):
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = None
        self.sinks = list(sinks) if enabled else []
        self._start_time: Optional[float] = None
        self._start_step = 0
        self.tensorboard_dir = os.path.join(run_dir, "tensorboard")
        if enabled and use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with self._writing():
                self.writer = SummaryWriter(log_dir=self.tensorboard_dir)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A full disk under the TensorBoard folder surfaces (often a write later, from the writer's thread) as an
        OSError naming no file: name the folder."""
        try:
            yield
        except OSError as error:
            raise SideOutputError(f"writing TensorBoard events under {self.tensorboard_dir} failed: "
                                  f"{error.strerror or error}") from error

    def start(self, step: int) -> None:
        self._start_time = time.time()
        self._start_step = step

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is not None:
            with self._writing():
                for name, value in values.items():
                    if value is not None:
                        self.writer.add_scalar(name, float(value), step)
        for sink in self.sinks:
            sink.scalars(step, values)

    def text(self, name: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.add_text(name, text, step)

    def image(self, name: str, image_hwc_uint8, step: int) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.add_image(name, image_hwc_uint8, step, dataformats="HWC")
        for sink in self.sinks:
            sink.image(name, image_hwc_uint8, step)

    def eta_seconds(self, step: int) -> float:
        if self._start_time is None or step <= self._start_step:
            return float("nan")
        rate = (time.time() - self._start_time) / (step - self._start_step)
        return rate * (self.total_steps - step)

    def console(self, message: str) -> None:
        if self.enabled:
            LOG.info(message)

    def train_line(self, step: int, loss: float, lr: float, samples_per_sec: float, temperature: float) -> None:
        self.console(f"step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.3e}  tau {temperature:.4f}  "
                     f"{samples_per_sec:.1f} samples/s  eta {format_duration(self.eta_seconds(step))}")

    def flush(self) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with self._writing():
                writer.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
