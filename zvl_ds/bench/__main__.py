"""``python -m zvl_ds.bench {shards,data,loss,distill,distill-speed,distill-quality,dga,patch-dropout,memory,gpu,
profile,openclip,max-chunk,all} [--out DIR]``.

Prints a table per benchmark and writes ``OUT/<name>.json``. Figures in one run come from one machine, so the
ratios (DGA vs single pass, memory growth, chunked vs naive loss, worker scaling) are comparable.

``gpu-report --out DIR [--smoke]`` runs every GPU measurement in one call of at most nine minutes (stages in
fresh processes, each with its own time budget; ``zvl_ds/bench/gpu_report.py``); ``gpu-table [DIR] [--write]``
prints README's GPU table from a report (or writes it, and the report, into the checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Callable, Dict, List, Optional

import torch

from zvl_ds.base.atomic_write import write_text_atomic
from zvl_ds.base.cli import run
from zvl_ds.bench.data import benchmark_loader, benchmark_shards, format_benchmark
from zvl_ds.bench.data_formats import benchmark_formats
from zvl_ds.bench.distill import run_distill
from zvl_ds.bench.distill_quality import run_distill_quality
from zvl_ds.bench.distill_speed import bench_distill_speed
from zvl_ds.bench.gpu_report import main_gpu_report
from zvl_ds.bench.gpu_table import main_gpu_table
from zvl_ds.bench.loss import benchmark_loss
from zvl_ds.bench.step import (TINY, VIT_B16_BERT_BASE, bench_dga, bench_gpu, bench_max_chunk, bench_memory,
                               bench_openclip, bench_patch_dropout, bench_profile)
from zvl_ds.data.parquet_files import ParquetSourceError


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {device}, torch {torch.__version__}"


def run_shards(args) -> Dict:
    result = benchmark_shards(num_images=args.images)
    print(format_benchmark(result))
    return result


def run_data(args) -> Dict:
    result = benchmark_loader(verbose=True)
    try:
        result["parquet_vs_tar"] = benchmark_formats(verbose=True)
    except ParquetSourceError as error:  # the optional extra: the tar figures stand alone
        print(f"parquet vs tar: not measured ({error})")
    return result


def run_loss(args) -> Dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # 262,144 only where a GPU makes it take minutes rather than hours
    batches = [b for b in args.loss_batches if b <= 65536 or device == "cuda"]
    return benchmark_loss(batch_sizes=tuple(batches), device=device, verbose=True, methods=args.loss_methods,
                          chunk_rows=args.loss_chunk_rows, chunk_cols=args.loss_chunk_cols, dim=args.loss_dim)


def model_overrides(args) -> List[str]:
    base = TINY if args.arch == "tiny" else VIT_B16_BERT_BASE
    return base + [f"precision={args.precision}", f"model.compile={args.compile}"]


def run_dga(args) -> Dict:
    result = bench_dga(model_overrides(args), chunk=args.chunk, chunks=args.chunks, stage=args.stage)
    print(f"DGA vs single pass ({args.arch}, {args.precision}, chunk {result['chunk']}, "
          f"global batch {result['global_batch']}): "
          f"{result['dga_ms_per_sample']:.3f} vs {result['single_pass_ms_per_sample']:.3f} ms/sample, "
          f"ratio {result['ratio']:.2f}x (target <= 1.4x; one extra forward ~ 1.33x)")
    return result


def run_patch_dropout(args) -> Dict:
    result = bench_patch_dropout(model_overrides(args), chunk=args.chunk, chunks=args.chunks, stage=args.stage)
    print(f"DGA step with patch dropout ({args.arch}, {args.precision}, chunk {result['chunk']}, "
          f"global batch {result['global_batch']}):")
    for row in result["rows"]:
        print(f"  patch_dropout {row['patch_dropout']:<5} {1e3 * row['step_seconds']:9.1f} ms/step "
              f"{row['samples_per_sec']:9.1f} samples/s  speed-up {row['speedup']:.2f}x "
              f"(CPU time {1e3 * row['cpu_seconds']:.1f} ms, {row['cpu_speedup']:.2f}x)")
    return result


def run_memory(args) -> Dict:
    batches = [256, 1024, 4096] + ([16384] if torch.cuda.is_available() else [])
    result = bench_memory(model_overrides(args), global_batches=batches, chunk=args.chunk, stage=args.stage)
    print(f"peak memory of one DGA step at a fixed chunk of {args.chunk} ({args.arch}, {args.precision}):")
    for row in result["rows"]:
        print(f"  global batch {row['global_batch']:>6}: {row['peak_bytes'] / 2 ** 20:8.1f} MiB "
              f"({'device' if row['device'] == 'cuda' else 'process peak RSS'}), step {row['step_seconds']:.1f} s")
    print(f"  growth {batches[0]} -> {batches[-1]}: {result['growth_first_to_last']:.2f}x (target <= 1.5x to 4096)")
    return result


def run_gpu(args) -> Dict:
    result = bench_gpu(global_batch=args.gpu_batch, chunk=args.gpu_chunk, peak_tflops=args.peak_tflops)
    print(f"vit_b16_bert_base DGA on {result['gpu']} ({result['precision']}, global batch {result['global_batch']}, "
          f"chunk {result['chunk']}): {result['samples_per_sec']:.0f} samples/s/GPU, MFU {100 * result['mfu']:.1f}% "
          f"(with recompute {100 * result['hardware_flops_utilisation']:.1f}%), "
          f"peak {result['peak_memory_gib']:.1f} GiB")
    return result


def run_profile(args) -> Dict:
    trace = os.path.join(args.out, "profile_trace.json") if args.trace else None
    result = bench_profile(model_overrides(args), chunk=args.chunk, chunks=args.chunks, stage=args.stage,
                           trace_path=trace, offload_inputs=args.offload_inputs)
    split = result["ms_per_step"]
    print(f"one DGA step ({args.arch}, {args.precision}, {result['device']}, chunk {result['chunk']}, global batch "
          f"{result['global_batch']}, compile {result['compile']}): {split['step_wall']:.1f} ms")
    for part in ("pass1", "loss", "pass2", "optimizer", "host_to_device", "deepspeed", "host_other",
                 "device_kernels_ms", "device_host_to_device_ms"):
        if part in split:
            print(f"  {part:<26}{split[part]:10.2f} ms  {100 * split[part] / split['step_wall']:5.1f}%")
    return result


def run_openclip(args) -> Dict:
    result = bench_openclip(model_overrides(args), chunk=args.chunk, chunks=args.chunks, precision=args.precision)
    print(f"OpenCLIP accum-freq step vs zvl_ds DGA ({args.arch}, {args.precision}, {result['device']}, batch "
          f"{result['global_batch']} in chunks of {result['chunk']}; loss: {result['openclip_loss']}): "
          f"{result['openclip_samples_per_sec']:.1f} vs {result['zvl_ds_samples_per_sec']:.1f} samples/s, "
          f"ratio {result['ratio_zvl_ds_to_openclip']:.2f}x (target >= 1.3x on a GPU)")
    return result


def run_max_chunk(args) -> Dict:
    result = bench_max_chunk(model_overrides(args), chunks=args.try_chunks, stage=args.stage)
    print(f"largest chunk that fits ({args.arch}, {args.precision}, ZeRO {args.stage}), one DGA step of two chunks:")
    for row in result["rows"]:
        if row["fits"]:
            print(f"  chunk {row['chunk']:>6}: fits, peak {row['peak_bytes'] / 2 ** 30:6.2f} GiB "
                  f"({'device' if row['device'] == 'cuda' else 'process RSS'}), {row['ms_per_sample']:.3f} ms/sample")
        else:
            print(f"  chunk {row['chunk']:>6}: out of memory")
    print(f"  largest: {result['largest_chunk_that_fits']}")
    return result


def run_distill_speed(args) -> Dict:
    print(f"distillation, online against stored teacher embeddings ({args.cfg} {' '.join(args.overrides)}):")
    return bench_distill_speed(args.cfg, args.overrides, rounds=args.rounds)


BENCHES: Dict[str, Callable] = {"shards": run_shards, "data": run_data, "loss": run_loss, "dga": run_dga,
                                "patch-dropout": run_patch_dropout, "memory": run_memory, "gpu": run_gpu,
                                "profile": run_profile, "openclip": run_openclip, "max-chunk": run_max_chunk,
                                "distill": run_distill, "distill-speed": run_distill_speed,
                                "distill-quality": run_distill_quality}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zvl_ds.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=list(BENCHES) + ["all", "gpu-report", "gpu-table"])
    parser.add_argument("--out", default="bench_results", help="folder for the JSON results")
    parser.add_argument("--images", type=int, default=512, help="shards: JPEGs to convert")
    parser.add_argument("--chunk", type=int, default=64, help="dga/patch-dropout/memory: per-forward chunk")
    parser.add_argument("--chunks", type=int, default=8, help="dga/patch-dropout: chunks per DGA step")
    parser.add_argument("--arch", choices=["tiny", "vit_b16_bert_base"], default="tiny", help="dga/memory: model")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="dga/memory")
    parser.add_argument("--stage", type=int, default=0, help="dga/memory: ZeRO stage (one process)")
    parser.add_argument("--loss-batches", type=int, nargs="+", default=[8192, 32768, 65536, 262144],
                        help="loss: global batches (262144 runs on CUDA only)")
    parser.add_argument("--loss-methods", nargs="+", default=["rows", "tiled", "siglip"],
                        choices=["rows", "tiled", "siglip", "chunked", "naive"],
                        help="loss: row-chunked NCE, column-tiled NCE, SigLIP (kernels, no autograd); chunked / "
                             "naive: NCE through autograd, and the textbook B x B loss")
    parser.add_argument("--loss-dim", type=int, default=512, help="loss: embedding width")
    parser.add_argument("--loss-chunk-rows", type=int, default=1024, help="loss: rows per logits block")
    parser.add_argument("--loss-chunk-cols", type=int, default=1024, help="loss: columns per tile (tiled, siglip)")
    parser.add_argument("--teacher-dim", type=int, default=768, help="distill: the teacher's embedding width")
    parser.add_argument("--cfg", default="configs/demo.yaml",
                        help="distill-speed: the training config; distill-quality: the student's")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="distill-speed: config overrides key=value (distill.teacher=FOLDER, data.data_path=...);"
                             " distill-quality: the distilled students' (distill.scale=100, ...)")
    parser.add_argument("--rounds", type=int, default=10, help="distill-speed: timed steps of each source")
    parser.add_argument("--teacher-cfg", default="configs/finetune_small.yaml", help="distill-quality: the teacher")
    parser.add_argument("--teacher-steps", type=int, default=20, help="distill-quality: the teacher's training steps")
    parser.add_argument("--student-steps", type=int, default=60,
                        help="distill-quality: each student's training steps (the student config is --cfg)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="distill-quality: the students' seeds")
    parser.add_argument("--train-size", type=int, default=1000, help="distill-quality: demo images per training set")
    parser.add_argument("--work", default=None,
                        help="distill-quality: its data, runs and logs (default OUT/distill_quality)")
    parser.add_argument("--gpu-batch", type=int, default=16384)
    parser.add_argument("--gpu-chunk", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=None, help="gpu: the device's dense peak for MFU")
    parser.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="dga/memory/profile/openclip: model.compile")
    parser.add_argument("--offload-inputs", action="store_true", help="profile: images in pinned host memory (CUDA)")
    parser.add_argument("--try-chunks", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048],
                        help="max-chunk: candidate per-forward chunks")
    parser.add_argument("--trace", action="store_true", help="profile: also write OUT/profile_trace.json (Chrome)")
    parser.add_argument("--smoke", action="store_true",
                        help="gpu-report: every stage on the CPU with tiny towers, fp32 and small batches")
    parser.add_argument("--stages", nargs="+", default=None, help="gpu-report: only these stages, in their order")
    parser.add_argument("--total-seconds", type=float, default=None,
                        help="gpu-report: the whole run's time budget (default 520 s on a GPU)")
    parser.add_argument("report", nargs="?", default=None,
                        help="gpu-table: a gpu-report folder (default: the report committed in docs/)")
    parser.add_argument("--write", action="store_true",
                        help="gpu-table: copy the report into docs/ and rewrite the table in README.md")
    args = parser.parse_args(argv)
    if args.which == "gpu-report":
        return main_gpu_report(args.out, args.smoke, args.stages, args.total_seconds, args.peak_tflops)
    if args.which == "gpu-table":
        return main_gpu_table(args.report, args.write)
    # not part of "all": GPU-only, a closer look at one step, distillation's memory (minutes at 65k on a CPU) or its
    # speed (it needs reinforced shards and a teacher) or its quality (about 20 minutes of training)
    optional = {"gpu", "profile", "openclip", "max-chunk", "distill", "distill-speed", "distill-quality"}
    names = ([n for n in BENCHES if n not in optional or (n == "gpu" and torch.cuda.is_available())]
             if args.which == "all" else [args.which])
    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {machine()}")
    for name in names:
        print(f"\n== {name}")
        result = BENCHES[name](args)
        write_text_atomic(os.path.join(args.out, f"{name}.json"),
                          json.dumps({"machine": machine(), "result": result}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
