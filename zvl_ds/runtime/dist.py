"""Process-group setup and rank helpers (gloo on CPU, NCCL on GPUs), plus the gathers the loss uses.

Ranks come from the launcher's variables (torchrun, the deepspeed launcher: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Without them, under SLURM's ``srun`` (one task per GPU) they come
from SLURM's: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of the step's or job's node list
as the rendezvous address, and a port derived from the job id (``slurm_port``) unless ``MASTER_PORT`` is set.
"""
from __future__ import annotations

import datetime
import os
import re
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

# Every collective is bounded: a rank that dies or hangs fails the others after this long instead of forever.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("ZVL_DIST_TIMEOUT_MIN", "30")))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000
SLURM_NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list, expanded without ``scontrol``: ``node[01-04,07],gpu5`` -> ``node01``,
    ``rack[1-2]-n[3-4]`` -> ``rack1-n3``."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    entry = nodelist[:end].strip()
    # each bracket group stands for its first value: the start of its first range, zero padding kept
    host = re.sub(r"\[([^\]]*)\]", lambda match: match.group(1).split(",")[0].split("-")[0], entry)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read the first host of the SLURM node list {nodelist!r}")
    return host


def slurm_port(job_id: str) -> int:
    """A rendezvous port every task of a job computes alike; jobs sharing a node get different ones."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if job_id.isdigit() else SLURM_PORT_BASE


def slurm_launch_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """The launcher variables that ``srun`` implies: {} unless this process is a SLURM task and no launcher (torchrun,
    the deepspeed launcher) set its own, which win."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {}
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return {}
    values = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
              "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    if "SLURM_NTASKS_PER_NODE" in environ:
        values["LOCAL_WORLD_SIZE"] = environ["SLURM_NTASKS_PER_NODE"]
    if "MASTER_ADDR" not in environ:
        nodelist = next((environ[name] for name in SLURM_NODELIST_VARIABLES if environ.get(name)), None)
        values["MASTER_ADDR"] = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in environ:
        values["MASTER_PORT"] = str(slurm_port(environ.get("SLURM_JOB_ID", "")))
    return values


def _single_process_env() -> None:
    """A plain ``python train.py`` run: act as rank 0 of 1 (DeepSpeed would otherwise try MPI discovery).

    With no launcher there is nobody to meet, so any free port will do: two single-process jobs on one machine
    must not collide on a fixed default.
    """
    if "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if os.environ["WORLD_SIZE"] == "1":
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(backend: Optional[str] = None, use_deepspeed: bool = True,
                     timeout: Optional[datetime.timedelta] = None) -> None:
    """Join (or create) the default process group. Idempotent. ``timeout`` bounds every collective
    (default: ``DEFAULT_TIMEOUT``; training passes ``runner.collective_timeout``).

    On CPU, DeepSpeed JIT-compiles a shared-memory op (~30 s) on every fresh machine that training never
    uses (only inference all-reduce does); it is skipped here.
    """
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.update(slurm_launch_env(os.environ))
    _single_process_env()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    timeout = timeout or DEFAULT_TIMEOUT
    if use_deepspeed:
        import deepspeed
        import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is not None and not torch.cuda.is_available():
            comm_torch.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)


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


def max_over_ranks(values: Sequence[int], device: Optional[torch.device] = None) -> List[int]:
    """Element-wise maximum of small integers over every rank: one tiny all-reduce (the step boundary's flags)."""
    if get_world_size() == 1:
        return [int(value) for value in values]
    tensor = torch.tensor([int(value) for value in values], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(value) for value in tensor.tolist()]


def cleanup() -> None:
    """Leave the process group after a SUCCESSFUL run; without this, gloo processes sometimes abort at
    interpreter exit. Never on an error path: its barrier would wait for ranks that failed."""
    if is_distributed():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Gathers used by the contrastive loss
# --------------------------------------------------------------------------------------------------


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order). Every rank must pass the same shape."""
    x = x.contiguous()
    world_size = dist.get_world_size()
    # gloo fills a wrongly shaped buffer with garbage or fails obscurely; name the problem instead.
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"all_gather needs the same tensor shape on every rank, got "
                         f"{[tuple(s.tolist()) for s in shapes]} (rank order)")
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradient over ranks and keeps this rank's rows.

    Each rank's loss uses every rank's rows, so the gradient of the SUM of per-rank losses with respect to
    this rank's rows is the sum over ranks of their gradients for those rows (ZeroVL's GatherLayer).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Autograd all_gather along dim 0; backward all-reduces (SUM) the gradient and returns this rank's slice.

    With per-rank losses that are means over local rows and a data-parallel engine that averages gradients
    over ranks, the result is exactly the gradient of the global-mean loss. World size 1: the identity.
    """
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Plain all_gather along dim 0, detached, this rank's own rows included (ZeroVL gather_backward: false)."""
    x = x.detach()
    if get_world_size() == 1:
        return x
    with torch.no_grad():
        return _all_gather_cat(x)
