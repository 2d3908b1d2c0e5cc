"""The OpenCLIP bench on the tiny model: both steps run (the accum-freq step's maths is checked in
tests/unit/test_openclip_step.py)."""
import pytest

from tests.helpers.dist_utils import run_distributed


def _bench_worker(rank, world_size):
    from zvl_ds.bench.step import TINY, bench_openclip

    return bench_openclip(TINY, chunk=4, chunks=3, steps=1, warmup=1)


def test_openclip_bench_runs_both_steps_on_the_tiny_model():
    result = run_distributed(_bench_worker, 1)[0]
    assert result["global_batch"] == 12 and result["device"] == "cpu"
    assert result["openclip_loss"] in ("open_clip.loss.ClipLoss",
                                       "zvl_ds copy of open_clip ClipLoss (open_clip not importable)")
    assert result["openclip_samples_per_sec"] > 0 and result["zvl_ds_samples_per_sec"] > 0
    assert result["ratio_zvl_ds_to_openclip"] == pytest.approx(
        result["zvl_ds_samples_per_sec"] / result["openclip_samples_per_sec"])
