"""Train a dual encoder: ``deepspeed zvl_ds/train.py --deepspeed_config ds_configs/zero2.json --cfg CFG [k=v ...]``.

Also runs as ``deepspeed --module zvl_ds.train``, ``python -m zvl_ds.train``, ``zvl-train``, under ``torchrun``
(LAVIS's ``python -m torch.distributed.run --nproc_per_node=N zvl_ds/train.py --cfg-path CFG``: ``--cfg-path`` is
another name for ``--cfg``) and as a plain ``python zvl_ds/train.py``. Run by its path, Python puts ``zvl_ds/`` first on ``sys.path``; that
is harmless because no module of the package is named like an installed package (a unit test keeps it so).
This module only parses the command line, sets up the processes and the DeepSpeed config, and runs the
``Trainer`` (``trainer.py``), which wires the parts together.

Exit codes: 0 done; 2 a user error (``error: ...``; the run folder in use by another job included); 75
(``PREEMPTED_EXIT_CODE``) stopped by SIGTERM or SIGUSR1 after saving a complete checkpoint: start the same command
again to resume; 128 + N ended at once by a second signal N or ``runner.preempt_timeout``; 1 a bug (traceback).
Ranks come from torchrun's or the deepspeed launcher's variables, or from SLURM's under ``srun``
(``runtime/dist.py``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import List, Optional

import torch

import zvl_ds  # noqa: F401  (torchvision shim before timm/transformers)
from zvl_ds.base.atomic_write import write_text_atomic
from zvl_ds.base.cli import run
from zvl_ds.config import ConfigError, check_world_size, load_config
from zvl_ds.observe.logs import setup_logging
from zvl_ds.observe.wandb_sink import require_wandb
from zvl_ds.runtime import dist
from zvl_ds.runtime.checkpoint import gather_failures, refuse_overwrite
from zvl_ds.runtime.engine import Placement, build_ds_config, resolve_placement
from zvl_ds.runtime.preemption import PREEMPTED_EXIT_CODE
from zvl_ds.runtime.run_lock import RunFolderBusy, acquire_run_lock
from zvl_ds.trainer import Trainer, check_data_sources


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", "--cfg-path", dest="cfg", required=True,
                        help="YAML config (ZeroVL keys, LAVIS run:/model:/datasets: blocks; _base_ inheritance); "
                             "--cfg-path is LAVIS's name for it")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                        help="DeepSpeed JSON (ds_configs/zero*.json); default: ZeRO-0 with everything from the YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK from the environment is used otherwise")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser.parse_args(argv)


def limit_cpu_threads(placement: Placement) -> None:
    """Several ranks on one CPU machine must not each use every core (the deepspeed launcher sets no limit)."""
    if placement.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", dist.get_world_size())))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.cfg, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    check_data_sources(cfg)
    require_wandb(cfg)
    if not cfg.evaluate:
        refuse_overwrite(cfg.run_dir, cfg.ckpt.auto_resume or bool(cfg.resume_ckpt_path), cfg.ckpt.overwrite)
    dist.init_distributed(timeout=datetime.timedelta(seconds=cfg.runner.collective_timeout))
    setup_logging(dist.get_rank(), dist.get_world_size())
    # No `finally: dist.cleanup()`: its barrier would wait forever for a rank that failed. An error escapes to
    # zvl_ds.base.cli.run, which ends this rank at once (and with it, through the launcher, the job).
    world_size = dist.get_world_size()
    check_world_size(cfg, world_size)
    placement = resolve_placement(cfg, int(os.environ.get("LOCAL_RANK", args.local_rank or 0)))
    limit_cpu_threads(placement)
    ds_config = build_ds_config(args.deepspeed_config, cfg, world_size)
    lock_run_folder(cfg.run_dir)  # before anything is written there
    trainer = Trainer(cfg, ds_config, placement)
    try:
        trainer.resume()  # refuses changed settings: config.yaml is rewritten only for a run that goes ahead
        if dist.is_main_process():
            write_text_atomic(os.path.join(cfg.run_dir, "config.yaml"), cfg.to_yaml())
        if cfg.evaluate:
            trainer.evaluate(trainer.step)
        else:
            trainer.train()
    finally:
        trainer.close()
    dist.cleanup()
    return PREEMPTED_EXIT_CODE if trainer.preempted else 0


def lock_run_folder(run_dir: str) -> None:
    """Rank 0 locks the run folder for the life of the job; every rank stops (exit 2) when another job holds it."""
    refusal = None
    if dist.is_main_process():
        try:
            acquire_run_lock(run_dir)
        except RunFolderBusy as error:
            refusal = str(error)
    refusals = gather_failures(refusal)
    if refusals:
        raise RunFolderBusy(refusals[0][1])


def cli() -> int:
    """``python -m zvl_ds.train`` and the console script ``zvl-train``: errors exit through ``zvl_ds.base.cli.run``."""
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
