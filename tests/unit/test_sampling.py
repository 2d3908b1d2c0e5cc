"""Index arithmetic of the sampler, checked against brute-force enumerations."""
from collections import Counter

import numpy as np
import pytest

from zvl_ds.data.sampling import (DEBIAS, SEQUENTIAL, SHUFFLE, DatasetLayout, SamplingError, build_plan,
                                  debias_draw, largest_remainder, role_steps, segments_in_range, validation_part)


def positions(part_or_segments, order=None):
    """(shard, position) pairs of a part, in order."""
    segments = getattr(part_or_segments, "segments", part_or_segments)
    return [(s.shard, p) for s in segments for p in range(s.start, s.stop)]


def concatenated(order, sizes):
    return [(int(shard), p) for shard in order for p in range(sizes[shard])]


def test_segments_in_range_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(0, 6, size=rng.integers(1, 7))
        order = rng.permutation(len(sizes))
        flat = concatenated(order, sizes)
        lo = int(rng.integers(0, len(flat) + 1))
        hi = int(rng.integers(lo, len(flat) + 1))
        assert positions(segments_in_range(order, sizes, lo, hi)) == flat[lo:hi]


def test_largest_remainder_and_role_steps():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(7, [5, 0, 2]) == [5, 0, 2]
    assert sum(largest_remainder(1001, [3, 7, 11])) == 1001
    for lo in range(0, 12):
        for hi in range(lo, 15):
            for roles in (1, 2, 3):
                for role in range(roles):
                    assert role_steps(lo, hi, role, roles) == sum(1 for g in range(lo, hi) if g % roles == role)


def layouts(*sizes_per_dataset):
    return [DatasetLayout(f"d{i}", tuple(sizes)) for i, sizes in enumerate(sizes_per_dataset)]


def rank_slice(plan, dataset, pass_index):
    """The positions of this rank's slice of a pass, by direct enumeration of the permuted shards."""
    sizes = plan.datasets[dataset].sizes
    flat = concatenated(plan.shard_order(dataset, pass_index), sizes)
    per_rank = sum(sizes) // plan.world_size
    return flat[plan.rank * per_rank:(plan.rank + 1) * per_rank]


@pytest.mark.parametrize("world_size,roles", [(1, 1), (2, 2), (3, 2), (4, 3)])
def test_shuffle_epoch_tiles_each_rank_slice(world_size, roles):
    data = layouts([7, 5, 9], [4, 4])  # fewer shards than ranks x roles in some cases
    batch = 3
    per_rank = [sum(d.sizes) // world_size for d in data]
    for epoch in (0, 1):
        seen_all = set()
        for rank in range(world_size):
            plan = build_plan(SHUFFLE, data, 11, rank, world_size, roles, batch)
            steps = plan.steps_per_epoch
            assert steps == sum(per_rank) // batch  # the same on every rank
            taken = {k: [] for k in range(2)}
            mix = []
            for role in range(roles):
                piece = plan.piece(0, role, epoch)
                served = sum(1 for g in range(epoch * steps, (epoch + 1) * steps) if g % roles == role)
                assert piece.length == served * batch
                for part in piece.parts:
                    assert part.pass_index == epoch
                    taken[part.dataset] += positions(part)
                if piece.pattern is not None:
                    mix += piece.pattern.tolist()
            for k in range(2):
                # the roles' parts are consecutive and start the rank slice; the quota is proportional
                assert taken[k] == rank_slice(plan, k, epoch)[:plan.quota[k]]
                seen_all.update((k, *p) for p in taken[k])
            assert Counter(mix) == Counter({k: q for k, q in enumerate(plan.quota) if q})
            assert sum(plan.quota) == steps * batch
        # ranks never share a sample
        assert len(seen_all) == sum(sum(build_plan(SHUFFLE, data, 11, r, world_size, roles, batch).quota)
                                    for r in range(world_size))


def test_shard_order_changes_with_pass_and_seed_only():
    data = layouts(list(range(1, 21)))
    a = build_plan(SHUFFLE, data, 5, 0, 2, 1, 4)
    b = build_plan(SHUFFLE, data, 5, 1, 2, 3, 4)
    c = build_plan(SHUFFLE, data, 6, 0, 2, 1, 4)
    assert a.shard_order(0, 0).tolist() == b.shard_order(0, 0).tolist()  # rank/roles do not matter
    assert a.shard_order(0, 0).tolist() != a.shard_order(0, 1).tolist()  # reshuffled every pass
    assert a.shard_order(0, 0).tolist() != c.shard_order(0, 0).tolist()
    assert sorted(a.shard_order(0, 3).tolist()) == list(range(20))


def test_sequential_runs_datasets_one_after_another():
    data = layouts([10, 10], [9], [3])  # the last holds no full batch
    plan = build_plan(SEQUENTIAL, data, 1, 0, 1, 2, 4)
    assert plan.dataset_steps == [5, 2, 0] and plan.steps_per_epoch == 7
    assert [plan.source_of_step(g) for g in range(14)] == [0] * 5 + [1] * 2 + [0] * 5 + [1] * 2
    for source in (0, 1):
        taken = []
        for role in range(2):
            piece = plan.piece(source, role, 1)
            first = plan.steps_per_epoch + sum(plan.dataset_steps[:source])
            served = sum(1 for g in range(first, first + plan.dataset_steps[source]) if g % 2 == role)
            assert piece.length == served * 4
            taken += positions(piece.parts[0])
        assert taken == rank_slice(plan, source, 1)[:plan.dataset_steps[source] * 4]


def test_debias_draw_is_a_function_of_seed_and_step_only():
    data = layouts([30, 30], [10])
    plans = [build_plan(DEBIAS, data, 2021, r, w, roles, 2) for r, w, roles in [(0, 1, 1), (0, 2, 2), (1, 2, 3),
                                                                                 (2, 3, 1)]]
    draws = [[p.source_of_step(g) for g in range(200)] for p in plans]
    assert all(d == draws[0] for d in draws)
    cumulative = np.cumsum([60 / 70, 10 / 70])
    expected = [min(int(np.searchsorted(cumulative, np.random.default_rng([2021, g]).random() * cumulative[-1],
                                        side="right")), 1) for g in range(200)]
    assert draws[0] == expected
    assert debias_draw(2021, 5, cumulative) == expected[5]


def test_debias_frequencies_follow_sizes():
    data = layouts([600], [300], [100])
    plan = build_plan(DEBIAS, data, 3, 0, 1, 1, 8)
    counts = Counter(plan.source_of_step(g) for g in range(20000))
    for k, p in enumerate([0.6, 0.3, 0.1]):
        assert abs(counts[k] / 20000 - p) < 4 * np.sqrt(p * (1 - p) / 20000)


def test_debias_pieces_rotate_and_cover_each_pass():
    data = layouts([5, 4], [3])
    for roles in (1, 2, 4):
        plan = build_plan(DEBIAS, data, 0, 1, 2, roles, 1)
        for source in (0, 1):
            for pass_index in (0, 1, 2):
                taken = []
                for role in range(roles):
                    taken += positions(plan.piece(source, role, pass_index).parts[0])
                assert sorted(taken) == sorted(rank_slice(plan, source, pass_index))
        # with more roles than samples per rank (dataset 1 has 1 sample per rank), every role still gets it
        for role in range(roles):
            assert any(plan.piece(1, role, p).length for p in range(roles))


def test_too_little_data_is_a_clear_error():
    with pytest.raises(SamplingError, match="lower data.batch_size"):
        build_plan(SHUFFLE, layouts([3]), 0, 0, 2, 1, 2)
    with pytest.raises(SamplingError, match="no dataset holds one batch"):
        build_plan(SEQUENTIAL, layouts([3], [3]), 0, 0, 1, 1, 4)
    with pytest.raises(SamplingError, match="fewer samples than ranks"):
        build_plan(DEBIAS, layouts([30], [1]), 0, 0, 2, 1, 2)
    with pytest.raises(SamplingError, match="train_type"):
        build_plan("random", layouts([30]), 0, 0, 1, 1, 2)


@pytest.mark.parametrize("world_size,roles", [(1, 1), (2, 3), (3, 2), (5, 1)])
def test_validation_parts_tile_the_dataset_once(world_size, roles):
    sizes = [4, 0, 3, 2]
    taken = []
    for rank in range(world_size):
        for role in range(roles):
            taken += positions(validation_part(sizes, rank, world_size, role, roles))
    assert taken == concatenated(range(4), sizes)
