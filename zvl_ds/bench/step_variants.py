"""Training-step time of variants of one config, side by side: ``python -m zvl_ds.bench.step_variants --cfg CFG
--variant NAME[:key=value,key=value] ...``.

Each variant's model and optimizer are built once (the config's towers, locking and adapters, the trainer's optimizer
groups); then the variants take turns, one optimizer step each per round, on the same fixed batch (random pixels and
tokens of the config's sizes, one process, no DeepSpeed, no data loading), so a busy machine slows them alike. A step
is the forward of both towers, the symmetric InfoNCE loss of the batch, the backward and the optimizer update. Prints
each variant's trainable parameters and median step time; the first round is a warm-up and is not counted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from zvl_ds.config import load_config
from zvl_ds.model.build import build_model
from zvl_ds.model.inference import text_vocabulary_size
from zvl_ds.runtime.optim import build_optimizer


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """``NAME`` or ``NAME:key=value,key=value`` -> (name, overrides)."""
    name, _, rest = text.partition(":")
    return name, [item for item in rest.split(",") if item]


def fixed_batch(cfg, model, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random pixels and token ids (within the text tower's vocabulary) of the config's sizes."""
    generator = torch.Generator().manual_seed(seed)
    size, batch = cfg.transforms.input_size, cfg.data.batch_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    vocabulary = text_vocabulary_size(model.text_tower)
    input_ids = torch.randint(5, vocabulary, (batch, cfg.model.max_length), generator=generator)
    return images, input_ids, torch.ones_like(input_ids)


def one_step(model, optimizer, batch) -> None:
    images, input_ids, attention_mask = batch
    out = model(images=images, input_ids=input_ids, attention_mask=attention_mask)
    logits = out["image_embeds"] @ out["text_embeds"].T / out["temperature"]
    targets = torch.arange(logits.shape[0])
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_variants(cfg_path: Optional[str], common: List[str], variants: List[Tuple[str, List[str]]],
                  rounds: int) -> Dict[str, Dict[str, float]]:
    built = {}
    for name, overrides in variants:
        cfg = load_config(cfg_path, common + overrides)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, cfg.loss).train()
        built[name] = (model, build_optimizer(model, cfg.optim), fixed_batch(cfg, model))
    seconds: Dict[str, List[float]] = {name: [] for name in built}
    for round_index in range(rounds + 1):
        for name, (model, optimizer, batch) in built.items():
            start = time.perf_counter()
            one_step(model, optimizer, batch)
            if round_index > 0:  # round 0 warms up (allocations, first-call paths)
                seconds[name].append(time.perf_counter() - start)
    return {name: {"trainable": float(sum(p.numel() for p in built[name][0].parameters() if p.requires_grad)),
                   "median_seconds": statistics.median(values)} for name, values in seconds.items()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zvl_ds.bench.step_variants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default=None, help="the config the variants share")
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME or NAME:key=value,key=value (overrides of this variant); give it once per variant")
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds (one step of each variant per round)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides every variant shares")
    args = parser.parse_args(argv)
    results = time_variants(args.cfg, list(args.overrides), [parse_variant(text) for text in args.variant],
                            args.rounds)
    print("| variant | trainable parameters | median step time |\n| --- | --- | --- |")
    for name, result in results.items():
        print(f"| {name} | {int(result['trainable']):,} | {result['median_seconds']:.3f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
