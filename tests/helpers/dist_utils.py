"""Run a function on N real processes (gloo) from a test, with a bounded wait."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import sys
import traceback
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

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


# ------------------------------------------------------------------------------------------ shared spawns
# Starting a rank costs seconds of CPU (torch, timm, transformers and DeepSpeed imports, DeepSpeed set-up), more
# than most cases take to run. A test module therefore runs all its cases of one world size in one spawn: each
# case builds its own engine from scratch, the workers return every case's result, and each test asserts on its
# own case.


class Case(NamedTuple):
    """One call ``fn(rank, world_size, *args)`` among the cases that share a spawn."""
    fn: Callable
    args: Tuple = ()


def _restore_fresh_state(fresh_linear, fresh_seed):
    """Put back what one case's DeepSpeed engine leaves behind in the process, so that the next case starts from
    the state a fresh process has: ZeRO-3 swaps torch.nn.functional.linear for its own (matmul, then the bias
    added: it rounds differently) for the rest of the process; torch.compile keeps its compiled graphs; and the
    global generator goes on from where the case left it. (Without this, 24 of test_dga_exactness's 39 runs
    differed from the same run alone: by up to 2.3e-12 in fp32, 1e-3 in bf16; with it, all 39 are bit-identical.)"""
    import gc

    import torch

    torch.nn.functional.linear = fresh_linear
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    torch.manual_seed(fresh_seed)
    gc.collect()  # the case's engine, its hooks and partitions go before the next one is built


def _run_cases(rank, world_size, cases):
    """Worker: every case in turn, each from a fresh process's state; a case that raises ends the run here.

    The cases after a failed one are not run: its ranks may have stopped in different collectives, and a next
    case would pair them wrongly. For the same reason the process group is left without a barrier."""
    import torch
    import torch.distributed as dist

    fresh_linear, fresh_seed = torch.nn.functional.linear, torch.initial_seed()
    outcomes = []
    for index, case in enumerate(cases):
        try:
            outcomes.append(("ok", case.fn(rank, world_size, *case.args)))
        except Exception:
            outcomes.append(("failed", traceback.format_exc()))
            outcomes += [("not run", None)] * (len(cases) - index - 1)
            if dist.is_initialized():
                dist.destroy_process_group()
            break
        finally:
            _restore_fresh_state(fresh_linear, fresh_seed)
    return outcomes


class SharedSpawn:
    """Cases of one world size run together in one spawn, started on the first request for a result.

    ``spawn[key]`` is the case's results by rank. A case that raised in a worker raises in the test that asks for
    it, with the worker's traceback; so do the cases after it (which did not run, or ran beside a failed rank)."""

    def __init__(self, world_size: int, cases: Dict[Any, Case], timeout_per_case: float = 120,
                 use_deepspeed: bool = True):
        self.world_size, self.cases, self.use_deepspeed = world_size, dict(cases), use_deepspeed
        self.timeout = 120 + timeout_per_case * len(self.cases)
        self._outcomes: Optional[List[List[Tuple[str, Any]]]] = None  # by case, then by rank
        self._error: Optional[BaseException] = None  # a spawn that failed as a whole is not started again

    def __getitem__(self, key) -> List[Any]:
        keys = list(self.cases)
        if key not in self.cases:
            raise KeyError(f"{key!r} is not among the cases of this {self.world_size}-rank spawn: add it there")
        outcomes = self._run()[keys.index(key)]
        failed = self._first_failure()
        if failed is not None and failed[0] == keys.index(key):
            rank = failed[1]
            raise RuntimeError(f"case {key!r} failed on rank {rank}:\n{outcomes[rank][1]}")
        if failed is not None and failed[0] < keys.index(key):
            raise RuntimeError(f"case {key!r} did not run: case {keys[failed[0]]!r} failed before it on rank "
                               f"{failed[1]}")
        return [result for _, result in outcomes]

    def _run(self) -> List[List[Tuple[str, Any]]]:
        if self._error is not None:
            raise RuntimeError(f"the {self.world_size}-rank spawn of these cases failed") from self._error
        if self._outcomes is None:
            try:
                by_rank = run_distributed(_run_cases, self.world_size, (list(self.cases.values()),),
                                          timeout=self.timeout, use_deepspeed=self.use_deepspeed)
            except BaseException as error:
                self._error = error
                raise
            self._outcomes = [list(by_case) for by_case in zip(*by_rank)]
        return self._outcomes

    def _first_failure(self) -> Optional[Tuple[int, int]]:
        """(case index, rank) of the first case that raised, lowest rank first; None if none did."""
        failures = [(index, rank) for index, by_rank in enumerate(self._outcomes)
                    for rank, (status, _) in enumerate(by_rank) if status == "failed"]
        return min(failures) if failures else None
