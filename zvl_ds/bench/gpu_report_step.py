"""gpu-report's stages that time zvl_ds's own DGA step: ``dga`` and ``dga_compiled`` (``dga_throughput``),
``profile`` (``step_profile``) and ``big_step``, with what they share: the report's configuration, uint8 inputs
in pinned host memory, and the largest chunk predicted to fit from two probe steps.

Each stage function runs in a fresh process (``bench/fresh_process.py``), takes JSON keyword arguments and returns
JSON; ``bench/gpu_report.py`` runs them in order, each within its own time budget.
"""
from __future__ import annotations

import os
import platform
import resource
import time
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from zvl_ds.bench.step import (DGA, _bench_step, _guess_peak_tflops, _setup_engine, _timed_steps, bench_profile,
                               model_flops_per_sample)
from zvl_ds.config import load_config
from zvl_ds.objective.step import StepBatch
from zvl_ds.observe.monitor import peak_memory_bytes

_MEMORY_HEADROOM = 0.85  # the predicted peak may use this share of the device (fragmentation, loader buffers)


def report_overrides(towers: Sequence[str], device: str, precision: str, global_batch: int, chunk: int,
                     tile_cols: int) -> List[str]:
    """The configuration every zvl_ds stage measures: DGA, NCE (OpenCLIP's loss), inputs in pinned host memory."""
    return list(towers) + DGA + [f"device={device}", f"precision={precision}", "loss.name=NCE",
                                 "runner.offload_inputs=true", f"data.batch_size={global_batch}",
                                 f"data.batch_size_train={chunk}", f"loss.chunk_cols={tile_cols}"]


def fill_random_images(images: torch.Tensor, seed: int = 0, block_bytes: int = 1 << 25) -> None:
    """Fill uint8 ``images`` [N, ...] in place with noise, fast enough for 40 GB.

    Drawing every byte takes minutes at that size, so each image is a window onto one random block, at an
    offset of its own (no two images of a batch are equal)."""
    rows = images.view(images.shape[0], -1)
    per_image = rows.shape[1]
    stride, group = 257, 4096  # consecutive images are windows 257 bytes apart, `group` images per copy
    block_bytes = max(block_bytes, 2 * (stride * group + per_image))
    block = torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    span = stride * (group - 1) + per_image
    for index, start in enumerate(range(0, rows.shape[0], group)):
        count = min(group, rows.shape[0] - start)
        offset = (index * 1_000_003) % (block_bytes - span)
        rows[start:start + count].copy_(block.as_strided((count, per_image), (stride, 1), offset))


def synthetic_offloaded_batch(cfg, size: int, device: torch.device, seed: int = 0) -> StepBatch:
    """``size`` uint8 images (in pinned host memory when ``device`` is CUDA) and random token ids."""
    side = cfg.model.image_encoder.img_size or cfg.transforms.input_size
    images = torch.empty((size, 3, side, side), dtype=torch.uint8, pin_memory=device.type == "cuda")
    fill_random_images(images, seed)
    input_ids = torch.randint(5, 200, (size, cfg.model.max_length), generator=torch.Generator().manual_seed(seed))
    return StepBatch(images, input_ids, torch.ones_like(input_ids))


def device_capacity_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def predict_largest_chunk(probe_peaks: Mapping[int, int], candidates: Sequence[int], global_batch: int,
                          capacity_bytes: int, headroom: float = _MEMORY_HEADROOM) -> Dict[str, object]:
    """The largest candidate chunk dividing ``global_batch`` whose peak, on the line through the two probes'
    (chunk, peak memory) points, stays under ``headroom`` x capacity; else the smallest candidate."""
    (small, small_peak), (large, large_peak) = sorted(probe_peaks.items())[:2]
    per_sample = max(0.0, (large_peak - small_peak) / (large - small))
    fixed = small_peak - per_sample * small
    usable = [c for c in sorted(candidates) if global_batch % c == 0]
    if not usable:
        raise ValueError(f"no candidate chunk {list(candidates)} divides the global batch {global_batch}")
    fitting = [c for c in usable if fixed + per_sample * c <= headroom * capacity_bytes]
    chunk = fitting[-1] if fitting else usable[0]
    return {"chunk": chunk, "predicted_peak_bytes": fixed + per_sample * chunk, "bytes_per_sample": per_sample,
            "fixed_bytes": fixed, "capacity_bytes": capacity_bytes, "headroom": headroom,
            "probe_peaks": {str(c): p for c, p in sorted(probe_peaks.items())}}


def _peak_tflops(device: torch.device, precision: str, given: Optional[float]) -> Optional[float]:
    if given:
        return given
    if device.type != "cuda":
        return None
    try:
        return _guess_peak_tflops(precision)
    except RuntimeError:
        return None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def dga_throughput(towers: Sequence[str], device: str, precision: str, global_batch: int, chunks: Sequence[int],
                   probe_chunks: Sequence[int], tile_cols: int, steps: int, warmup: int, zero_stage: int,
                   compile_mode: str = "none", compile_backend: str = "inductor", chunk: Optional[int] = None,
                   forward_flops: Optional[float] = None, peak_tflops: Optional[float] = None) -> Dict[str, object]:
    """samples/s, MFU and peak memory of DGA steps at ``global_batch``, row-chunked loss and tiled loss, on one
    engine. Without ``chunk``, two probe steps predict the largest of ``chunks`` that fits."""
    def config(batch: int, size: int, cols: int):
        return load_config(None, report_overrides(towers, device, precision, batch, size, cols)
                           + [f"model.compile={compile_mode}"])

    base = config(global_batch, chunk or max(chunks), tile_cols)
    engine, placement = _setup_engine(base, zero_stage, compile_backend)
    choice = None
    if chunk is None:
        peaks = {}
        for probe in probe_chunks:
            probe_cfg = config(2 * probe, probe, tile_cols)
            probe_batch = synthetic_offloaded_batch(probe_cfg, 2 * probe, placement.device)
            _reset_peak(placement.device)
            _timed_steps(engine, _bench_step(probe_cfg, placement), probe_batch, 1, 0, placement.device)
            peaks[probe] = peak_memory_bytes(placement.device)
        choice = predict_largest_chunk(peaks, chunks, global_batch, device_capacity_bytes(placement.device))
        chunk = int(choice["chunk"])
    flops = forward_flops or model_flops_per_sample(config(global_batch, chunk, tile_cols))
    peak = _peak_tflops(placement.device, precision, peak_tflops)
    batch = synthetic_offloaded_batch(base, global_batch, placement.device)
    variants = {}
    for name, cols in (("rows", 0), ("tiled", tile_cols)):
        step_cfg = config(global_batch, chunk, cols)
        _reset_peak(placement.device)
        try:
            seconds, result = _timed_steps(engine, _bench_step(step_cfg, placement), batch, steps, warmup,
                                           placement.device)
        except torch.cuda.OutOfMemoryError as error:
            raise RuntimeError(f"out of memory at chunk {chunk} ({name} loss): {error}") from error
        rate = global_batch / seconds
        variants[name] = {
            "loss_chunk_cols": cols, "step_seconds": seconds, "samples_per_sec": rate,
            "mfu_useful": 3 * flops * rate / (peak * 1e12) if peak else None,
            "mfu_hardware": 4 * flops * rate / (peak * 1e12) if peak else None,
            "peak_memory_bytes": peak_memory_bytes(placement.device), "loss": result.loss,
            "i2t_acc": result.i2t_acc, "t2i_acc": result.t2i_acc}
    best = max(variants, key=lambda name: variants[name]["samples_per_sec"])
    return {"device": _device_name(placement.device), "precision": precision, "global_batch": global_batch,
            "chunk": chunk, "chunk_choice": choice, "compile": compile_mode, "zero_stage": zero_stage,
            "steps": steps, "warmup": warmup, "forward_gflops_per_sample": flops / 1e9, "peak_tflops_assumed": peak,
            "peak_memory_kind": "device" if placement.device.type == "cuda" else "process peak RSS",
            "variants": variants, "best_variant": best, "samples_per_sec": variants[best]["samples_per_sec"]}


def step_profile(towers: Sequence[str], device: str, precision: str, global_batch: int, chunk: int, tile_cols: int,
                 zero_stage: int) -> Dict[str, object]:
    """``bench profile``'s split of one DGA step, in the report's configuration."""
    overrides = report_overrides(towers, device, precision, global_batch, chunk, tile_cols)
    result = bench_profile(overrides, chunk=chunk, chunks=global_batch // chunk, steps=1, warmup=1, stage=zero_stage,
                           offload_inputs=True, loss="NCE")
    return {**result, "loss_chunk_cols": tile_cols}


def big_step(towers: Sequence[str], device: str, precision: str, global_batch: int, chunk: int, tile_cols: int,
             zero_stage: int) -> Dict[str, object]:
    """One DGA step at ``global_batch``, inputs as uint8 in pinned host memory: time, memory, loss, accuracies."""
    cfg = load_config(None, report_overrides(towers, device, precision, global_batch, chunk, tile_cols))
    engine, placement = _setup_engine(cfg, zero_stage)
    start = time.perf_counter()
    batch = synthetic_offloaded_batch(cfg, global_batch, placement.device)
    fill_seconds = time.perf_counter() - start
    step = _bench_step(cfg, placement)
    _reset_peak(placement.device)
    start = time.perf_counter()
    try:
        result = step(engine, batch, 0)
    except torch.cuda.OutOfMemoryError as error:
        raise RuntimeError(f"out of memory at chunk {chunk}: {error}") from error
    if placement.device.type == "cuda":
        torch.cuda.synchronize(placement.device)
    seconds = time.perf_counter() - start
    return {"device": _device_name(placement.device), "precision": precision, "global_batch": global_batch,
            "chunk": chunk, "loss_chunk_cols": tile_cols, "zero_stage": zero_stage, "step_seconds": seconds,
            "applied": result.applied, "skip_reason": result.skip_reason, "loss": result.loss,
            "i2t_acc": result.i2t_acc, "t2i_acc": result.t2i_acc, "temperature": result.temperature,
            "peak_device_memory_bytes": peak_memory_bytes(placement.device) if placement.device.type == "cuda"
            else None,
            "input_bytes": batch.images.numel() + batch.input_ids.numel() * 8 + batch.attention_mask.numel() * 8,
            "inputs_pinned": bool(batch.images.is_pinned()), "input_fill_seconds": fill_seconds,
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
