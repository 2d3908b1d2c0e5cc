"""Stage functions with planted faults for the gpu-report runner's tests: each runs in a fresh process as a real
stage does (``zvl_ds.bench.fresh_process``), and fails the way a GPU stage can."""
import time


def returns(value):
    return {"value": value}


def raises(message, chunk=None):
    raise ValueError(f"{message} (chunk {chunk})")


def sleeps(seconds):
    time.sleep(seconds)
    return {"slept": seconds}


def out_of_memory_above(chunk, limit):
    """Runs out of device memory, as torch reports it, at any chunk above ``limit``."""
    import torch

    if chunk > limit:
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {chunk} GiB (planted)")
    return {"chunk": chunk}
