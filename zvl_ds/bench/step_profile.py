"""Where a training step's time goes: one step under ``torch.profiler``, split into named parts.

The step runners open ``zvl.*`` ranges (``zvl_ds.observe.profile_ranges``); this module reads them back:

- ``pass1``, ``loss``, ``pass2``, ``optimizer``: the step's phases (the ranges ``zvl.pass1`` ...);
- ``host_to_device``: host time spent moving and normalising chunk inputs (``zvl.host_to_device``), plus, on
  CUDA, the device time of host-to-device copies (``device_host_to_device_ms``);
- ``deepspeed``: host time inside the engine that is not the model's own work: engine forward minus model
  forward, engine backward minus the autograd engine's functions, engine step minus the torch optimizer;
- ``host_other``: the step's wall time outside the four phases (runner bookkeeping, Python);
- ``device_kernels_ms`` (CUDA): total kernel time, to compare with the wall time (idle device = host-bound).

Times are milliseconds per step, averaged over the profiled steps.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

PHASES = ("pass1", "loss", "pass2", "optimizer")
_AUTOGRAD_FUNCTION = "autograd::engine::evaluate_function"
_TORCH_OPTIMIZER_STEP = "Optimizer.step#"


def _total_us(events: Iterable, name: str) -> float:
    return sum(event.cpu_time_total for event in events if event.name == name)


def _outermost(events: Iterable, predicate: Callable[[str], bool]) -> List:
    """Events matching ``predicate`` that are not nested in another matching event (no double counting)."""
    found = []
    for event in events:
        if not predicate(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not predicate(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            found.append(event)
    return found


def _within(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def split_events(events: Sequence, steps: int, wall_seconds: float) -> Dict[str, float]:
    """The per-step time split (ms) from profiler events (objects with ``name``, ``cpu_time_total`` in µs,
    ``cpu_parent`` and, for device figures, ``device_type``/``device_time_total``)."""
    per_step = 1e-3 / steps  # µs totals over all steps -> ms per step
    split = {phase: _total_us(events, f"zvl.{phase}") * per_step for phase in PHASES}
    split["host_to_device"] = _total_us(events, "zvl.host_to_device") * per_step
    autograd = sum(e.cpu_time_total for e in _outermost(events, lambda n: n.startswith(_AUTOGRAD_FUNCTION))
                   if _within(e, "zvl.backward"))
    optimizer = sum(e.cpu_time_total for e in _outermost(events, lambda n: n.startswith(_TORCH_OPTIMIZER_STEP))
                    if _within(e, "zvl.optimizer_step"))
    engine = {name: _total_us(events, f"zvl.{name}") for name in ("forward", "model_forward", "backward",
                                                                   "optimizer_step")}
    deepspeed = (max(0.0, engine["forward"] - engine["model_forward"]) + max(0.0, engine["backward"] - autograd)
                 + max(0.0, engine["optimizer_step"] - optimizer))
    split["deepspeed"] = deepspeed * per_step
    split["step_wall"] = 1e3 * wall_seconds / steps
    split["host_other"] = max(0.0, split["step_wall"] - sum(split[phase] for phase in PHASES))
    device = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    if device:
        split["device_kernels_ms"] = sum(e.device_time_total for e in device) * per_step
        split["device_host_to_device_ms"] = sum(e.device_time_total for e in device
                                                if "HtoD" in e.name or "Memcpy HtoD" in e.name) * per_step
    return split


def profile_steps(run_step: Callable[[], object], steps: int = 1, warmup: int = 1,
                  device: torch.device = torch.device("cpu"), trace_path: Optional[str] = None):
    """Run ``warmup`` unprofiled steps, then ``steps`` under the profiler; returns (split, profiler)."""
    for _ in range(warmup):
        run_step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    if trace_path:
        profiler.export_chrome_trace(trace_path)
    return split_events(profiler.events(), steps, wall), profiler
