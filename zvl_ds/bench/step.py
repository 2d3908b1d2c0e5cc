"""Benchmarks of the training step: DGA vs single-pass time, memory vs global batch, GPU throughput and MFU.

Every figure is measured side by side in one run on one machine, so ratios hold wherever they were taken.
Inputs are synthetic (uint8 images, random tokens) so that the step, not the loader, is measured.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from zvl_ds.bench.fresh_process import call_in_fresh_process, single_rank_env
from zvl_ds.bench.openclip_step import accum_freq_step, clip_loss
from zvl_ds.bench.step_profile import profile_steps
from zvl_ds.config import Config, load_config
from zvl_ds.model.build import build_model
from zvl_ds.model.towers import compile_towers
from zvl_ds.objective.build import build_step
from zvl_ds.objective.step import ImagePreparation, StepBatch
from zvl_ds.observe.monitor import peak_memory_bytes
from zvl_ds.runtime import dist
from zvl_ds.runtime.engine import DTYPES, build_ds_config, initialize_engine, resolve_placement
from zvl_ds.runtime.optim import build_optimizer

_STEP_TIMEOUT_S = 1800  # one step of the largest model and batch in a fresh process, on a slow CPU

TINY = ["model.arch=tiny", "model.image_encoder.kwargs.patch_size=4"]
# The paper's model with random weights: no download, but the real shapes and FLOPs.
VIT_B16_BERT_BASE = [
    "model.arch=vit_b16_bert_base", "model.image_encoder.pretrained=false", "model.text_encoder.pretrained=false",
    "model.text_encoder.config={model_type: bert, vocab_size: 30522, hidden_size: 768, num_hidden_layers: 12, "
    "num_attention_heads: 12, intermediate_size: 3072, max_position_embeddings: 512}",
]
# The DGA runner (ZeroVL's clip_bsgs); the default runner, clip, would run the whole batch in one pass.
DGA = ["runner.name=clip_bsgs"]


def _setup_engine(cfg: Config, stage: int, compile_backend: str = "inductor"):
    dist.init_distributed()
    placement = resolve_placement(cfg)
    torch.manual_seed(cfg.seed)
    model = compile_towers(build_model(cfg.model, cfg.loss), cfg.model.compile, compile_backend)
    engine = initialize_engine(model, build_optimizer(model, cfg.optim, placement.device),
                               build_ds_config({"zero_optimization": {"stage": stage}}, cfg, 1))
    engine.train()
    return engine, placement


def _synthetic_batch(cfg: Config, batch: int, device: torch.device):
    size = cfg.transforms.input_size if cfg.model.image_encoder.img_size is None else cfg.model.image_encoder.img_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    input_ids = torch.randint(5, 200, (batch, cfg.model.max_length))
    return StepBatch(images.to(device), input_ids.to(device), torch.ones_like(input_ids).to(device))


def _bench_step(cfg: Config, placement):
    """The trainer's step for ``cfg`` on one rank (``objective.build``)."""
    return build_step(cfg, 1, 0, placement.device, placement.dtype)


def _time_steps(engine, step, batch, steps: int, warmup: int, device) -> float:
    return _timed_steps(engine, step, batch, steps, warmup, device)[0]


def _timed_steps(engine, step, batch, steps: int, warmup: int, device):
    """(seconds per step after ``warmup`` untimed steps, the last step's ``StepResult``)."""
    for _ in range(warmup):
        step(engine, batch, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        result = step(engine, batch, 0)
        if not result.applied:
            raise RuntimeError(f"a benchmark step was skipped: {result.skip_reason}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, result


def bench_dga(overrides: Sequence[str] = TINY, chunk: int = 32, chunks: int = 8, steps: int = 5, warmup: int = 2,
              stage: int = 0) -> Dict[str, float]:
    """Time per sample of a DGA step (``chunks`` chunks of ``chunk``) vs a single-pass step of ``chunk``."""
    cfg = load_config(None, list(overrides) + DGA + [f"data.batch_size={chunk * chunks}",
                                                     f"data.batch_size_train={chunk}", "loss.name=MixUpNCE"])
    single_cfg = load_config(None, list(overrides) + [f"data.batch_size={chunk}", "loss.name=MixUpNCE",
                                                      "runner.name=clip"])
    engine, placement = _setup_engine(cfg, stage)
    single = _time_steps(engine, _bench_step(single_cfg, placement), _synthetic_batch(cfg, chunk, placement.device),
                         steps * 2, warmup, placement.device)
    dga = _time_steps(engine, _bench_step(cfg, placement), _synthetic_batch(cfg, chunk * chunks, placement.device),
                      steps, warmup, placement.device)
    return {"chunk": chunk, "global_batch": chunk * chunks, "single_pass_ms_per_sample": 1e3 * single / chunk,
            "dga_ms_per_sample": 1e3 * dga / (chunk * chunks), "ratio": (dga / (chunk * chunks)) / (single / chunk)}


def bench_patch_dropout(overrides: Sequence[str] = TINY, chunk: int = 32, chunks: int = 8,
                        shares: Sequence[float] = (0.0, 0.25, 0.5), steps: int = 3, warmup: int = 1,
                        stage: int = 0) -> Dict[str, object]:
    """Time of a DGA step (``chunks`` chunks of ``chunk``) with ``model.image_encoder.patch_dropout`` at each share,
    side by side in this process; the speed-up is relative to the first share (0: no patch dropout).

    The shares take turns step by step and each keeps its fastest step, so a machine busy with other work slows
    them alike; the process's CPU time per step is reported too (what a busy shared CPU cannot inflate).
    """
    setups = []
    for share in shares:
        cfg = load_config(None, list(overrides) + [f"data.batch_size={chunk * chunks}",
                                                   f"data.batch_size_train={chunk}", "loss.name=MixUpNCE",
                                                   f"model.image_encoder.patch_dropout={share}"])
        engine, placement = _setup_engine(cfg, stage)
        setups.append((share, engine, _bench_step(cfg, placement), _synthetic_batch(cfg, chunk * chunks,
                                                                                    placement.device), placement))
    best = {share: (float("inf"), float("inf")) for share in shares}
    for index in range(warmup + steps):
        for share, engine, step, batch, placement in setups:
            wall, cpu = time.perf_counter(), time.process_time()
            assert step(engine, batch, index).applied
            if placement.device.type == "cuda":
                torch.cuda.synchronize()
            if index >= warmup:
                elapsed = (time.perf_counter() - wall, time.process_time() - cpu)
                best[share] = (min(best[share][0], elapsed[0]), min(best[share][1], elapsed[1]))
    first = best[shares[0]]
    rows = [{"patch_dropout": share, "step_seconds": wall, "cpu_seconds": cpu,
             "samples_per_sec": chunk * chunks / wall, "speedup": first[0] / wall, "cpu_speedup": first[1] / cpu}
            for share, (wall, cpu) in best.items()]
    return {"chunk": chunk, "global_batch": chunk * chunks, "rows": rows}


def bench_profile(overrides: Sequence[str] = TINY, chunk: int = 32, chunks: int = 8, steps: int = 1,
                  warmup: int = 1, stage: int = 0, trace_path: Optional[str] = None,
                  offload_inputs: bool = False, loss: str = "MixUpNCE") -> Dict[str, object]:
    """Where one DGA step's time goes (see ``zvl_ds.bench.step_profile``), ms per step."""
    global_batch = chunk * chunks
    cfg = load_config(None, list(overrides) + DGA + [f"data.batch_size={global_batch}",
                                                     f"data.batch_size_train={chunk}", f"loss.name={loss}"])
    engine, placement = _setup_engine(cfg, stage)
    offload = offload_inputs and placement.device.type == "cuda"
    batch = _synthetic_batch(cfg, global_batch, torch.device("cpu") if offload else placement.device)
    if offload:
        batch.images = batch.images.pin_memory()
    step = _bench_step(cfg, placement)
    split, _ = profile_steps(lambda: step(engine, batch, 0), steps=steps,
                             warmup=warmup, device=placement.device, trace_path=trace_path)
    return {"chunk": chunk, "global_batch": global_batch, "device": placement.device.type,
            "precision": cfg.precision or "fp32", "compile": cfg.model.compile, "steps": steps, "ms_per_step": split}


def bench_openclip(overrides: Sequence[str] = TINY, chunk: int = 32, chunks: int = 8, steps: int = 2,
                   warmup: int = 1, precision: str = "fp32") -> Dict[str, object]:
    """samples/s of OpenCLIP's ``--accum-freq`` step (``zvl_ds.bench.openclip_step``) and of zvl_ds's DGA step, same
    towers, batch (``chunks`` micro-batches of ``chunk``) and loss (symmetric InfoNCE), in this one process.

    OpenCLIP's side runs as open_clip_train does: fp32 weights, a plain torch AdamW, ``torch.autocast`` for
    bf16/fp16. zvl_ds's side is a DeepSpeed engine (ZeRO 0) in ``precision``.
    """
    global_batch = chunk * chunks
    cfg = load_config(None, list(overrides) + DGA + [f"data.batch_size={global_batch}",
                                                     f"data.batch_size_train={chunk}", "loss.name=NCE",
                                                     f"precision={precision}"])
    engine, placement = _setup_engine(cfg, 0)
    batch = _synthetic_batch(cfg, global_batch, placement.device)
    ours = _time_steps(engine, _bench_step(cfg, placement), batch, steps, warmup, placement.device)

    torch.manual_seed(cfg.seed)
    model = compile_towers(build_model(cfg.model, cfg.loss), cfg.model.compile).to(placement.device).train()
    optimizer = build_optimizer(model, cfg.optim, placement.device)
    loss_fn, loss_source = clip_loss()
    # open_clip's loader hands over normalised float images; they are ready on the device before timing starts
    normalise = ImagePreparation(cfg.transforms.normalize, placement.device, torch.float32)
    micro = [(normalise(batch.images[i:i + chunk]), batch.input_ids[i:i + chunk], batch.attention_mask[i:i + chunk])
             for i in range(0, global_batch, chunk)]
    amp = DTYPES[precision]
    autocast = ((lambda: torch.autocast(placement.device.type, dtype=amp)) if amp != torch.float32
                else contextlib.nullcontext)
    theirs = _time_calls(lambda: accum_freq_step(model, optimizer, micro, loss_fn, autocast), steps, warmup,
                         placement.device)
    return {"global_batch": global_batch, "chunk": chunk, "precision": precision, "device": placement.device.type,
            "compile": cfg.model.compile, "openclip_loss": loss_source,
            "openclip_samples_per_sec": global_batch / theirs, "zvl_ds_samples_per_sec": global_batch / ours,
            "ratio_zvl_ds_to_openclip": theirs / ours}


def _time_calls(call, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _peak_memory_child(overrides: List[str], global_batch: int, chunk: int, stage: int) -> Dict[str, float]:
    """One DGA step at ``global_batch``; peak device memory (CUDA) or peak resident memory (CPU)."""
    cfg = load_config(None, list(overrides) + DGA + [f"data.batch_size={global_batch}",
                                                     f"data.batch_size_train={chunk}", "loss.name=MixUpNCE"])
    engine, placement = _setup_engine(cfg, stage)
    batch = _synthetic_batch(cfg, global_batch, placement.device)
    step = _bench_step(cfg, placement)
    if placement.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step(engine, batch, 0)
    seconds = time.perf_counter() - start
    return {"global_batch": global_batch, "chunk": chunk, "peak_bytes": peak_memory_bytes(placement.device),
            "step_seconds": seconds, "device": placement.device.type}


def bench_memory(overrides: Sequence[str] = TINY, global_batches: Sequence[int] = (256, 1024, 4096), chunk: int = 64,
                 stage: int = 0) -> Dict[str, object]:
    """Peak memory of a DGA step per global batch at a fixed chunk, each in a fresh process (so peaks are its own)."""
    rows = []
    for global_batch in global_batches:
        row, error = _step_in_fresh_process(overrides, global_batch, chunk, stage)
        if row is None:
            raise RuntimeError(f"memory benchmark at batch {global_batch} failed:\n{error}")
        rows.append(row)
    growth = rows[-1]["peak_bytes"] / rows[0]["peak_bytes"]
    return {"rows": rows, "growth_first_to_last": growth}


def _step_in_fresh_process(overrides: Sequence[str], global_batch: int, chunk: int, stage: int):
    """(``_peak_memory_child``'s row, None) from a fresh process, or (None, the end of its stderr)."""
    return call_in_fresh_process(f"{__name__}:_peak_memory_child",
                                 {"overrides": list(overrides), "global_batch": global_batch, "chunk": chunk,
                                  "stage": stage}, timeout_s=_STEP_TIMEOUT_S, env=single_rank_env())


def _out_of_memory(error: str) -> bool:
    return "out of memory" in error.lower() or "OutOfMemoryError" in error


def bench_max_chunk(overrides: Sequence[str] = TINY, chunks: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
                    stage: int = 0) -> Dict[str, object]:
    """The largest per-forward chunk that fits: one DGA step of two chunks per candidate, each in a fresh process
    (so an out-of-memory failure leaves nothing behind), smallest first, stopping at the first that does not fit.

    Any failure other than running out of memory is raised. The answer is a ceiling: leave headroom for the
    loader's pinned buffers and fragmentation over a long run (the next smaller power of two is a safe choice).
    """
    rows: List[Dict[str, object]] = []
    largest = None
    for chunk in sorted(chunks):
        row, error = _step_in_fresh_process(overrides, 2 * chunk, chunk, stage)
        if row is None:
            if not _out_of_memory(error or ""):
                raise RuntimeError(f"max-chunk benchmark at chunk {chunk} failed:\n{error}")
            rows.append({"chunk": chunk, "fits": False})
            break
        rows.append({**row, "fits": True, "ms_per_sample": 1e3 * row["step_seconds"] / (2 * chunk)})
        largest = chunk
    return {"rows": rows, "largest_chunk_that_fits": largest}


def model_flops_per_sample(cfg: Config) -> float:
    """Forward FLOPs of one image-text pair, counted by torch's FLOP counter on the real model."""
    model = build_model(cfg.model, cfg.loss)
    size = cfg.model.image_encoder.img_size or cfg.transforms.input_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images=torch.zeros(1, 3, size, size), input_ids=torch.ones(1, cfg.model.max_length, dtype=torch.long),
              attention_mask=torch.ones(1, cfg.model.max_length, dtype=torch.long))
    return float(counter.get_total_flops())


def bench_gpu(global_batch: int = 16384, chunk: int = 512, steps: int = 2, precision: str = "bf16",
              peak_tflops: Optional[float] = None, stage: int = 2, offload_inputs: bool = True) -> Dict[str, float]:
    """samples/s and model FLOPs utilisation of ``vit_b16_bert_base`` with DGA on one GPU.

    MFU counts the model's useful work (forward + backward = 3 x forward FLOPs per sample) and not DGA's extra
    recomputation forward, as is usual; ``hardware_flops_utilisation`` counts the recomputation too (4 x forward).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench gpu needs a CUDA device")
    overrides = VIT_B16_BERT_BASE + DGA + [f"data.batch_size={global_batch}", f"data.batch_size_train={chunk}",
                                     f"precision={precision}", "loss.name=MixUpNCE", "device=cuda"]
    cfg = load_config(None, overrides)
    flops = model_flops_per_sample(cfg)
    engine, placement = _setup_engine(cfg, stage)
    batch = _synthetic_batch(cfg, global_batch, torch.device("cpu") if offload_inputs else placement.device)
    if offload_inputs:
        batch.images = batch.images.pin_memory()
    step = _bench_step(cfg, placement)
    torch.cuda.reset_peak_memory_stats()
    seconds = _time_steps(engine, step, batch, steps, 1, placement.device)
    samples_per_sec = global_batch / seconds
    peak = peak_tflops or _guess_peak_tflops(precision)
    return {"gpu": torch.cuda.get_device_name(), "precision": precision, "global_batch": global_batch, "chunk": chunk,
            "step_seconds": seconds, "samples_per_sec": samples_per_sec, "forward_gflops_per_sample": flops / 1e9,
            "mfu": 3 * flops * samples_per_sec / (peak * 1e12),
            "hardware_flops_utilisation": 4 * flops * samples_per_sec / (peak * 1e12),
            "peak_tflops_assumed": peak, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def _guess_peak_tflops(precision: str) -> float:
    """Dense tensor-core peak of the GPU (H100 SXM: 989 bf16/fp16, 67 fp32 non-tensor); pass --peak-tflops else."""
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        return 989.0 if precision in ("bf16", "fp16") else 67.0
    if "A100" in name:
        return 312.0 if precision in ("bf16", "fp16") else 19.5
    raise RuntimeError(f"unknown peak FLOP/s for {name}; pass peak_tflops")
