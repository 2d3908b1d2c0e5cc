"""Run a function on N real processes (gloo) from a test, with a bounded wait."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback
from typing import Any, Callable, List, Sequence

from zvl_ds.runtime.dist import free_port  # noqa: F401  (the tests take their ports from here)


def _entry(fn, rank, world_size, port, args, results, use_deepspeed):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        import torch

        torch.set_num_threads(1)
        import zvl_ds  # noqa: F401
        from zvl_ds.runtime.dist import cleanup, init_distributed

        init_distributed("gloo", use_deepspeed=use_deepspeed)
        result = fn(rank, world_size, *args)
        cleanup()
        # plain pickle copies tensor data; the queue's own pickler would send shared-memory handles that die
        # with this process
        results.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, which raises it in the test
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 240,
                    use_deepspeed: bool = True) -> List[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return results by rank.

    ``fn`` must be importable (defined at module level). Raises with the worker's traceback on failure,
    and kills every worker if they have not all finished within ``timeout`` seconds. The rendezvous port is
    picked free but can be taken by another process before the workers bind it: that case is retried.
    """
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout, use_deepspeed)
        except RuntimeError as error:
            if "Address already in use" not in str(error) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_once(fn, world_size, args, timeout, use_deepspeed):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, tuple(args), results, use_deepspeed))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    collected = {}
    failures = []
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(collected) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed workers did not finish within {timeout}s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 5))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not failures:
                    # a worker crashed hard (segfault, os._exit) without reporting
                    failures.append((-1, f"worker exited with code {dead[0].exitcode}"))
                    break
                continue
            if ok:
                collected[rank] = pickle.loads(payload)
            else:
                failures.append((rank, payload))
                break
    finally:
        for proc in procs:
            proc.join(timeout=20 if not failures else 2)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        rank, text = failures[0]
        raise RuntimeError(f"rank {rank} failed:\n{text}")
    return [collected[r] for r in range(world_size)]
