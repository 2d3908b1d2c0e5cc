"""Speed options that must not change results, on a DeepSpeed engine: no host syncs per chunk, and the profile of a
DGA step (the checks that need no process group are in tests/unit/test_speed.py). Every case shares one spawned
process."""
import pytest
from torch.overrides import TorchFunctionMode

from tests.helpers.dist_utils import Case, SharedSpawn
from zvl_ds.config import load_config

# Tensor methods that make the host wait for the device (or copy to it)
SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _sync_worker(rank, world_size, stage, chunks_list):
    from zvl_ds.bench.step import TINY, _setup_engine, _synthetic_batch
    from zvl_ds.objective.build import build_step

    counts = {}
    for chunks in chunks_list:
        batch_size, chunk = 16, 16 // chunks
        cfg = load_config(None, TINY + [f"data.batch_size={batch_size}", f"data.batch_size_train={chunk}",
                                        "loss.name=MixUpNCE", "loss.temperature.name=parameter",
                                        "optim.name=SGD"])  # torch's plain Adam loop reads its step counters
        engine, placement = _setup_engine(cfg, stage)
        batch = _synthetic_batch(cfg, batch_size, placement.device)
        step = build_step(cfg, 1, 0)
        step(engine, batch, 0)  # first step: DeepSpeed's one-off set-up
        with CountSyncs() as counter:
            result = step(engine, batch, 1)
        assert result.applied
        counts[chunks] = counter.calls
    return counts


def _profile_worker(rank, world_size):
    from zvl_ds.bench.step import TINY, bench_profile

    return bench_profile(TINY, chunk=4, chunks=3, steps=1, warmup=1)


SYNC_STAGES = [0, 2]


@pytest.fixture(scope="module")
def spawn():
    cases = {("syncs", stage): Case(_sync_worker, (stage, [1, 2, 8])) for stage in SYNC_STAGES}
    return SharedSpawn(1, {**cases, "profile": Case(_profile_worker)}, timeout_per_case=120)


@pytest.mark.parametrize("stage", SYNC_STAGES)
def test_no_host_sync_inside_the_chunk_loops(spawn, stage):
    (counts,) = spawn["syncs", stage]
    # a host read per chunk would grow with the number of chunks; the step reads its figures once
    assert len(counts[1]) == len(counts[2]) == len(counts[8]), counts
    assert len(counts[8]) <= 12, counts[8]


def test_profile_of_a_dga_step_on_cpu(spawn):
    (result,) = spawn["profile"]
    split = result["ms_per_step"]
    for part in ("pass1", "loss", "pass2", "optimizer", "host_to_device", "deepspeed", "host_other"):
        assert split[part] >= 0.0, part
    assert min(split["pass1"], split["pass2"], split["optimizer"]) > 0.0
    # only what holds in every single measurement: the phases are disjoint ranges inside the step. Which phase
    # takes longer is a figure of python -m zvl_ds.bench profile, not a test (one profiled step is noisy)
    phases = split["pass1"] + split["loss"] + split["pass2"] + split["optimizer"]
    assert phases <= split["step_wall"] * 1.01
    assert split["host_to_device"] < split["pass1"] + split["pass2"]
