"""Source weights (``data.datasets.<name>.weight``): with every weight 1 the plans and streams are the ones recorded
before weights existed; a weighted mixture takes the requested shares (exactly, to the sample, per shuffle epoch;
within a stated sampling bound for debias draws); an up-weighted source repeats in fresh passes, a down-weighted one
leaves the rest of its pass unread; and a weighted stream resumes exactly, also after SIGKILL."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction

import pytest
import torch
from tests.helpers.data_fixtures import assert_resumes_like_the_reference, make_config, write_dataset
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from tests.helpers.stream_record import LOADER_CASES, PLAN_CASES, RECORD_FILE, loader_record, plan_record

from zvl_ds.config import ConfigError, load_config
from zvl_ds.data import build_train_loader, load_tokenizer
from zvl_ds.data.sampling import DEBIAS, SEQUENTIAL, SHUFFLE, DatasetLayout, SamplingError, build_plan

# The probability that one statistical check below fails a correct sampler (over the seed; the seeds are fixed).
FALSE_FAILURE = 1e-6
MIX = {"big": [12, 12, 12, 12], "mid": [10, 10], "small": [6]}  # 48, 20 and 6 samples
WEIGHTS = {"big": 0.25, "mid": 1.0, "small": 4.0}  # weight x samples: 12, 20, 24


def hoeffding_radius(draws: int, sources: int, false_failure: float = FALSE_FAILURE) -> float:
    """``t`` such that, for ``draws`` samples drawn independently or without replacement from a fixed population,
    P(some source's realised share lies ``t`` or further from its expected share) <= ``false_failure``: Hoeffding's
    inequality (1963; it holds without replacement too), 2 exp(-2 n t^2) per source, with a union bound."""
    return math.sqrt(math.log(2 * sources / false_failure) / (2 * draws))


def requested_shares(sizes, weights):
    """weight x size / total, from exact fractions (a test-side reference, independent of the sampler's code)."""
    weighted = [Fraction(w) * n for w, n in zip(weights, sizes)]
    return [float(w / sum(weighted)) for w in weighted]


def weight_overrides(weights):
    return {f"data.datasets.{name}.weight": weight for name, weight in weights.items()}


def dataset_of(key):
    return key.split("_")[0]


def take(loader, steps):
    iterator = iter(loader)
    return [next(iterator) for _ in range(steps)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(make_config("/unused").model.text_encoder)


@pytest.fixture(scope="module")
def mix_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mix"))
    for name, sizes in MIX.items():
        write_dataset(root, name, "train", sizes)
    return root


# --------------------------------------------------------------------------------------------------
# Weight 1 is the stream as it was
# --------------------------------------------------------------------------------------------------


def test_unweighted_plans_and_streams_are_the_ones_recorded_before_weights(tmp_path):
    with open(RECORD_FILE, encoding="utf-8") as handle:
        recorded = json.load(handle)
    assert [plan_record(*case) for case in PLAN_CASES] == recorded["plans"]
    for index, case in enumerate(LOADER_CASES):
        root = str(tmp_path / str(index))
        assert loader_record(root, *case) == recorded["loaders"][index], case  # no weight key
        ones = {name: 1 for name in case[1]}
        assert loader_record(root, *case, weights=ones) == recorded["loaders"][index], case  # weight: 1 written


@pytest.mark.parametrize("mode,scale", [(SHUFFLE, 3.0), (DEBIAS, 0.5)])
def test_scaling_every_weight_alike_changes_no_bit_of_the_stream(mix_root, tokenizer, mode, scale):
    plain = make_config(mix_root, train=tuple(MIX), batch_size=8, num_workers=2, train_type=mode)
    scaled = make_config(mix_root, train=tuple(MIX), batch_size=8, num_workers=2, train_type=mode,
                         extra=weight_overrides({name: scale for name in MIX}))
    batches = []
    for cfg in (plain, scaled):
        loader = build_train_loader(cfg, 1, 2, tokenizer)
        batches.append(take(loader, 12))
        loader.close()
    for got, want in zip(*batches):
        assert got.step == want.step and got.keys == want.keys and got.dataset == want.dataset
        assert torch.equal(got.images, want.images) and torch.equal(got.input_ids, want.input_ids)


# --------------------------------------------------------------------------------------------------
# The plan: shares and passes
# --------------------------------------------------------------------------------------------------


def piece_reads(piece):
    """(dataset, pass, shard, position) of a piece's samples in reading order (before the buffer shuffle)."""
    streams = [iter([(part.dataset, part.pass_index, segment.shard, position) for segment in part.segments
                     for position in range(segment.start, segment.stop)]) for part in piece.parts]
    if piece.pattern is None:
        return [sample for stream in streams for sample in stream]
    return [next(streams[index]) for index in piece.pattern.tolist()]


def rank_slice(plan, dataset, pass_index):
    """This rank's (shard, position)s of one pass, by direct enumeration of the pass's shard order."""
    sizes = plan.datasets[dataset].sizes
    flat = [(int(shard), p) for shard in plan.shard_order(dataset, pass_index) for p in range(sizes[shard])]
    per_rank = sum(sizes) // plan.world_size
    return flat[plan.rank * per_rank:(plan.rank + 1) * per_rank]


def epoch_chain(plan, dataset, epoch, quota):
    """A dataset's share of an epoch as documented: its rank slices of fresh passes, chained, the first ``quota``."""
    per_rank = plan.datasets[dataset].size // plan.world_size
    passes = max(1, math.ceil(quota / per_rank))
    return [(dataset, p, *sample) for p in range(epoch * passes, (epoch + 1) * passes)
            for sample in rank_slice(plan, dataset, p)][:quota]


@pytest.mark.parametrize("world_size,roles", [(1, 1), (2, 3), (3, 2)])
def test_weighted_shuffle_epochs_take_each_share_from_fresh_passes(world_size, roles):
    layouts = [DatasetLayout("big", (12, 12, 12, 12), 0.25), DatasetLayout("mid", (10, 7), 1.0),
               DatasetLayout("small", (5, 2), 4.0)]
    batch = 3
    per_rank = [d.size // world_size for d in layouts]
    requested = requested_shares(per_rank, [d.weight for d in layouts])
    by_pass = {}
    for rank in range(world_size):
        plan = build_plan(SHUFFLE, layouts, 11, rank, world_size, roles, batch)
        steps = plan.steps_per_epoch
        assert steps == sum(per_rank) // batch  # the same on every rank, whatever the weights
        assert sum(plan.quota) == steps * batch
        assert all(abs(quota - share * steps * batch) < 1 for quota, share in zip(plan.quota, requested))
        assert plan.quota[2] > per_rank[2] and plan.quota[0] < per_rank[0]  # up- and down-weighted
        for epoch in range(3):
            reads = [sample for role in range(roles) for sample in piece_reads(plan.piece(0, role, epoch))]
            assert Counter(sample[0] for sample in reads) == {k: q for k, q in enumerate(plan.quota) if q}
            for k in range(3):
                assert [sample for sample in reads if sample[0] == k] == epoch_chain(plan, k, epoch, plan.quota[k])
            repeated = Counter(sample[2:] for sample in reads if sample[0] == 2)
            assert max(repeated.values()) > 1  # the up-weighted source repeats within the epoch ...
            assert len({sample[1] for sample in reads if sample[0] == 2}) > 1  # ... from passes of its own
            for dataset, pass_index, shard, position in reads:
                by_pass.setdefault((dataset, pass_index), {}).setdefault((shard, position), set()).add(rank)
    # within a pass, ranks never share a sample
    assert all(len(ranks) == 1 for samples in by_pass.values() for ranks in samples.values())


def test_debias_draws_follow_weight_times_size_within_the_hoeffding_bound():
    layouts = [DatasetLayout("web", (600,), 0.5), DatasetLayout("cc", (300,), 1.0), DatasetLayout("coco", (100,), 4.0)]
    requested = requested_shares([600, 300, 100], [0.5, 1.0, 4.0])  # 0.3, 0.3, 0.4
    plans = [build_plan(DEBIAS, layouts, 3, rank, 2, roles, 8) for rank, roles in ((0, 1), (1, 3))]
    assert plans[0].probabilities.tolist() == pytest.approx(requested, abs=1e-15)
    steps = 20000
    draws = [plans[0].source_of_step(g) for g in range(steps)]
    assert draws[:500] == [plans[1].source_of_step(g) for g in range(500)]  # every rank draws the same source
    counts = Counter(draws)
    realised = [counts[k] / steps for k in range(3)]
    radius = hoeffding_radius(steps, 3)  # 0.0198
    assert all(abs(got - want) < radius for got, want in zip(realised, requested)), (realised, requested)
    unweighted = requested_shares([600, 300, 100], [1, 1, 1])
    assert max(abs(got - want) for got, want in zip(realised, unweighted)) > 2 * radius  # weights are not ignored


def test_sequential_mode_and_bad_weights_are_refused():
    with pytest.raises(SamplingError, match="sequential"):
        build_plan(SEQUENTIAL, [DatasetLayout("a", (8,), 2.0), DatasetLayout("b", (8,))], 0, 0, 1, 1, 2)
    base = ["data.train_name=[a,b]", "data.datasets.a.shards=a.tar"]
    with pytest.raises(ConfigError, match=r"data.datasets.a.weight=2.0: weights apply to data.train_type shuffle"):
        load_config(None, base + ["data.train_type=sequential", "data.datasets.a.weight=2"])
    for bad in ("0", "-1", ".nan", ".inf"):
        with pytest.raises(ConfigError, match="data.datasets.a.weight: must be a finite number > 0"):
            load_config(None, base + [f"data.datasets.a.weight={bad}"])
    assert load_config(None, base + ["data.datasets.a.weight=1e-3"]).data.datasets["a"].weight == 0.001


# --------------------------------------------------------------------------------------------------
# The loader: realised shares over a run
# --------------------------------------------------------------------------------------------------


def test_weighted_shuffle_stream_takes_the_requested_share_of_every_epoch(mix_root, tokenizer):
    cfg = make_config(mix_root, train=tuple(MIX), batch_size=8, num_workers=2, extra=weight_overrides(WEIGHTS))
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2, tokenizer)  # per rank: 24, 10 and 3 samples; 9 steps of 4
        steps = loader.steps_per_epoch
        assert steps == 9 and loader.plan.quota == [8, 13, 15]  # requested: 36 x (12, 20, 24) / 56 = 7.7, 12.9, 15.4
        batches = take(loader, 2 * steps)
        loader.close()
        for epoch in range(2):
            epoch_batches = batches[epoch * steps:(epoch + 1) * steps]
            keys = [key for batch in epoch_batches for key in batch.keys]
            assert Counter(dataset_of(key) for key in keys) == {"big": 8, "mid": 13, "small": 15}
            by_source = {name: Counter(key for key in keys if dataset_of(key) == name) for name in MIX}
            assert max(by_source["big"].values()) == 1  # down-weighted: 8 of its 24, none twice
            assert max(by_source["mid"].values()) <= 2  # a pass of 10, then 3 of a fresh pass (a new shard order:
            assert len(by_source["mid"]) >= 10  # maybe of the other rank's slice of the first)
            assert sorted(by_source["small"].values()) == [5, 5, 5]  # its 3 samples, each in 5 passes
            # a repeat is a fresh visit: its own crop (augmentation seeded by the pass), not a copy
            images = {}
            for batch in epoch_batches:
                for key, image in zip(batch.keys, batch.images):
                    images.setdefault(key, []).append(image)
            for key in by_source["small"]:
                assert len({bytes(image.numpy()) for image in images[key]}) > 1


def test_weighted_debias_stream_realises_the_requested_shares(mix_root, tokenizer):
    cfg = make_config(mix_root, train=tuple(MIX), batch_size=2, train_type="debias", extra=weight_overrides(WEIGHTS))
    loader = build_train_loader(cfg, 0, 1, tokenizer)
    steps = 300
    batches = take(loader, steps)
    loader.close()
    for batch in batches:
        assert {dataset_of(key) for key in batch.keys} == {batch.dataset}
    counts = Counter(batch.dataset for batch in batches)
    requested = requested_shares([48, 20, 6], [0.25, 1, 4])  # 0.214, 0.357, 0.429
    realised = [counts[name] / steps for name in MIX]
    radius = hoeffding_radius(steps, 3)  # 0.161
    assert all(abs(got - want) < radius for got, want in zip(realised, requested)), (realised, requested)
    unweighted = requested_shares([48, 20, 6], [1, 1, 1])  # 0.649, 0.270, 0.081
    assert max(abs(got - want) for got, want in zip(realised, unweighted)) > radius


# --------------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,num_workers", [(SHUFFLE, 2), (DEBIAS, 2), (SHUFFLE, 0)])
def test_weighted_stream_resumes_exactly(mix_root, tokenizer, mode, num_workers):
    cfg = make_config(mix_root, train=tuple(MIX), batch_size=8, num_workers=num_workers, train_type=mode,
                      extra=weight_overrides(WEIGHTS))
    loader = build_train_loader(cfg, 1, 2, tokenizer)
    reference = take(loader, 22)  # 2.4 epochs of 9 steps
    loader.close()
    # stops inside an epoch, just after its first step, inside small's repeated passes
    assert_resumes_like_the_reference(cfg, tokenizer, reference, stops=(4, 11, 16))


@pytest.mark.slow  # a fresh interpreter (torch) for the loader to kill
def test_weighted_stream_resumes_exactly_after_sigkill(mix_root, tokenizer, tmp_path):
    """The loader alone in a process of its own (2 workers prefetching), checkpointing its state every 5 steps,
    killed with SIGKILL; a new loader resumes from the last saved state and yields what an unbroken run yields."""
    cfg = make_config(mix_root, train=tuple(MIX), batch_size=8, num_workers=2, extra=weight_overrides(WEIGHTS))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(cfg.to_yaml())
    out = tmp_path / "killed"
    out.mkdir()
    log = tmp_path / "child.log"
    with open(log, "wb") as stderr:
        child = subprocess.Popen([sys.executable, "-m", "tests.helpers.loader_child", str(config_path), str(out), "1",
                                  "2", "5"], env=child_env(), cwd=REPO_ROOT, start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 120
    try:
        while True:  # until a checkpoint at step 10 or later, and the run two steps past it
            assert child.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint at step 10 within 120 s"
            saved = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {"step": 0}
            lines = (out / "keys.txt").read_text().splitlines() if (out / "keys.txt").exists() else []
            if saved["step"] >= 10 and len(lines) >= saved["step"] + 2:
                break
            time.sleep(0.02)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the loader and its DataLoader workers
        child.wait(timeout=60)
    state = json.loads((out / "state.json").read_text())
    killed_keys = [line.split()[1:] for line in (out / "keys.txt").read_text().splitlines() if line.strip()]

    loader = build_train_loader(cfg, 1, 2, tokenizer)
    reference = take(loader, state["step"] + 12)
    loader.close()
    assert killed_keys[:state["step"]] == [batch.keys for batch in reference[:state["step"]]]
    resumed = build_train_loader(cfg, 1, 2, tokenizer)
    resumed.load_state_dict(state)
    rest = take(resumed, 12)
    resumed.close()
    for got, want in zip(rest, reference[state["step"]:]):
        assert got.step == want.step and got.keys == want.keys
        assert torch.equal(got.images, want.images) and torch.equal(got.input_ids, want.input_ids)


def test_a_state_saved_under_other_weights_is_refused(mix_root, tokenizer):
    weighted = make_config(mix_root, train=tuple(MIX), batch_size=8, extra=weight_overrides(WEIGHTS))
    plain = make_config(mix_root, train=tuple(MIX), batch_size=8)
    states = {}
    for name, cfg in (("weighted", weighted), ("plain", plain)):
        loader = build_train_loader(cfg, 0, 2, tokenizer)
        take(loader, 2)
        states[name] = json.loads(json.dumps(loader.state_dict()))
        loader.close()
    assert "weights" not in states["plain"]["fingerprint"]  # an unweighted state is as before weights existed
    for saved, cfg in (("weighted", plain), ("plain", weighted)):
        with pytest.raises(ValueError, match="weights: saved"):
            build_train_loader(cfg, 0, 2, tokenizer).load_state_dict(states[saved])
