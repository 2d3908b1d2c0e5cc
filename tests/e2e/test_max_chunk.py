"""The largest-chunk search really runs a step per candidate on the CPU, in a fresh process (its logic under planted
outcomes: tests/unit/test_max_chunk.py)."""
from zvl_ds.bench import step as bench


def test_search_runs_a_real_step_per_candidate_on_cpu():
    result = bench.bench_max_chunk(bench.TINY, chunks=[4])
    (row,) = result["rows"]
    assert row["fits"] and row["chunk"] == 4 and row["global_batch"] == 8 and row["peak_bytes"] > 0
    assert result["largest_chunk_that_fits"] == 4
