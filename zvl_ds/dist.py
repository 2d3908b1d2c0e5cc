"""Process-group setup and rank helpers (gloo on CPU, NCCL on GPUs), plus the gathers the loss uses."""
from __future__ import annotations

import datetime
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist

# Every collective is bounded: a rank that dies or hangs fails the others after this long instead of forever.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("ZVL_DIST_TIMEOUT_MIN", "30")))


def _single_process_env() -> None:
    """A plain ``python train.py`` run: act as rank 0 of 1 (DeepSpeed would otherwise try MPI discovery)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", os.environ.get("ZVL_MASTER_PORT", "29500"))


def init_distributed(backend: Optional[str] = None, use_deepspeed: bool = True) -> None:
    """Join (or create) the default process group. Idempotent.

    On CPU, DeepSpeed JIT-compiles a shared-memory op (~30 s) on every fresh machine that training never
    uses (only inference all-reduce does); it is skipped here.
    """
    if dist.is_available() and dist.is_initialized():
        return
    _single_process_env()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if use_deepspeed:
        import deepspeed
        import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is not None and not torch.cuda.is_available():
            comm_torch.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend, timeout=DEFAULT_TIMEOUT)
    else:
        dist.init_process_group(backend=backend, timeout=DEFAULT_TIMEOUT)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group; without this, gloo processes sometimes abort at interpreter exit."""
    if is_distributed():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
