"""gpu-report's stages that run another program and read what it prints: ``openclip`` (OpenCLIP's own
``open_clip_train`` on the same towers, ``bench/openclip_train.py``) and ``verify_exactness``
(``python -m zvl_ds.verify_exactness --synthetic`` at a small batch).

Each stage function runs in a fresh process (``bench/fresh_process.py``) and ends its own child program a little
before the stage's budget does, so that the child's output still reaches the stage's record.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence

from zvl_ds.bench.fresh_process import single_rank_env
from zvl_ds.bench.gpu_report_step import report_overrides
from zvl_ds.bench.openclip_train import (OPENCLIP_PRECISION, openclip_train_command, samples_per_second, step_rates,
                                         write_model_folder)
from zvl_ds.config import load_config

_OUTPUT_TAIL = 2000  # characters of a child program's output kept in a result or an error
_CHILD_MARGIN_S = 10.0  # a stage's own child process (open_clip_train, verify_exactness) ends this much earlier
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
    env = {**os.environ, **single_rank_env()}
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, timeout_s - _CHILD_MARGIN_S),
                          env=env)
    if done.returncode not in (0, 1):  # 1 is a verdict (a group beyond tolerance), anything else a failure
        raise RuntimeError(f"verify_exactness exited with {done.returncode}:\n{done.stderr[-_OUTPUT_TAIL:]}")
    return {**parse_verify_output(done.stdout), "exit_code": done.returncode, "global_batch": global_batch,
            "chunk": chunk, "precision": precision, "zero_stage": zero_stage, "command": command[1:],
            "output": done.stdout[-_OUTPUT_TAIL:]}


def openclip_throughput(towers: Sequence[str], device: str, precision: str, global_batch: int, chunk: int,
                        steps: int, workers: int, folder: str, timeout_s: float,
                        zvl_ds_samples_per_sec: Optional[float] = None) -> Dict[str, object]:
    """open_clip_train's samples/s on the same towers and global batch (``bench/openclip_train.py``), and the
    ratio zvl_ds / OpenCLIP when stage 1's figure is given."""
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
                           + f":\n{log[-_OUTPUT_TAIL:]}")
    rate = samples_per_second(rates)
    return {"global_batch": global_batch, "chunk": chunk, "accum_freq": global_batch // chunk,
            "precision": OPENCLIP_PRECISION[precision], "device": device, "steps_logged": len(rates),
            "samples_per_sec_per_step": rates, "samples_per_sec": rate, "seconds": time.monotonic() - started,
            "zvl_ds_samples_per_sec": zvl_ds_samples_per_sec,
            "ratio_zvl_ds_to_openclip": zvl_ds_samples_per_sec / rate if zvl_ds_samples_per_sec else None,
            "command": command[3:]}
