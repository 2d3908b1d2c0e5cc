"""``python -m zvl_ds.bench gpu-report --out DIR``: every GPU figure in one call of at most nine minutes.

This module runs the report: the sizes, the stages in order, their budgets and fresh processes, the report JSON.
What each stage measures is in ``gpu_report_step`` (zvl_ds's own step: stages 1, 2, 4, 6) and
``gpu_report_programs`` (the stages that run another program: 3 and 5).

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
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from zvl_ds.base.atomic_write import write_text_atomic
from zvl_ds.base.errors import UserError
from zvl_ds.bench.fresh_process import call_in_fresh_process, single_rank_env
from zvl_ds.bench.gpu_report_programs import openclip_throughput, verify_exactness_small
from zvl_ds.bench.gpu_report_step import big_step, dga_throughput, step_profile
from zvl_ds.bench.step import VIT_B16_BERT_BASE

REPORT_FILE = "report.json"
STATUSES = ("ok", "failed", "timeout", "skipped")
_ERROR_TAIL = 2000  # characters of a failed stage's error output kept in its record
MIN_STAGE_SECONDS = 20.0  # a stage with less time left than this is skipped (nor retried at a smaller chunk)
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
# The stages and the runner
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # "module:function", called in a fresh process (``_path``)
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


def _path(function: Callable) -> str:
    """``function`` as a fresh process imports it: "module:function"."""
    return f"{function.__module__}:{function.__name__}"


STAGES: List[Stage] = [
    Stage("dga", _path(dga_throughput), lambda s, r, o, b: _dga_kwargs(s, r, o, b),
          "DGA samples/s, MFU and peak memory; row-chunked and tiled loss"),
    Stage("profile", _path(step_profile),
          lambda s, r, o, b: _step_kwargs(s, s.global_batch, _chunk(s, r)), "where one DGA step's time goes"),
    Stage("openclip", _path(openclip_throughput),
          lambda s, r, o, b: {**_common(s), "global_batch": s.global_batch, "chunk": _chunk(s, r),
                              "steps": s.openclip_steps, "workers": s.openclip_workers,
                              "folder": os.path.join(o, "openclip"), "timeout_s": b,
                              "zvl_ds_samples_per_sec": (_ok_result(r, "dga") or {}).get("samples_per_sec")},
          "open_clip_train --accum-freq on the same towers and batch"),
    Stage("big_step", _path(big_step),
          lambda s, r, o, b: _step_kwargs(s, s.big_batch, _chunk(s, r)),
          "one exact DGA step at the largest global batch, inputs in pinned host memory"),
    Stage("verify_exactness", _path(verify_exactness_small),
          lambda s, r, o, b: _step_kwargs(s, s.verify_batch, s.verify_chunk,
                                          folder=os.path.join(o, "verify_exactness"), timeout_s=b),
          "verify_exactness at a small batch, same configuration"),
    Stage("dga_compiled", _path(dga_throughput),
          lambda s, r, o, b: _dga_kwargs(s, r, o, b, compile_mode="default", chunk=_chunk(s, r)),
          "stage 1 with model.compile=default"),
]
STAGE_NAMES = [stage.name for stage in STAGES]


def _tail(text) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "")[-_ERROR_TAIL:]


def run_stage(function: str, kwargs: Dict, budget_s: float,
              min_stage_seconds: float = MIN_STAGE_SECONDS) -> Dict[str, object]:
    """Run ``function`` in fresh processes within ``budget_s``: a record with status ``ok`` (and its result),
    ``failed`` or ``timeout`` (and the end of its error output), seconds and the attempts. Out of device memory
    at a chunk: run again at half of it while at least ``min_stage_seconds`` of the budget are left."""
    start = time.monotonic()
    attempts: List[Dict] = []
    while True:
        remaining = budget_s - (time.monotonic() - start)
        try:
            result, error = call_in_fresh_process(function, kwargs, timeout_s=max(1.0, remaining),
                                                  env=single_rank_env())
        except subprocess.TimeoutExpired as expired:
            return {"status": "timeout", "seconds": time.monotonic() - start, "result": None,
                    "error_tail": f"ran out of its {budget_s:.0f} s budget\n" + _tail(expired.stderr),
                    "attempts": attempts}
        if result is not None:
            return {"status": "ok", "seconds": time.monotonic() - start, "result": result, "error_tail": None,
                    "attempts": attempts}
        chunk = _failed_chunk(error, kwargs)
        attempts.append({"kwargs": {k: v for k, v in kwargs.items() if k != "towers"}, "error_tail": _tail(error)})
        if chunk is None or chunk // 2 < 1 or budget_s - (time.monotonic() - start) < min_stage_seconds:
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
            "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "python": platform.python_version(),
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
               stages: Sequence[Stage] = STAGES, min_stage_seconds: float = MIN_STAGE_SECONDS) -> Dict[str, object]:
    """Run the stages in order within ``sizes.total_seconds``; returns the report also written to OUT/report.json.
    A stage with less than ``min_stage_seconds`` left is skipped."""
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
        if budget < min_stage_seconds:
            record = {"status": "skipped", "seconds": 0.0, "result": None, "attempts": [],
                      "error_tail": f"no time left ({left:.0f} s of the run's {sizes.total_seconds:.0f} s)"}
        else:
            log(f"== {stage.name}: {stage.what} (budget {budget:.0f} s)")
            kwargs = stage.kwargs(sizes, records, os.path.abspath(out), budget)
            record = run_stage(stage.function, kwargs, budget, min_stage_seconds)
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
        raise UserError("gpu-report needs a CUDA device; --smoke runs every stage on the CPU at tiny sizes")
    unknown = sorted(set(stage_names or ()) - set(STAGE_NAMES))
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {unknown} (valid: {', '.join(STAGE_NAMES)})")
    report = run_report(out, sizes, stage_names, smoke=smoke)
    statuses = {name: record["status"] for name, record in report["stages"].items()}  # type: ignore[union-attr]
    print(f"\nreport: {os.path.join(out, REPORT_FILE)} ({report['seconds']:.0f} s): "
          + ", ".join(f"{name} {status}" for name, status in statuses.items()))
    return 0 if all(status == "ok" for status in statuses.values()) else 1
