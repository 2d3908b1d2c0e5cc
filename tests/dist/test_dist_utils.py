import torch
import torch.distributed as dist
import pytest

from tests.helpers.dist_utils import run_distributed


def _sum_ranks(rank, world_size):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return value.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_real_processes_reduce():
    assert run_distributed(_sum_ranks, 3, use_deepspeed=False) == [6.0, 6.0, 6.0]


def test_worker_failure_is_reported():
    with pytest.raises(RuntimeError, match="boom on purpose"):
        run_distributed(_fail_on_rank_one, 2, use_deepspeed=False, timeout=60)
