"""Distillation's quality on the CPU (``python -m zvl_ds.bench distill-quality``): a small student's validation RSUM
trained with and without a teacher, beside the teacher's own.

The teacher is the ``configs/finetune_small.yaml`` recipe (pretrained EfficientNet-Lite0 and MiniLM towers) trained
briefly on the demo data, exported, and its embeddings stored beside the shards once (``python -m
zvl_ds.reinforce_shards``; the students read them with ``distill.source=stored``, so the teacher's forward costs
nothing per step). The student is the demo config's ``tiny`` towers from random weights with ``loss.name=NCE``,
trained for the same steps three ways: without a teacher, distilled (the default weights 1 : 1) and pure distillation
(``distill.contrastive_weight=0``), each with every seed. Every stage is the user's command in a fresh process, with
its log in the work folder; the RSUMs are read back from each run's ``eval_metrics.jsonl``.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

VALID_SET = "demo_val"
VARIANTS = {  # name -> the student's overrides beyond the shared ones
    "no teacher": [],
    "distilled": ["distill.source=stored"],
    "pure distillation": ["distill.source=stored", "distill.contrastive_weight=0"],
}


@dataclass(frozen=True)
class Stage:
    name: str
    command: List[str]


@dataclass(frozen=True)
class Plan:
    """Every command of the measurement, in order, and where each run's figures land."""

    work: str
    teacher_run: str
    teacher_model: str
    stages: List[Stage]
    students: Dict[str, Dict[int, str]]  # variant -> seed -> run folder


def _python(*args: str) -> List[str]:
    return [sys.executable, *args]


def make_plan(work: str, teacher_cfg: str, student_cfg: str, teacher_steps: int, student_steps: int,
              seeds: Sequence[int], train_size: int, distill_overrides: Sequence[str] = ()) -> Plan:
    """The commands, as a user would type them, of one measurement in the folder ``work``; ``distill_overrides``
    (e.g. ``distill.scale=100``) go to the distilled students only."""
    data, shards, runs = (os.path.join(work, name) for name in ("data", "shards", "runs"))
    teacher_model = os.path.join(work, "teacher")
    stages = [
        Stage("demo data", _python("-m", "zvl_ds.make_demo_data", "--out", data, "--train-size", str(train_size),
                                   "--classify-size", "0")),
        Stage("shards", _python("-m", "zvl_ds.make_shards", "--data-root", data, "--dataset", "demo_flat",
                                "--dataset", "demo_sketch", "--dataset", VALID_SET, "--split", "all", "--out", shards,
                                "--overwrite", "--quiet")),
        Stage("teacher: train", _python("-m", "zvl_ds.train", "--cfg", teacher_cfg, f"data.data_path={shards}",
                                        f"ckpt.dir={runs}", "data.exp_name=teacher",
                                        f"runner.train_steps={teacher_steps}",
                                        f"runner.val_interval_steps={teacher_steps}",
                                        f"ckpt.step_interval={teacher_steps}")),
        Stage("teacher: export", _python("-m", "zvl_ds.export", os.path.join(runs, "teacher"), "--out",
                                         teacher_model)),
    ]
    shared = [f"data.data_path={shards}", f"ckpt.dir={runs}", "loss.name=NCE", f"runner.train_steps={student_steps}",
              f"runner.val_interval_steps={student_steps}", f"ckpt.step_interval={student_steps}"]
    teacher = [f"distill.teacher={teacher_model}"]
    stages.append(Stage("teacher: reinforce the shards",
                        _python("-m", "zvl_ds.reinforce_shards", "--cfg", student_cfg, *shared, *teacher,
                                "--overwrite", "--quiet")))
    students: Dict[str, Dict[int, str]] = {}
    for variant, extra in VARIANTS.items():
        for seed in seeds:
            name = f"student_{variant.replace(' ', '_')}_seed{seed}"
            students.setdefault(variant, {})[seed] = os.path.join(runs, name)
            stages.append(Stage(f"student: {variant}, seed {seed}",
                                _python("-m", "zvl_ds.train", "--cfg", student_cfg, *shared, f"seed={seed}",
                                        f"data.exp_name={name}",
                                        *(teacher + extra + list(distill_overrides) if extra else []))))
    return Plan(work, os.path.join(runs, "teacher"), teacher_model, stages, students)


def final_rsum(run_dir: str, valid_set: str = VALID_SET) -> float:
    """The RSUM of ``valid_set`` at the last evaluation of a run (its ``eval_metrics.jsonl``)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "eval_metrics.jsonl"), encoding="utf-8")
            if line.strip()]
    scored = [row for row in rows if valid_set in row]
    if not scored:
        raise RuntimeError(f"{run_dir}: no {valid_set} figures in eval_metrics.jsonl")
    return float(scored[-1][valid_set]["rsum"])


def stored_teacher_rsum(run_dir: str, valid_set: str = VALID_SET) -> Optional[float]:
    """The teacher's reference line a distilled run logs at step 0, from the stored embeddings (None: none)."""
    for line in open(os.path.join(run_dir, "eval_metrics.jsonl"), encoding="utf-8"):
        row = json.loads(line) if line.strip() else {}
        if f"{valid_set}_teacher" in row:
            return float(row[f"{valid_set}_teacher"]["rsum"])
    return None


def run_stage(stage: Stage, logs: str, index: int) -> float:
    """Runs one stage, its output in ``logs``; returns its seconds. A failing stage stops the measurement."""
    log_path = os.path.join(logs, f"{index:02d}_{re.sub(r'[^a-z0-9]+', '_', stage.name.lower()).strip('_')}.log")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(stage.command) + "\n\n")
        log.flush()
        done = subprocess.run(stage.command, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{stage.name} failed (exit {done.returncode}); its log: {log_path}")
    return seconds


def collect(plan: Plan) -> Dict[str, object]:
    """The figures of a finished plan: the teacher's RSUM and each student's, per seed, with the mean."""
    rows = {}
    for variant, runs in plan.students.items():
        per_seed = {seed: final_rsum(run) for seed, run in runs.items()}
        rows[variant] = {"rsum_per_seed": per_seed, "mean": statistics.mean(per_seed.values())}
    references = [stored_teacher_rsum(run) for runs in plan.students.values() for run in runs.values()]
    return {"teacher_rsum": final_rsum(plan.teacher_run),
            "teacher_rsum_from_stored_embeddings": next((r for r in references if r is not None), None),
            "students": rows}


def format_table(result: Dict[str, object]) -> str:
    seeds = list(next(iter(result["students"].values()))["rsum_per_seed"])
    lines = ["| run | " + " | ".join(f"RSUM, seed {seed}" for seed in seeds) + " | mean |",
             "| --- |" + " --- |" * (len(seeds) + 1)]
    stored = result["teacher_rsum_from_stored_embeddings"]
    teacher = f"{result['teacher_rsum']:.1f}" + (f" (stored embeddings: {stored:.1f})" if stored is not None else "")
    lines.append(f"| teacher | {teacher} |" + " |" * len(seeds))
    for variant, row in result["students"].items():
        lines.append(f"| student, {variant} | " + " | ".join(f"{row['rsum_per_seed'][seed]:.1f}" for seed in seeds)
                     + f" | {row['mean']:.1f} |")
    return "\n".join(lines)


def bench_distill_quality(work: str, teacher_cfg: str, student_cfg: str, teacher_steps: int, student_steps: int,
                          seeds: Sequence[int], train_size: int, distill_overrides: Sequence[str] = (),
                          verbose: bool = True) -> Dict[str, object]:
    plan = make_plan(os.path.abspath(work), os.path.abspath(teacher_cfg), os.path.abspath(student_cfg),
                     teacher_steps, student_steps, seeds, train_size, distill_overrides)
    logs = os.path.join(plan.work, "logs")
    os.makedirs(logs, exist_ok=True)
    seconds = {}
    for index, stage in enumerate(plan.stages):
        seconds[stage.name] = run_stage(stage, logs, index)
        if verbose:
            print(f"  [{sum(seconds.values()):6.0f} s] {stage.name}: {seconds[stage.name]:.0f} s", flush=True)
    result = collect(plan)
    result.update(teacher_steps=teacher_steps, student_steps=student_steps, seeds=list(seeds), train_size=train_size,
                  distill_overrides=list(distill_overrides), seconds=seconds, total_seconds=sum(seconds.values()),
                  work=plan.work)
    if verbose:
        print(format_table(result))
    return result


def run_distill_quality(args) -> Dict[str, object]:
    """``python -m zvl_ds.bench distill-quality`` (its flags: ``bench/__main__.py``)."""
    work = args.work or os.path.join(args.out, "distill_quality")
    print(f"distillation quality: teacher {args.teacher_cfg} ({args.teacher_steps} steps), student {args.cfg} "
          f"({args.student_steps} steps, seeds {args.seeds}{', ' if args.overrides else ''}"
          f"{' '.join(args.overrides)}), in {work}:")
    return bench_distill_quality(work, args.teacher_cfg, args.cfg, args.teacher_steps, args.student_steps, args.seeds,
                                 args.train_size, args.overrides)
