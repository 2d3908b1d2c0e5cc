"""Distillation's two teacher sources side by side (``python -m zvl_ds.bench distill-speed``): the time of a training
step with the teacher run in the step (``distill.source: online``) against its embeddings read from reinforced shards
(``stored``), on the same samples, in one process.

Each source gets its loader, built as the trainer builds it (online: crops at the larger of the two image sizes and
the captions in the teacher's tokens too; stored: the stored embeddings of each sample and of its picked caption),
and its step, over one student engine. Each round, each source's loader makes its next batch in this process
(``data.num_workers: 0``, so the decoding is timed rather than hidden behind prefetching workers) and its step runs;
the sources take turns, so a machine busy with other work slows both alike. Both loaders draw the same samples (the
plan does not depend on the teacher), which the benchmark checks. Medians are reported, and their ratios.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

import torch

from zvl_ds.bench.step import _setup_engine
from zvl_ds.config import load_config
from zvl_ds.data import TeacherInputs, build_train_loader, load_tokenizer
from zvl_ds.data.sources import resolve_train_datasets
from zvl_ds.model.teacher import load_teacher, stored_teacher
from zvl_ds.objective.build import build_step
from zvl_ds.objective.distill_loss import TeacherEmbeddings
from zvl_ds.objective.step import StepBatch

SOURCES = ("online", "stored")


def _step_batch(batch, device: torch.device) -> StepBatch:
    """A loader's batch as the trainer hands it to the step (``Trainer._to_step_batch``)."""
    stored = (None if batch.teacher_image_embeds is None else
              TeacherEmbeddings(batch.teacher_image_embeds.float(), batch.teacher_text_embeds.float()))
    return StepBatch(batch.images.to(device), batch.input_ids, batch.attention_mask, batch.teacher_input_ids,
                     batch.teacher_attention_mask, stored)


def bench_distill_speed(cfg_path: str, overrides: Sequence[str], rounds: int = 10, warmup: int = 2,
                        verbose: bool = True) -> Dict[str, object]:
    """Median seconds per batch (loader) and per step of each source, and online / stored; see the module docstring.
    ``cfg_path`` and ``overrides`` name a training config with ``distill.teacher`` whose shards are reinforced."""
    configs = {source: load_config(cfg_path, list(overrides) + [f"distill.source={source}", "data.num_workers=0"])
               for source in SOURCES}
    if not configs["online"].distill.enabled:
        raise ValueError("distill-speed needs a teacher: add distill.teacher=FOLDER to --overrides")
    engine, placement = _setup_engine(configs["online"], stage=0)
    teacher = load_teacher(configs["online"], placement.device, placement.dtype)
    stored = stored_teacher(configs["stored"], resolve_train_datasets(configs["stored"].data))
    tokenizer = load_tokenizer(configs["online"].model.text_encoder)
    inputs = TeacherInputs(teacher.image_size, teacher.tokenizer, teacher.max_length)
    loaders = {"online": build_train_loader(configs["online"], 0, 1, tokenizer, inputs),
               "stored": build_train_loader(configs["stored"], 0, 1, tokenizer)}
    steps = {"online": build_step(configs["online"], 1, 0, placement.device, placement.dtype, teacher=teacher),
             "stored": build_step(configs["stored"], 1, 0, placement.device, placement.dtype, stored=stored)}
    times: Dict[str, Dict[str, List[float]]] = {source: {"batch": [], "step": []} for source in SOURCES}
    batches = {source: iter(loader) for source, loader in loaders.items()}
    try:
        for index in range(warmup + rounds):
            keys = []
            for source in SOURCES:
                start = time.perf_counter()
                batch = next(batches[source])
                made = time.perf_counter()
                result = steps[source](engine, _step_batch(batch, placement.device), index)
                if placement.device.type == "cuda":
                    torch.cuda.synchronize()
                done = time.perf_counter()
                if not result.applied:
                    raise RuntimeError(f"a {source} step was skipped: {result.skip_reason}")
                keys.append(batch.keys)
                if index >= warmup:
                    times[source]["batch"].append(made - start)
                    times[source]["step"].append(done - made)
            if keys[0] != keys[1]:
                raise RuntimeError(f"round {index}: the two loaders drew different samples")
    finally:
        for loader in loaders.values():
            loader.close()
    medians = {source: {part: statistics.median(values) for part, values in parts.items()}
               for source, parts in times.items()}
    result = {"rounds": rounds, "global_batch": configs["online"].data.batch_size, "device": str(placement.device),
              "threads": torch.get_num_threads(), "teacher": str(configs["online"].distill.teacher),
              "teacher_image_size": teacher.image_size, "seconds": medians,
              "step_ratio": medians["online"]["step"] / medians["stored"]["step"],
              "total_ratio": sum(medians["online"].values()) / sum(medians["stored"].values())}
    if verbose:
        for source in SOURCES:
            print(f"  {source:>6}: batch {1e3 * medians[source]['batch']:8.1f} ms, step "
                  f"{1e3 * medians[source]['step']:8.1f} ms (median of {rounds})")
        print(f"  online / stored: step {result['step_ratio']:.2f}x, batch + step {result['total_ratio']:.2f}x "
              f"(global batch {result['global_batch']}, {result['device']}, {result['threads']} threads)")
    return result
