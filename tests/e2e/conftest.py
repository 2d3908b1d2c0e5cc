"""Fixtures shared by the end-to-end tests."""
import pytest

from tests.helpers.data_fixtures import make_demo_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Demo shards for the training runs (made once per test module, as a user makes them)."""
    _, out = make_demo_shards(tmp_path_factory.mktemp("demo"), train_size=96, valid_size=24, captions_per_image=2,
                              samples_per_shard=40)
    return str(out)
