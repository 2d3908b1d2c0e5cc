"""The largest-chunk search under planted step outcomes: it stops at the first out-of-memory and raises on anything
else (tests/e2e/test_max_chunk.py runs a real step on the CPU)."""
import pytest

from zvl_ds.bench import step as bench


def _planted(limit, other_error_at=None):
    tried = []

    def step(overrides, global_batch, chunk, stage):
        tried.append(chunk)
        assert global_batch == 2 * chunk  # two chunks: pass 2 runs with one chunk's activations after another
        if chunk == other_error_at:
            return None, "ValueError: model.image_encoder: timm cannot build"
        if chunk > limit:
            return None, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
        return {"chunk": chunk, "peak_bytes": chunk * 1000, "step_seconds": 0.5, "device": "cuda"}, None
    return step, tried


def test_search_stops_at_the_first_chunk_that_runs_out_of_memory(monkeypatch):
    step, tried = _planted(limit=256)
    monkeypatch.setattr(bench, "_step_in_fresh_process", step)
    result = bench.bench_max_chunk(chunks=[512, 64, 128, 256, 1024])
    assert result["largest_chunk_that_fits"] == 256
    assert tried == [64, 128, 256, 512]  # smallest first, nothing tried after the first failure
    assert [row["fits"] for row in result["rows"]] == [True, True, True, False]
    assert result["rows"][2]["ms_per_sample"] == pytest.approx(1e3 * 0.5 / 512)


def test_search_raises_on_a_failure_that_is_not_memory(monkeypatch):
    step, _ = _planted(limit=1024, other_error_at=128)
    monkeypatch.setattr(bench, "_step_in_fresh_process", step)
    with pytest.raises(RuntimeError, match="timm cannot build"):
        bench.bench_max_chunk(chunks=[64, 128, 256])
