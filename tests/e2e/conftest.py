"""Fixtures shared by the end-to-end tests, made once per session: every test only reads them (a test that changes
its shards works on its own copy)."""
import pytest

from tests.helpers.data_fixtures import make_demo_shards
from tests.helpers.training_runs import run_uninterrupted


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Demo shards for the training runs, made as a user makes them (the two commands, each in its own process)."""
    _, out = make_demo_shards(tmp_path_factory.mktemp("demo"), train_size=96, valid_size=24, captions_per_image=2,
                              samples_per_shard=40)
    return str(out)


@pytest.fixture(scope="session")
def straight(shards, tmp_path_factory):
    """Uninterrupted resumable runs (``training_runs.run_uninterrupted``), one per world size, made when first asked
    for: what a preempted, killed or resumed run must end up equal to."""
    made = {}

    def run(world_size):
        if world_size not in made:
            made[world_size] = run_uninterrupted(shards, tmp_path_factory.mktemp("straight"), world_size)
        return made[world_size]
    return run
