"""Peak memory and time of the contrastive loss + its gradient: chunked (zvl_ds.objective.softmax_loss) vs naive (B x B logits),
and the loss kernels side by side: row-chunked NCE, column-tiled NCE and SigLIP (``--methods rows tiled siglip``,
which also report working memory; see KERNEL_METHODS).

``python -m zvl_ds.bench loss [--loss-batches 8192 32768] [--loss-dim 512] [--loss-chunk-rows 1024]
[--loss-methods chunked naive]`` (on CUDA when there is a GPU).

How memory is measured, and why it is honest: every case runs in a FRESH Python process (``fresh_process``), so
no allocator cache or earlier case inflates it. Inputs (two [B, dim] fp32 embedding matrices and tau) are created and a
small warm-up runs first; then the baseline is taken and the loss and its backward run once.
- CPU: the kernel's resident-set high-water mark (VmHWM) is reset (``/proc/self/clear_refs`` = 5) at the
  baseline, and the figure is VmHWM after the backward minus the resident set at the baseline: the extra
  resident memory the loss + gradient needed at its peak, whatever allocated it (torch, BLAS, Python). Where
  the reset is refused, ``ru_maxrss`` is used instead and the result says so (the import peak may then mask
  small cases).
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocated baseline.
Gradients of the inputs (2 x B x dim floats) are part of the figure for both methods.

Naive cases that would not fit in the memory available are skipped, with the reason in the result:
the naive loss keeps about 6 B x B fp32 matrices alive at its peak (logits, their scaled copy, two
log-softmax outputs, and the gradient buffers of the backward; measured 6.0 at B = 4096, 8192 and 32768);
7 is used as a safety margin.

Measured (dim 512, chunk_rows 1024, one process, peak extra memory / time of loss + backward):
  2-core CPU (this project's dev box, shared):  chunked 8192: 0.128 GiB 7.1 s; 32768: 0.531 GiB 136 s
                                                naive   8192: 1.500 GiB 16 s;  32768: skipped (~28 GiB needed)
  16-core CPU (H100 box):                       chunked 8192: 0.173 GiB 0.72 s; 32768: 0.549 GiB 8.9 s
                                                naive   8192: 1.501 GiB 1.10 s; 32768: 24.03 GiB 18.9 s
  H100 (cuda, fp32):                            chunked 8192: 0.125 GiB; 32768: 0.500 GiB 0.19 s; 65536: 1.0 GiB
                                                naive   8192: 1.500 GiB; 32768: 24.0 GiB 0.14 s
Loss kernels (``--loss-methods rows tiled siglip``, dim 512, rows 1024, tiles 1024 x 1024, idle 2-core CPU),
working memory / time:
  8192:  rows 68.8 MiB 5.1 s;    tiled 18.7 MiB 3.1 s;   siglip 16.9 MiB 2.5 s
  32768: rows 265.2 MiB 83.7 s;  tiled 42.7 MiB 55.5 s;  siglip 40.3 MiB 40.8 s
  65536: rows 522.8 MiB 321 s;   tiled 22.8 MiB 232 s;   siglip 41.3 MiB 154 s
The chunked figure is O(B x dim), not O(B^2): one chunk of logits (chunk_rows x B) plus the cached
gradients of queries and keys (4 x B x dim) and the inputs' gradients (2 x B x dim).
"""
from __future__ import annotations

import resource
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from zvl_ds.bench.fresh_process import call_in_fresh_process
from zvl_ds.objective.dense_reference import dense_contrastive_loss
from zvl_ds.objective.sigmoid_loss import _sigmoid_pairs
from zvl_ds.objective.softmax_loss import _soft_cross_entropy_rows, _symmetric_tiles, _Targets, contrastive_loss

NAIVE_BXB_MATRICES = 7  # estimate used only to decide whether a naive case can run at all

# The tiled-loss comparison (``rows``, ``tiled``, ``siglip``) runs the loss kernels directly, without autograd,
# so that exactly one set of gradient buffers exists: row chunks run each softmax direction on its own, with
# dL/d(queries) and dL/d(keys) each, 4 [B, dim] fp32 matrices in all; the tiled softmax loss (both directions
# from one set of tiles) and SigLIP's single sum over pairs have 2. "Working memory" is the peak extra resident
# memory minus those buffers: what the loss needs beyond the embeddings and their gradients.
KERNEL_METHODS = ("rows", "tiled", "siglip")
GRADIENT_BUFFERS = {"rows": 4, "tiled": 2, "siglip": 2}


def kernel_loss_and_gradients(method: str, image, text, chunk_rows: int, chunk_cols: int):
    """Loss value and the gradient buffers of one kernel method (see ``KERNEL_METHODS``)."""
    batch = image.shape[0]
    if method == "siglip":
        scale, bias = torch.tensor(10.0, device=image.device), torch.tensor(-10.0, device=image.device)
        result = _sigmoid_pairs(image, text, scale, bias, 0, chunk_rows, chunk_cols, need_grads=True)
        return float(result.loss_sum) / batch ** 2, (result.grad_queries, result.grad_keys)
    tau = torch.tensor([0.02], device=image.device)
    targets = _Targets(torch.arange(batch, device=image.device), None, 1.0)
    if method == "tiled":
        strip = _symmetric_tiles(image, text, tau, targets, 0, chunk_rows, chunk_cols, need_grads=True)
        return float(strip.loss_sum) / batch, (strip.grad_images, strip.grad_texts)
    i2t = _soft_cross_entropy_rows(image, text, tau, targets, chunk_rows, True)
    t2i = _soft_cross_entropy_rows(text, image, tau, targets, chunk_rows, True)
    loss = 0.5 * float(i2t.loss_sum + t2i.loss_sum) / batch
    return loss, (i2t.grad_queries, i2t.grad_keys, t2i.grad_queries, t2i.grad_keys)


def _proc_status_bytes(field: str) -> Optional[int]:
    """A size field of this process (``VmRSS``, ``VmHWM``) from /proc/self/status, in bytes."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def run_case(batch: int, dim: int, method: str, chunk_rows: int, device: str, chunk_cols: int = 0
             ) -> Dict[str, object]:
    """One measurement (meant to run in a fresh process; see the module docstring)."""
    torch.manual_seed(0)

    def loss_and_backward(image, text, tau):
        if method in KERNEL_METHODS:
            with torch.no_grad():
                loss, buffers = kernel_loss_and_gradients(method, image.detach(), text.detach(), chunk_rows,
                                                          chunk_cols)
            del buffers
            return loss
        if method == "naive":  # the textbook loss: full B x B logits, autograd keeps everything
            loss = dense_contrastive_loss(image, text, tau)
        else:
            loss, _ = contrastive_loss(image, text, tau, mixup=None, partner=None, gather_backward=True,
                                       chunk_rows=chunk_rows)
        loss.backward()
        return float(loss)

    def make(rows):
        image = F.normalize(torch.randn(rows, dim, device=device), dim=1).requires_grad_(True)
        text = F.normalize(torch.randn(rows, dim, device=device), dim=1).requires_grad_(True)
        tau = torch.full((1,), 0.02, device=device, requires_grad=True)
        return image, text, tau

    loss_and_backward(*make(min(batch, 256)))  # warm-up: library initialisation is not the loss's memory
    image, text, tau = make(batch)
    (loss, seconds), peak, baseline, peak_source = measure_peak(device, lambda: loss_and_backward(image, text, tau))
    result = {"batch": batch, "dim": dim, "method": method, "chunk_rows": chunk_rows if method != "naive" else None,
              "device": device, "threads": torch.get_num_threads(), "seconds": round(seconds, 3),
              "peak_extra_bytes": int(peak - baseline), "peak_extra_gib": round((peak - baseline) / 2 ** 30, 3),
              "peak_source": peak_source, "loss": loss}
    if method in KERNEL_METHODS:
        result["chunk_cols"] = chunk_cols if method != "rows" else None
        gradient_bytes = GRADIENT_BUFFERS[method] * batch * dim * 4
        result["working_mib"] = round((peak - baseline - gradient_bytes) / 2 ** 20, 1)
    return result


def measure_peak(device: str, run: Callable[[], Any]) -> Tuple[Tuple[Any, float], int, int, str]:
    """``((run(), seconds), peak bytes, baseline bytes, how the peak was read)`` of one call: CUDA's allocator peak,
    or on the CPU the process's resident peak after resetting it (``/proc/self/clear_refs``) where the kernel allows,
    else ``ru_maxrss``, which cannot be reset."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        peak_source = "torch.cuda.max_memory_allocated"
    else:
        reset = _reset_peak_rss()
        baseline = _proc_status_bytes("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_source = "VmHWM after /proc/self/clear_refs" if reset else "ru_maxrss (peak not reset)"
    start = time.perf_counter()
    result = run()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status_bytes("VmHWM") if peak_source.startswith("VmHWM") else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (result, seconds), peak, baseline, peak_source


def _available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    available = _meminfo_bytes("MemAvailable")
    return available if available is not None else 0


def _meminfo_bytes(field: str) -> Optional[int]:
    """A machine-wide memory field (``MemAvailable``) from /proc/meminfo, in bytes."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def benchmark_loss(batch_sizes: Sequence[int] = (8192, 32768), dim: int = 512, chunk_rows: int = 1024,
                   device: str = "cpu", methods: Sequence[str] = ("chunked", "naive"), verbose: bool = True,
                   timeout_s: float = 3600, chunk_cols: int = 1024) -> Dict[str, Dict[str, object]]:
    """Measure each (batch, method) in its own process; returns ``{"<method>@<batch>": result}``.

    A naive case estimated not to fit (7 B x B fp32 matrices vs the memory available now) is not run; its
    result has ``skipped`` with the reason.
    """
    results: Dict[str, Dict[str, object]] = {}
    for batch in batch_sizes:
        for method in methods:
            key = f"{method}@{batch}"
            if method == "naive":
                need = NAIVE_BXB_MATRICES * batch * batch * 4
                available = _available_bytes(device)
                if need > 0.8 * available:
                    results[key] = {"batch": batch, "method": method, "device": device, "skipped": (
                        f"needs about {need / 2 ** 30:.1f} GiB ({NAIVE_BXB_MATRICES} B x B fp32 matrices), "
                        f"{available / 2 ** 30:.1f} GiB available")}
                    if verbose:
                        print(f"{key:>16}: skipped, {results[key]['skipped']}", flush=True)
                    continue
            case = {"batch": batch, "dim": dim, "method": method, "chunk_rows": chunk_rows, "device": device,
                    "chunk_cols": chunk_cols}
            result, error = call_in_fresh_process(f"{__name__}:run_case", case, timeout_s=timeout_s,
                                                  env={"PYTHONWARNINGS": "ignore"})
            if result is None:
                last_line = (error or "").strip().splitlines()[-1:] or ["no output"]
                result = {"batch": batch, "method": method, "device": device, "failed": last_line[0]}
            results[key] = result
            if verbose:
                if "failed" in result:
                    print(f"{key:>16}: FAILED {result['failed']}", flush=True)
                else:
                    working = f", working {result['working_mib']:.1f} MiB" if "working_mib" in result else ""
                    print(f"{key:>16}: peak +{result['peak_extra_gib']:.3f} GiB{working}, {result['seconds']:.2f} s "
                          f"({result['device']}, {result['threads']} threads, loss {result['loss']:.4f})",
                          flush=True)
    return results
