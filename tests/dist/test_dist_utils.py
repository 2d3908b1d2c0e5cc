import torch
import torch.distributed as dist
import pytest

from tests.helpers.dist_utils import Case, SharedSpawn, run_distributed


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


def _leave_state_behind(rank, world_size):
    """What an engine leaves in its process: F.linear swapped (ZeRO-3 does it), the global generator moved on."""
    first_draw = torch.rand(3)
    torch.nn.functional.linear = lambda *args, **kwargs: None
    torch.rand(100)
    return first_draw


def _fresh_state(rank, world_size):
    import torch.nn.functional as F

    return F.linear is torch._C._nn.linear, torch.rand(3)


def test_shared_spawn_gives_each_case_a_fresh_state_and_reports_failures_per_case():
    spawn = SharedSpawn(2, {"dirty": Case(_leave_state_behind), "fresh": Case(_fresh_state),
                            "sum": Case(_sum_ranks), "fail": Case(_fail_on_rank_one), "after": Case(_sum_ranks)},
                        use_deepspeed=False)
    first_draws = spawn["dirty"]
    for rank, (original_linear, draw) in enumerate(spawn["fresh"]):
        assert original_linear, rank
        assert torch.equal(draw, first_draws[rank]), rank
    assert spawn["sum"] == [3.0, 3.0]
    with pytest.raises(RuntimeError, match="(?s)case 'fail' failed on rank 1:.*boom on purpose"):
        spawn["fail"]
    with pytest.raises(RuntimeError, match="case 'after' did not run: case 'fail' failed before it"):
        spawn["after"]
