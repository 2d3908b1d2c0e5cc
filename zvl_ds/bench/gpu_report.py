"""``python -m zvl_ds.bench gpu-report --out DIR``: every GPU figure in one call of at most nine minutes.

Made for short GPU loans: stages in priority order, each in a fresh process with its own time budget. Each
stage writes ``DIR/<stage>.json`` the moment it ends and ``DIR/report.json`` (machine, torch, commit, every stage
so far) is rewritten; a stage that fails or runs out of time is recorded (status, the end of its error output,
seconds) and the next one runs. A stage that runs out of device memory at some chunk runs again at half of it
while its budget lasts.

1. ``dga``: DGA at global batch 16,384 on the paper's towers built from config (random weights), bf16, inputs as
   uint8 in pinned host memory, ZeRO-2, the largest chunk predicted to fit (two small probe steps give the peak
   memory per sample): samples/s, useful and hardware MFU, peak memory, with row-chunked and tiled loss.
2. ``profile``: where one such step's time goes (pass 1, loss, pass 2, optimizer, host->device, DeepSpeed, host).
3. ``openclip``: OpenCLIP's own ``open_clip_train`` on synthetic data with ``--accum-freq``, the same towers
   (``bench/openclip_train.py``) and global batch, bf16 autocast; the ratio of stage 1's samples/s to its.
4. ``big_step``: one exact DGA step at global batch 262,144 on one GPU, inputs in pinned host memory.
5. ``verify_exactness``: ``python -m zvl_ds.verify_exactness`` at a small batch in the same configuration.
6. ``dga_compiled``: stage 1 with ``model.compile=default`` (last: compiling the towers takes minutes).

``--smoke`` runs the very same stages on the CPU with tiny towers, fp32 and small batches in a few minutes (a
test runs it), so that a GPU loan is not lost to a typo. Only the sizes in ``SMOKE`` differ from ``GPU``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from zvl_ds.base.atomic_write import write_text_atomic
from zvl_ds.bench.fresh_process import call_in_fresh_process
from zvl_ds.bench.step import DGA, VIT_B16_BERT_BASE
from zvl_ds.runtime.dist import free_port

REPORT_FILE = "report.json"
STATUSES = ("ok", "failed", "timeout", "skipped")
_ERROR_TAIL = 2000  # characters of a failed stage's error output kept in its record
_MIN_STAGE_SECONDS = 20.0  # a stage with less time left than this is skipped, not started
_CHILD_MARGIN_S = 10.0  # a stage's own child process (open_clip_train, verify_exactness) ends this much earlier
_MEMORY_HEADROOM = 0.85  # the predicted peak may use this share of the device (fragmentation, loader buffers)
_OOM_AT_CHUNK = re.compile(r"out of memory at chunk (\d+)")

# The smoke towers: the tiny preset's text tower and, for the image, timm's registered test_vit (OpenCLIP's timm
# tower takes a model name, not the tiny preset's keyword arguments), so OpenCLIP builds the same towers too.
SMOKE_TOWERS = [
    "model.image_encoder.tag=test_vit", "model.image_encoder.pretrained=false", "model.image_encoder.img_size=160",
    "model.image_encoder.embedding_dim=64", "model.text_encoder.tag=bert", "model.text_encoder.pretrained=false",
    "model.text_encoder.tokenizer=zvl_ds:demo_tokenizer", "model.text_encoder.embedding_dim=64",
    "model.text_encoder.config={model_type: bert, vocab_size: 288, hidden_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 2, intermediate_size: 128, max_position_embeddings: 64}",
    "model.projection.dim=64", "model.max_length=16",
]
# No tokenizer can be downloaded on a bare GPU machine: verify_exactness and OpenCLIP take the packaged demo
# tokenizer (its ids are a subset of BERT-base's vocabulary; the inputs are synthetic anyway).
GPU_TOWERS = VIT_B16_BERT_BASE + ["model.text_encoder.tokenizer=zvl_ds:demo_tokenizer"]


@dataclass(frozen=True)
class ReportSizes:
    """Everything that differs between the GPU run and the smoke run."""

    towers: Tuple[str, ...]
    device: str
    precision: str
    global_batch: int
    chunks: Tuple[int, ...]  # candidate DGA chunks
    probe_chunks: Tuple[int, int]  # two small chunks whose peak memory predicts the others'
    tile_cols: int  # loss.chunk_cols of the tiled loss
    steps: int  # timed steps per measurement, after `warmup` untimed ones
    warmup: int
    big_batch: int
    verify_batch: int
    verify_chunk: int
    openclip_steps: int  # the first is warm-up
    openclip_workers: int
    compile_backend: str
    zero_stage: int
    budgets: Mapping[str, float] = field(default_factory=dict)  # seconds per stage
    total_seconds: float = 540.0
    peak_tflops: Optional[float] = None  # the device's dense peak for MFU; None: known GPUs' figure


GPU = ReportSizes(
    towers=tuple(GPU_TOWERS), device="cuda", precision="bf16", global_batch=16384,
    chunks=(128, 256, 512, 1024, 2048, 4096), probe_chunks=(64, 128), tile_cols=1024, steps=1, warmup=1,
    big_batch=262144, verify_batch=64, verify_chunk=16, openclip_steps=3,
    openclip_workers=max(1, min(12, (os.cpu_count() or 2) - 2)), compile_backend="inductor", zero_stage=2,
    # big_step is 16 steps' work (~100 s at 2,500 samples/s) plus filling 40 GB of pinned inputs; dga_compiled
    # gets what the others leave (compiling two towers takes minutes: run it alone with --stages if it times out)
    budgets={"dga": 100, "profile": 60, "openclip": 100, "big_step": 190, "verify_exactness": 50,
             "dga_compiled": 150},
    total_seconds=520.0)  # 9 minutes with the parent's own start and the last stage's kill margin
SMOKE = ReportSizes(
    towers=tuple(SMOKE_TOWERS), device="cpu", precision="fp32", global_batch=16, chunks=(2, 4, 8),
    probe_chunks=(2, 4), tile_cols=8, steps=1, warmup=1, big_batch=64, verify_batch=8, verify_chunk=4,
    openclip_steps=2, openclip_workers=1, compile_backend="eager", zero_stage=2,
    budgets={"dga": 240, "profile": 240, "openclip": 300, "big_step": 240, "verify_exactness": 240,
             "dga_compiled": 240},
    total_seconds=1500.0)


# ---------------------------------------------------------------------------------------------------------------
# What a stage measures (each function runs in a fresh process and returns JSON)
# ---------------------------------------------------------------------------------------------------------------

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


def synthetic_offloaded_batch(cfg, size: int, device: torch.device, seed: int = 0):
    """``size`` uint8 images (in pinned host memory when ``device`` is CUDA) and random token ids."""
    from zvl_ds.objective.step import StepBatch

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
    from zvl_ds.bench.step import _guess_peak_tflops

    if given:
        return given
    if device.type != "cuda":
        return None
    try:
        return _guess_peak_tflops(precision)
    except RuntimeError:
        return None


def dga_throughput(towers: Sequence[str], device: str, precision: str, global_batch: int, chunks: Sequence[int],
                   probe_chunks: Sequence[int], tile_cols: int, steps: int, warmup: int, zero_stage: int,
                   compile_mode: str = "none", compile_backend: str = "inductor", chunk: Optional[int] = None,
                   forward_flops: Optional[float] = None, peak_tflops: Optional[float] = None) -> Dict[str, object]:
    """samples/s, MFU and peak memory of DGA steps at ``global_batch``, row-chunked loss and tiled loss, on one
    engine. Without ``chunk``, two probe steps predict the largest of ``chunks`` that fits."""
    from zvl_ds.bench.step import _bench_step, _setup_engine, _timed_steps, model_flops_per_sample
    from zvl_ds.config import load_config
    from zvl_ds.observe.monitor import peak_memory_bytes

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
    from zvl_ds.bench.step import bench_profile

    overrides = report_overrides(towers, device, precision, global_batch, chunk, tile_cols)
    result = bench_profile(overrides, chunk=chunk, chunks=global_batch // chunk, steps=1, warmup=1, stage=zero_stage,
                           offload_inputs=True, loss="NCE")
    return {**result, "loss_chunk_cols": tile_cols}


def big_step(towers: Sequence[str], device: str, precision: str, global_batch: int, chunk: int, tile_cols: int,
             zero_stage: int) -> Dict[str, object]:
    """One DGA step at ``global_batch``, inputs as uint8 in pinned host memory: time, memory, loss, accuracies."""
    import resource

    from zvl_ds.bench.step import _bench_step, _setup_engine
    from zvl_ds.config import load_config
    from zvl_ds.observe.monitor import peak_memory_bytes

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


_GROUP_LINE = re.compile(r"^(.+?)\s+([0-9.]+e[-+][0-9]+)\s+([0-9.]+e[-+][0-9]+)\s+([0-9.]+e[-+][0-9]+)")


def parse_verify_output(stdout: str) -> Dict[str, object]:
    """verify_exactness's table: the relative difference per parameter group and its PASS/FAIL line."""
    groups = {}
    for line in stdout.splitlines():
        match = _GROUP_LINE.match(line.strip())
        if match:
            groups[match.group(1).strip()] = {"max_abs_diff": float(match.group(2)),
                                              "reference_max": float(match.group(3)),
                                              "relative": float(match.group(4))}
    verdict = re.search(r"^(PASS|FAIL): tolerance (\S+)", stdout, re.M)
    return {"groups": groups, "passed": bool(verdict) and verdict.group(1) == "PASS",
            "tolerance": float(verdict.group(2)) if verdict else None}


def verify_exactness_small(towers: Sequence[str], device: str, precision: str, global_batch: int, chunk: int,
                           tile_cols: int, zero_stage: int, folder: str, timeout_s: float) -> Dict[str, object]:
    """``python -m zvl_ds.verify_exactness --synthetic`` in the report's configuration at a small batch."""
    os.makedirs(folder, exist_ok=True)
    cfg_path, ds_path = os.path.join(folder, "config.yaml"), os.path.join(folder, "ds_config.json")
    with open(cfg_path, "w", encoding="utf-8") as handle:
        handle.write("# the configuration is given as key=value overrides on the command line\n{}\n")
    with open(ds_path, "w", encoding="utf-8") as handle:
        json.dump({"zero_optimization": {"stage": zero_stage}}, handle)
    command = ([sys.executable, "-m", "zvl_ds.verify_exactness", "--synthetic", "--deepspeed_config", ds_path,
                "--cfg", cfg_path] + report_overrides(towers, device, precision, global_batch, chunk, tile_cols))
    env = {**os.environ, **_single_rank_env()}
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, timeout_s - _CHILD_MARGIN_S),
                          env=env)
    if done.returncode not in (0, 1):  # 1 is a verdict (a group beyond tolerance), anything else a failure
        raise RuntimeError(f"verify_exactness exited with {done.returncode}:\n{done.stderr[-_ERROR_TAIL:]}")
    return {**parse_verify_output(done.stdout), "exit_code": done.returncode, "global_batch": global_batch,
            "chunk": chunk, "precision": precision, "zero_stage": zero_stage, "command": command[1:],
            "output": done.stdout[-_ERROR_TAIL:]}


def openclip_throughput(towers: Sequence[str], device: str, precision: str, global_batch: int, chunk: int,
                        steps: int, workers: int, folder: str, timeout_s: float,
                        zvl_ds_samples_per_sec: Optional[float] = None) -> Dict[str, object]:
    """open_clip_train's samples/s on the same towers and global batch (``bench/openclip_train.py``), and the
    ratio zvl_ds / OpenCLIP when stage 1's figure is given."""
    from zvl_ds.bench.openclip_train import (OPENCLIP_PRECISION, openclip_train_command, samples_per_second, step_rates,
                                             write_model_folder)
    from zvl_ds.config import load_config

    cfg = load_config(None, list(towers))
    model = write_model_folder(cfg, os.path.join(folder, "model"))
    command = openclip_train_command(model, os.path.join(folder, "logs"), global_batch, chunk, steps,
                                     OPENCLIP_PRECISION[precision], device, workers)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, timeout_s - _CHILD_MARGIN_S))
    log = done.stdout + done.stderr
    rates = step_rates(log)
    if done.returncode != 0 or not rates:
        raise RuntimeError(f"open_clip_train at chunk {chunk} exited with {done.returncode}"
                           + (" (out of memory at chunk {})".format(chunk) if "out of memory" in log.lower() else "")
                           + f":\n{log[-_ERROR_TAIL:]}")
    rate = samples_per_second(rates)
    return {"global_batch": global_batch, "chunk": chunk, "accum_freq": global_batch // chunk,
            "precision": OPENCLIP_PRECISION[precision], "device": device, "steps_logged": len(rates),
            "samples_per_sec_per_step": rates, "samples_per_sec": rate, "seconds": time.monotonic() - started,
            "zvl_ds_samples_per_sec": zvl_ds_samples_per_sec,
            "ratio_zvl_ds_to_openclip": zvl_ds_samples_per_sec / rate if zvl_ds_samples_per_sec else None,
            "command": command[3:]}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


# ---------------------------------------------------------------------------------------------------------------
# The stages and the runner
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # "module:function", called in a fresh process
    kwargs: Callable[[ReportSizes, Mapping[str, Dict], str, float], Dict]  # (sizes, records so far, out, budget)
    what: str


def _ok_result(records: Mapping[str, Dict], name: str) -> Optional[Dict]:
    record = records.get(name)
    return record["result"] if record and record["status"] == "ok" else None


def _chunk(sizes: ReportSizes, records: Mapping[str, Dict]) -> int:
    """Stage 1's chunk; without it, the largest candidate up to 512 (or the smallest)."""
    dga = _ok_result(records, "dga")
    if dga:
        return int(dga["chunk"])
    usable = [c for c in sizes.chunks if sizes.global_batch % c == 0]
    return max([c for c in usable if c <= 512] or usable[:1])


def _common(sizes: ReportSizes) -> Dict:
    return {"towers": list(sizes.towers), "device": sizes.device, "precision": sizes.precision}


def _step_kwargs(sizes: ReportSizes, global_batch: int, chunk: int, **extra) -> Dict:
    """The arguments of a stage that measures zvl_ds's step in the report's configuration."""
    return {**_common(sizes), "global_batch": global_batch, "chunk": chunk, "tile_cols": sizes.tile_cols,
            "zero_stage": sizes.zero_stage, **extra}


def _dga_kwargs(sizes, records, out, budget, compile_mode="none", chunk=None):
    dga = _ok_result(records, "dga")
    return {**_common(sizes), "global_batch": sizes.global_batch, "chunks": list(sizes.chunks),
            "probe_chunks": list(sizes.probe_chunks), "tile_cols": sizes.tile_cols, "steps": sizes.steps,
            "warmup": sizes.warmup, "zero_stage": sizes.zero_stage, "compile_mode": compile_mode,
            "compile_backend": sizes.compile_backend, "chunk": chunk, "peak_tflops": sizes.peak_tflops,
            "forward_flops": dga["forward_gflops_per_sample"] * 1e9 if dga else None}


STAGES: List[Stage] = [
    Stage("dga", f"{__name__}:dga_throughput", lambda s, r, o, b: _dga_kwargs(s, r, o, b),
          "DGA samples/s, MFU and peak memory; row-chunked and tiled loss"),
    Stage("profile", f"{__name__}:step_profile",
          lambda s, r, o, b: _step_kwargs(s, s.global_batch, _chunk(s, r)), "where one DGA step's time goes"),
    Stage("openclip", f"{__name__}:openclip_throughput",
          lambda s, r, o, b: {**_common(s), "global_batch": s.global_batch, "chunk": _chunk(s, r),
                              "steps": s.openclip_steps, "workers": s.openclip_workers,
                              "folder": os.path.join(o, "openclip"), "timeout_s": b,
                              "zvl_ds_samples_per_sec": (_ok_result(r, "dga") or {}).get("samples_per_sec")},
          "open_clip_train --accum-freq on the same towers and batch"),
    Stage("big_step", f"{__name__}:big_step",
          lambda s, r, o, b: _step_kwargs(s, s.big_batch, _chunk(s, r)),
          "one exact DGA step at the largest global batch, inputs in pinned host memory"),
    Stage("verify_exactness", f"{__name__}:verify_exactness_small",
          lambda s, r, o, b: _step_kwargs(s, s.verify_batch, s.verify_chunk,
                                          folder=os.path.join(o, "verify_exactness"), timeout_s=b),
          "verify_exactness at a small batch, same configuration"),
    Stage("dga_compiled", f"{__name__}:dga_throughput",
          lambda s, r, o, b: _dga_kwargs(s, r, o, b, compile_mode="default", chunk=_chunk(s, r)),
          "stage 1 with model.compile=default"),
]
STAGE_NAMES = [stage.name for stage in STAGES]


def _single_rank_env() -> Dict[str, str]:
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def _tail(text) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "")[-_ERROR_TAIL:]


def run_stage(function: str, kwargs: Dict, budget_s: float) -> Dict[str, object]:
    """Run ``function`` in fresh processes within ``budget_s``: a record with status ``ok`` (and its result),
    ``failed`` or ``timeout`` (and the end of its error output), seconds and the attempts. Out of device memory
    at a chunk: run again at half of it while the budget lasts."""
    start = time.monotonic()
    attempts: List[Dict] = []
    while True:
        remaining = budget_s - (time.monotonic() - start)
        try:
            result, error = call_in_fresh_process(function, kwargs, timeout_s=max(1.0, remaining),
                                                  env=_single_rank_env())
        except subprocess.TimeoutExpired as expired:
            return {"status": "timeout", "seconds": time.monotonic() - start, "result": None,
                    "error_tail": f"ran out of its {budget_s:.0f} s budget\n" + _tail(expired.stderr),
                    "attempts": attempts}
        if result is not None:
            return {"status": "ok", "seconds": time.monotonic() - start, "result": result, "error_tail": None,
                    "attempts": attempts}
        chunk = _failed_chunk(error, kwargs)
        attempts.append({"kwargs": {k: v for k, v in kwargs.items() if k != "towers"}, "error_tail": _tail(error)})
        if chunk is None or chunk // 2 < 1 or budget_s - (time.monotonic() - start) < _MIN_STAGE_SECONDS:
            return {"status": "failed", "seconds": time.monotonic() - start, "result": None,
                    "error_tail": _tail(error), "attempts": attempts}
        kwargs = {**kwargs, "chunk": chunk // 2}


def _failed_chunk(error: Optional[str], kwargs: Mapping) -> Optional[int]:
    """The chunk at which a stage ran out of device memory, or None when it failed otherwise."""
    text = error or ""
    match = _OOM_AT_CHUNK.search(text)
    if match:
        return int(match.group(1))
    if "chunk" in kwargs and kwargs["chunk"] and ("out of memory" in text.lower() or "OutOfMemoryError" in text):
        return int(kwargs["chunk"])
    return None


def machine_facts() -> Dict[str, object]:
    """The machine, torch and commit a report names."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "gpu_count": torch.cuda.device_count() if gpu else 0,
            "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit_id()}


def commit_id() -> str:
    """The commit measured: a COMMIT file beside the package (a bundle from tools/gpu_report_bundle.sh), else
    ``ZVL_DS_COMMIT``, else the checkout's ``git describe`` (``-dirty`` with uncommitted changes), else ``unknown``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    marker = os.path.join(root, "COMMIT")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as handle:
            return handle.read().strip() or "unknown"
    if os.environ.get("ZVL_DS_COMMIT"):
        return os.environ["ZVL_DS_COMMIT"]
    try:
        done = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def _write_json(path: str, payload: Dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


def run_report(out: str, sizes: ReportSizes, stage_names: Optional[Sequence[str]] = None,
               smoke: bool = False, log: Callable[[str], None] = print,
               stages: Sequence[Stage] = STAGES) -> Dict[str, object]:
    """Run the stages in order within ``sizes.total_seconds``; returns the report also written to OUT/report.json."""
    os.makedirs(out, exist_ok=True)
    chosen = [stage for stage in stages if stage_names is None or stage.name in stage_names]
    start = time.monotonic()
    report: Dict[str, object] = {"smoke": smoke, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), **machine_facts(), "sizes": asdict(sizes), "order": [s.name for s in chosen],
        "stages": {}}
    records: Dict[str, Dict] = report["stages"]  # type: ignore[assignment]
    for stage in chosen:
        left = sizes.total_seconds - (time.monotonic() - start)
        budget = min(sizes.budgets.get(stage.name, left), left) if stage is not chosen[-1] else left
        if budget < _MIN_STAGE_SECONDS:
            record = {"status": "skipped", "seconds": 0.0, "result": None, "attempts": [],
                      "error_tail": f"no time left ({left:.0f} s of the run's {sizes.total_seconds:.0f} s)"}
        else:
            log(f"== {stage.name}: {stage.what} (budget {budget:.0f} s)")
            kwargs = stage.kwargs(sizes, records, os.path.abspath(out), budget)
            record = run_stage(stage.function, kwargs, budget)
        record = {"stage": stage.name, "what": stage.what, "budget_seconds": budget, **record}
        records[stage.name] = record
        report["seconds"] = time.monotonic() - start
        _write_json(os.path.join(out, f"{stage.name}.json"), record)
        _write_json(os.path.join(out, REPORT_FILE), report)
        log(summary_line(record))
    return report


def summary_line(record: Mapping) -> str:
    """One line per stage for the console: its status and headline figures."""
    head = f"   {record['stage']}: {record['status']} in {record['seconds']:.0f} s"
    result = record.get("result")
    if record["status"] != "ok" or not result:
        tail = (record.get("error_tail") or "").strip().splitlines()
        return head + (f": {tail[-1]}" if tail else "")
    name = record["stage"]
    if name in ("dga", "dga_compiled"):
        parts = [f"{v}: {r['samples_per_sec']:.1f} samples/s" + (f", MFU {100 * r['mfu_useful']:.1f}%"
                                                                   if r["mfu_useful"] else "")
                 for v, r in result["variants"].items()]
        return head + f" (chunk {result['chunk']}) " + "; ".join(parts)
    if name == "profile":
        split = result["ms_per_step"]
        return head + " " + ", ".join(f"{k} {v:.0f} ms" for k, v in split.items())
    if name == "openclip":
        ratio = result["ratio_zvl_ds_to_openclip"]
        return head + f" {result['samples_per_sec']:.1f} samples/s" + (f", ratio {ratio:.2f}x" if ratio else "")
    if name == "big_step":
        return head + f" step {result['step_seconds']:.1f} s, loss {result['loss']:.4f}, applied {result['applied']}"
    if name == "verify_exactness":
        return head + (" PASS" if result["passed"] else " FAIL")
    return head


def main_gpu_report(out: str, smoke: bool, stage_names: Optional[Sequence[str]] = None,
                    total_seconds: Optional[float] = None, peak_tflops: Optional[float] = None) -> int:
    """The ``gpu-report`` command; exit status 0 when every stage that ran ended ``ok``."""
    sizes = replace(SMOKE if smoke else GPU, peak_tflops=peak_tflops)
    if total_seconds:
        sizes = replace(sizes, total_seconds=total_seconds)
    if not smoke and not torch.cuda.is_available():
        from zvl_ds.base.errors import UserError

        raise UserError("gpu-report needs a CUDA device; --smoke runs every stage on the CPU at tiny sizes")
    unknown = sorted(set(stage_names or ()) - set(STAGE_NAMES))
    if unknown:
        from zvl_ds.base.errors import UserError

        raise UserError(f"--stages: unknown stage(s) {unknown} (valid: {', '.join(STAGE_NAMES)})")
    report = run_report(out, sizes, stage_names, smoke=smoke)
    statuses = {name: record["status"] for name, record in report["stages"].items()}  # type: ignore[union-attr]
    print(f"\nreport: {os.path.join(out, REPORT_FILE)} ({report['seconds']:.0f} s): "
          + ", ".join(f"{name} {status}" for name, status in statuses.items()))
    return 0 if all(status == "ok" for status in statuses.values()) else 1
