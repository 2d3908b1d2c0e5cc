"""Working memory of the distillation term and its gradient: the tiled kernels (``objective/distill_kernels.py``)
against the dense term (``objective/dense_reference.py``: full B x B student and teacher logits, autograd), at
several global batches, in one run: ``python -m zvl_ds.bench distill [--loss-batches 8192 32768 65536]
[--loss-dim 512] [--teacher-dim 768] [--loss-chunk-rows 1024] [--loss-chunk-cols 1024]``.

Each case runs in a fresh process (``fresh_process``), measured as ``bench/loss.py`` measures the losses: on the CPU
the resident-set high-water mark over the baseline taken after the inputs exist (student embeddings [B, dim],
teacher embeddings [B, teacher_dim]); on CUDA ``max_memory_allocated``. "Working memory" is that peak minus the
gradient buffers every method must return (dL/d images and dL/d texts, 2 x B x dim fp32): what the term needs beyond
its inputs and outputs. The tiled kernels run without autograd (their gradients come out of the sweep), the dense
term through autograd, as a user would write it.

A dense case that would not fit the memory available now is not run; its working memory is then estimated from the
B x B matrices per case measured at the largest batch that did run in the same call (or ``DENSE_BXB_MATRICES`` when
none did), and the result says "estimated". Measured figures: docs/distillation.md.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from zvl_ds.bench.fresh_process import call_in_fresh_process
from zvl_ds.bench.loss import _available_bytes, measure_peak
from zvl_ds.objective.dense_reference import dense_sigmoid_distillation, dense_softmax_distillation
from zvl_ds.objective.distill_kernels import sigmoid_distill_strip, softmax_distill_strip

FAMILIES = ("softmax", "sigmoid")
METHODS = ("tiled", "dense")
DENSE_BXB_MATRICES = 12  # fp32 B x B matrices alive at the dense term's peak, before one was measured (a guess)
TEACHER_SCALE, TEACHER_BIAS = 100.0, -10.0


def _term(family: str, method: str, image, text, teacher_image, teacher_text, chunk_rows: int, chunk_cols: int):
    """The term and its gradients once; returns the loss value."""
    device = image.device
    if method == "tiled":
        with torch.no_grad():
            if family == "softmax":
                strip = softmax_distill_strip(image, text, torch.tensor([0.02], device=device), teacher_image,
                                              teacher_text, TEACHER_SCALE, 0, chunk_rows, chunk_cols, True)
                return float(strip.loss_sum) / image.shape[0]
            strip = sigmoid_distill_strip(image, text, torch.tensor(10.0, device=device),
                                          torch.tensor(-10.0, device=device), teacher_image, teacher_text,
                                          TEACHER_SCALE, TEACHER_BIAS, "bce", 0, chunk_rows, chunk_cols, True)
            return float(strip.loss_sum) / image.shape[0] ** 2
    image, text = image.detach().requires_grad_(True), text.detach().requires_grad_(True)
    if family == "softmax":
        loss = dense_softmax_distillation(image, text, 0.02, teacher_image, teacher_text, TEACHER_SCALE)
    else:
        loss = dense_sigmoid_distillation(image, text, 10.0, -10.0, teacher_image, teacher_text, TEACHER_SCALE,
                                          TEACHER_BIAS)
    loss.backward()
    return float(loss)


def run_case(batch: int, dim: int, teacher_dim: int, family: str, method: str, chunk_rows: int, chunk_cols: int,
             device: str) -> Dict[str, object]:
    """One measurement, meant for a fresh process (module docstring)."""

    def make(rows):
        torch.manual_seed(0)
        return [F.normalize(torch.randn(rows, width, device=device), dim=1)
                for width in (dim, dim, teacher_dim, teacher_dim)]

    _term(family, method, *make(min(batch, 256)), chunk_rows, chunk_cols)  # warm-up: library initialisation
    inputs = make(batch)
    (loss, seconds), peak, baseline, _ = measure_peak(device, lambda: _term(family, method, *inputs, chunk_rows,
                                                                          chunk_cols))
    working = peak - baseline - 2 * batch * dim * 4
    return {"batch": batch, "family": family, "method": method, "device": device, "seconds": round(seconds, 2),
            "threads": torch.get_num_threads(), "working_bytes": int(working),
            "working_mib": round(working / 2 ** 20, 1), "bxb_matrices": round(working / (4 * batch * batch), 2),
            "loss": loss, "measured": True}


def _estimate(batch: int, family: str, device: str, measured: List[Dict[str, object]], reason: str
              ) -> Dict[str, object]:
    matrices = float(measured[-1]["bxb_matrices"]) if measured else float(DENSE_BXB_MATRICES)
    working = matrices * 4 * batch * batch
    source = (f"{matrices:.2f} B x B matrices as measured at B = {measured[-1]['batch']}" if measured
              else f"{DENSE_BXB_MATRICES} B x B matrices (none measured)")
    return {"batch": batch, "family": family, "method": "dense", "device": device, "measured": False,
            "working_bytes": int(working), "working_mib": round(working / 2 ** 20, 1),
            "skipped": f"{reason}; estimated from {source}"}


def benchmark_distill(batch_sizes: Sequence[int] = (8192, 32768, 65536), dim: int = 512, teacher_dim: int = 768,
                      chunk_rows: int = 1024, chunk_cols: int = 1024, device: str = "cpu",
                      families: Sequence[str] = FAMILIES, verbose: bool = True,
                      timeout_s: float = 7200) -> Dict[str, object]:
    """Every (family, batch, method) in its own process; ``{"cases": {...}, "ratios": {...}}``, the ratio being the
    dense term's working memory over the tiled kernel's at each batch."""
    cases: Dict[str, Dict[str, object]] = {}
    ratios: Dict[str, Dict[str, object]] = {}
    for family in families:
        dense_measured: List[Dict[str, object]] = []
        for batch in sorted(batch_sizes):
            for method in METHODS:
                key = f"{family}/{method}@{batch}"
                if method == "dense":
                    need = DENSE_BXB_MATRICES * 4 * batch * batch
                    available = _available_bytes(device)
                    if need > 0.8 * available:
                        cases[key] = _estimate(batch, family, device, dense_measured,
                                               f"needs about {need / 2 ** 30:.1f} GiB, {available / 2 ** 30:.1f} "
                                               "GiB available")
                        _show(key, cases[key], verbose)
                        continue
                case = {"batch": batch, "dim": dim, "teacher_dim": teacher_dim, "family": family, "method": method,
                        "chunk_rows": chunk_rows, "chunk_cols": chunk_cols, "device": device}
                result, error = call_in_fresh_process(f"{__name__}:run_case", case, timeout_s=timeout_s,
                                                      env={"PYTHONWARNINGS": "ignore"})
                if result is None:
                    last = (error or "").strip().splitlines()[-1:] or ["no output"]
                    result = (_estimate(batch, family, device, dense_measured, f"failed: {last[0]}")
                              if method == "dense" else {"batch": batch, "method": method, "failed": last[0]})
                elif method == "dense":
                    dense_measured.append(result)
                cases[key] = result
                _show(key, result, verbose)
            ratios[f"{family}@{batch}"] = _ratio(cases, family, batch)
    if verbose:
        print("dense / tiled working memory: " + ", ".join(
            f"{key} {value['ratio']:.0f}x{'' if value['dense_measured'] else ' (dense estimated)'}"
            for key, value in ratios.items() if value.get("ratio")), flush=True)
    return {"dim": dim, "teacher_dim": teacher_dim, "chunk_rows": chunk_rows, "chunk_cols": chunk_cols,
            "cases": cases, "ratios": ratios}


def _ratio(cases: Dict[str, Dict[str, object]], family: str, batch: int) -> Dict[str, object]:
    tiled, dense = cases.get(f"{family}/tiled@{batch}", {}), cases.get(f"{family}/dense@{batch}", {})
    if "working_bytes" not in tiled or "working_bytes" not in dense:
        return {}
    return {"ratio": round(int(dense["working_bytes"]) / max(int(tiled["working_bytes"]), 1), 1),
            "dense_measured": bool(dense.get("measured")), "tiled_mib": tiled["working_mib"],
            "dense_mib": dense["working_mib"]}


def _show(key: str, result: Dict[str, object], verbose: bool) -> None:
    if not verbose:
        return
    if "failed" in result:
        print(f"{key:>24}: FAILED {result['failed']}", flush=True)
    elif not result.get("measured"):
        print(f"{key:>24}: working ~{result['working_mib']:.1f} MiB, not run ({result['skipped']})", flush=True)
    else:
        print(f"{key:>24}: working {result['working_mib']:.1f} MiB ({result['bxb_matrices']} B x B), "
              f"{result['seconds']:.1f} s ({result['device']}, {result['threads']} threads)", flush=True)


def run_distill(args) -> Dict[str, object]:
    """``python -m zvl_ds.bench distill``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches: List[int] = [b for b in args.loss_batches if b <= 65536 or device == "cuda"]
    return benchmark_distill(batch_sizes=batches, dim=args.loss_dim, teacher_dim=args.teacher_dim,
                             chunk_rows=args.loss_chunk_rows, chunk_cols=args.loss_chunk_cols, device=device)
