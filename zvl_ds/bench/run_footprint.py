"""What a training run costs and reaches, read from its folder: ``python -m zvl_ds.bench.run_footprint RUN [RUN ...]``.

For each run (its latest checkpoint): the trainable parameters (the elements of the optimizer's first moments, so
what the optimizer really updates), the optimizer state's bytes (every tensor of it, over all ranks' files: moments,
step counts and ZeRO's fp32 partitions), the checkpoint's size on disk, the median step time (the global batch over
TensorBoard's ``train/samples_per_sec``), and the last evaluation's rsum and zero-shot top-1. Prints a Markdown table
(docs/fine-tuning.md's LoRA section). Reads files only: nothing is rebuilt, no DeepSpeed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from typing import Dict, Iterator, List, Optional

import torch

from zvl_ds.model.safe_load import load_weights_only
from zvl_ds.model.saved_run import resolve_tag, run_config


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _moments(value) -> Iterator[torch.Tensor]:
    """The optimizer's first moments (``exp_avg``, or SGD's ``momentum_buffer``) wherever the state nests them."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("exp_avg", "momentum_buffer") and isinstance(item, torch.Tensor):
                yield item
            else:
                yield from _moments(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _moments(item)


def optimizer_states(folder: str) -> List:
    """The optimizer state of every rank: ZeRO-1/2/3's ``*optim_states.pt``, else ZeRO-0's model states file."""
    files = sorted(glob.glob(os.path.join(folder, "*optim_states.pt")))
    if files:
        return [load_weights_only(path, ValueError, "")["optimizer_state_dict"] for path in files]
    states = load_weights_only(os.path.join(folder, "mp_rank_00_model_states.pt"), ValueError, "")
    return [states.get("optimizer") or {}]


def median_step_seconds(run_dir: str, batch_size: int) -> Optional[float]:
    """The global batch over the median ``train/samples_per_sec`` TensorBoard recorded; None without events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rates = []
    for events in glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(events, size_guidance={"scalars": 0})
        accumulator.Reload()
        if "train/samples_per_sec" in accumulator.Tags().get("scalars", []):
            rates += [event.value for event in accumulator.Scalars("train/samples_per_sec")]
    return batch_size / statistics.median(rates) if rates else None


def last_evaluation(run_dir: str) -> Dict[str, float]:
    path = os.path.join(run_dir, "eval_metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    found = {}
    for name, values in (rows[-1] if rows else {}).items():
        if isinstance(values, dict) and not name.endswith("_ema"):
            found.update({f"{name}/{key}": value for key, value in values.items() if key in ("rsum", "top1")})
    return found


def footprint(run_dir: str) -> Dict[str, object]:
    tag = resolve_tag(run_dir)
    folder = os.path.join(run_dir, tag)
    cfg = run_config(run_dir, tag)
    states = optimizer_states(folder)
    size = sum(os.path.getsize(path) for path in glob.glob(os.path.join(folder, "**"), recursive=True)
               if os.path.isfile(path))
    return {"run": os.path.basename(os.path.normpath(run_dir)), "tag": tag,
            "trainable": sum(t.numel() for state in states for t in _moments(state)),
            "optimizer_bytes": sum(t.numel() * t.element_size() for state in states for t in _tensors(state)),
            "checkpoint_bytes": size, "step_seconds": median_step_seconds(run_dir, cfg.data.batch_size),
            **last_evaluation(run_dir)}


def _mib(value: int) -> str:
    return f"{value / 2 ** 20:.2f} MiB"


def markdown(rows: List[Dict[str, object]]) -> str:
    scores = sorted({key for row in rows for key in row if "/" in key})
    lines = ["| run | trainable parameters | optimizer state | checkpoint | step time | " + " | ".join(scores) + " |",
             "| --- " * (5 + len(scores)) + "|"]
    for row in rows:
        step = f"{row['step_seconds']:.3f} s" if row["step_seconds"] is not None else "-"
        lines.append(f"| {row['run']} | {row['trainable']:,} | {_mib(row['optimizer_bytes'])} | "
                     f"{_mib(row['checkpoint_bytes'])} | {step} | "
                     + " | ".join(f"{row[key]:.1f}" if key in row else "-" for key in scores) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zvl_ds.bench.run_footprint", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="training run folders (ckpt.dir/data.exp_name)")
    args = parser.parse_args(argv)
    print(markdown([footprint(run) for run in args.runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
