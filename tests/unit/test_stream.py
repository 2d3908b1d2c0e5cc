"""Training and validation loaders on real tar shards, with real DataLoader workers and simulated ranks."""
import json
import logging
import os
import pickle
import tarfile
from collections import Counter

import pytest
import torch
from tests.helpers.data_fixtures import (assert_resumes_like_the_reference, make_config, sample_members,
                                         write_dataset, write_img2dataset, write_tar)

from zvl_ds.config import DatasetSource
from zvl_ds.data import (DataSourceError, TrainBatch, ValidBatch, build_train_loader, build_valid_loader,
                         load_tokenizer, tokenize)
from zvl_ds.data.sampling import debias_draw
from zvl_ds.data.transforms import ImageTransform


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(make_config("/unused").model.text_encoder)


def take(loader, steps):
    iterator = iter(loader)
    return [next(iterator) for _ in range(steps)]


def dataset_of(key):
    return key.split("_")[0]


def caption_tokens(tokenizer, texts):
    return [tuple(row) for row in tokenize(tokenizer, texts, 12)[0].tolist()]


# --------------------------------------------------------------------------------------------------
# Shapes, rank fairness, epochs
# --------------------------------------------------------------------------------------------------


def test_batches_have_the_documented_fields(tmp_path, tokenizer):
    root = str(tmp_path)
    write_dataset(root, "flat", "train", [8, 8])
    loader = build_train_loader(make_config(root, batch_size=4), 0, 2, tokenizer)  # per-rank batch 2
    assert loader.steps_per_epoch == 4
    batches = take(loader, 5)
    for step, batch in enumerate(batches):
        assert isinstance(batch, TrainBatch) and batch.step == step and batch.dataset == "mixed"
        assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (2, 3, 16, 16)
        assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
        assert tuple(batch.input_ids.shape) == tuple(batch.attention_mask.shape) == (2, 12)
        assert len(batch.keys) == 2
    json.dumps(loader.state_dict())  # plain values only
    loader.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_equal_batches_per_rank_with_fewer_shards_than_ranks_x_workers(tmp_path, tokenizer, num_workers):
    root = str(tmp_path)
    keys = write_dataset(root, "flat", "train", [10, 9])  # 2 shards < 3 ranks x 2 workers; 19 = 3 * 6 + 1
    cfg = make_config(root, batch_size=6, num_workers=num_workers)  # per-rank batch 2
    epochs = []
    for rank in range(3):
        loader = build_train_loader(cfg, rank, 3, tokenizer)
        assert loader.steps_per_epoch == 3
        batches = take(loader, 6)  # two epochs
        loader.close()
        assert [b.step for b in batches] == list(range(6)) and all(len(b.keys) == 2 for b in batches)
        epochs.append([[k for b in batches[e * 3:(e + 1) * 3] for k in b.keys] for e in range(2)])
    for epoch in range(2):
        seen = [k for rank in range(3) for k in epochs[rank][epoch]]
        assert len(seen) == len(set(seen)) == 18  # nothing repeated within an epoch
        assert set(seen) <= set(keys)  # one sample sits out (19 does not split over 3 ranks)
    assert epochs[0][0] != epochs[0][1]  # the next epoch is reshuffled


def test_shuffle_mixes_datasets_in_proportion(tmp_path, tokenizer):
    root = str(tmp_path)
    big = write_dataset(root, "big", "train", [12, 12, 12])
    small = write_dataset(root, "small", "train", [12])
    cfg = make_config(root, train=("big", "small"), batch_size=8, num_workers=2)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2, tokenizer)  # per rank: 18 + 6 samples, 6 steps of 4
        assert loader.steps_per_epoch == 6 and loader.plan.quota == [18, 6]
        batches = take(loader, 6)
        loader.close()
        assert all(b.dataset == "mixed" for b in batches)
        counts = Counter(dataset_of(k) for b in batches for k in b.keys)
        assert counts == {"big": 18, "small": 6}
        assert sum(1 for b in batches if len({dataset_of(k) for k in b.keys}) == 2) >= 2  # batches are mixed
        seen += [k for b in batches for k in b.keys]
    assert sorted(seen) == sorted(big + small)


def test_sequential_runs_one_dataset_after_the_other(tmp_path, tokenizer):
    root = str(tmp_path)
    write_dataset(root, "aa", "train", [9, 9])
    write_dataset(root, "bb", "train", [8])
    cfg = make_config(root, train=("aa", "bb"), batch_size=4, num_workers=2, train_type="sequential")
    loader = build_train_loader(cfg, 1, 2, tokenizer)  # per rank: aa 9 -> 4 steps of 2, bb 4 -> 2 steps
    assert loader.steps_per_epoch == 6
    batches = take(loader, 12)
    loader.close()
    assert [b.dataset for b in batches] == (["aa"] * 4 + ["bb"] * 2) * 2
    for batch in batches:
        assert {dataset_of(k) for k in batch.keys} == {batch.dataset}
    for epoch in range(2):
        keys = [k for b in batches[6 * epoch:6 * epoch + 6] for k in b.keys]
        assert len(set(keys)) == 12


def test_debias_draws_one_dataset_per_step_identically_on_all_ranks(tmp_path, tokenizer):
    root = str(tmp_path)
    write_dataset(root, "aa", "train", [20, 20, 20])
    write_dataset(root, "bb", "train", [10, 10])
    cfg = make_config(root, train=("aa", "bb"), batch_size=6, train_type="debias")
    per_rank = []
    for rank, workers in ((0, 2), (1, 0), (2, 1)):
        cfg.data.num_workers = workers
        loader = build_train_loader(cfg, rank, 3, tokenizer)
        per_rank.append(take(loader, 16))
        loader.close()
    cumulative = torch.tensor([60 / 80, 1.0]).numpy()
    expected = [["aa", "bb"][debias_draw(cfg.seed, g, cumulative)] for g in range(16)]
    assert {"aa", "bb"} == set(expected)
    for batches in per_rank:
        assert [b.dataset for b in batches] == expected
        for batch in batches:
            assert {dataset_of(k) for k in batch.keys} == {batch.dataset}  # single-source batches
    # ranks read disjoint samples of a dataset within a pass
    first_aa = [set(k for b in batches[:4] if b.dataset == "aa" for k in b.keys) for batches in per_rank]
    assert not (first_aa[0] & first_aa[1]) and not (first_aa[1] & first_aa[2])


# --------------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,num_workers,augment", [("shuffle", 2, True), ("debias", 2, False),
                                                      ("sequential", 0, False), ("shuffle", 0, True)])
def test_resume_continues_exactly(tmp_path, tokenizer, mode, num_workers, augment):
    root = str(tmp_path)
    write_dataset(root, "aa", "train", [7, 6, 9])
    write_dataset(root, "bb", "train", [11])
    extra = {"transforms.train_transforms": ["random_resize_crop", "autoaug"],
             "transforms.caption_aug.enable": True} if augment else {}
    cfg = make_config(root, train=("aa", "bb"), batch_size=8, num_workers=num_workers, train_type=mode,
                      extra=extra)
    loader = build_train_loader(cfg, 1, 2, tokenizer)
    reference = take(loader, 11)  # crosses epoch boundaries (steps_per_epoch 4 or 3)
    loader.close()
    assert_resumes_like_the_reference(cfg, tokenizer, reference, stops=(3, 6))


def test_resume_skips_consumed_samples_without_decoding(tmp_path, tokenizer, monkeypatch):
    root = str(tmp_path)
    write_dataset(root, "flat", "train", [40])
    cfg = make_config(root, batch_size=4)
    first = build_train_loader(cfg, 0, 1, tokenizer)
    take(first, 7)
    state = first.state_dict()
    calls = []
    original = ImageTransform.__call__
    def counting(self, data, rng):
        calls.append(1)
        return original(self, data, rng)

    monkeypatch.setattr(ImageTransform, "__call__", counting)
    resumed = build_train_loader(cfg, 0, 1, tokenizer)
    resumed.load_state_dict(state)
    batch = take(resumed, 1)[0]
    assert batch.step == 7 and len(calls) == 4  # only the 4 samples of the new batch were decoded


@pytest.mark.slow  # it waits out a loader_timeout of seconds: about 13 s
def test_a_stalled_shard_ends_the_loader_after_loader_timeout_naming_the_shards(tmp_path, tokenizer):
    import time

    from zvl_ds.data.train_stream import LoaderTimeout

    root = str(tmp_path)
    write_dataset(root, "flat", "train", [4, 4])
    stalled = os.path.join(root, "flat", "train-000001.tar")
    os.remove(stalled)
    os.mkfifo(stalled)  # opening a pipe with no writer blocks forever: a shard on a hung filesystem
    import threading

    loader = build_train_loader(make_config(root, batch_size=4, num_workers=1, loader_timeout=3), 0, 1, tokenizer)
    outcome = []

    def read():
        try:
            take(loader, 2)
            outcome.append(None)
        except Exception as error:  # noqa: BLE001 (the test inspects whichever error ends the loader)
            outcome.append(error)

    start = time.monotonic()
    reader_thread = threading.Thread(target=read, daemon=True)  # the test's own wait is bounded even if the loader's is not
    reader_thread.start()
    reader_thread.join(45)
    assert outcome, "the loader still waits on the stalled shard 45 s later: data.loader_timeout had no effect"
    loader.close()
    # the stuck worker ignores SIGTERM (preemption is the rank's to handle): closing must end it all the same,
    # or this process would wait for it forever at exit
    import multiprocessing

    assert not [child for child in multiprocessing.active_children() if child.is_alive()]
    assert time.monotonic() - start < 3 + 30
    assert isinstance(outcome[0], LoaderTimeout), repr(outcome[0])
    message = str(outcome[0])
    assert "data.loader_timeout" in message and "within 3 s" in message and stalled in message, message


def test_state_from_other_settings_is_refused(tmp_path, tokenizer):
    root = str(tmp_path)
    write_dataset(root, "flat", "train", [16])
    loader = build_train_loader(make_config(root, batch_size=4), 0, 1, tokenizer)
    take(loader, 2)
    state = loader.state_dict()
    other = build_train_loader(make_config(root, batch_size=4, num_workers=2), 0, 1, tokenizer)
    with pytest.raises(ValueError, match="roles: saved 1, now 2"):
        other.load_state_dict(state)


def test_autoaug_leaves_the_callers_torch_rng_alone(tmp_path, tokenizer):
    root = str(tmp_path)
    write_dataset(root, "flat", "train", [8])
    cfg = make_config(root, batch_size=4, extra={"transforms.train_transforms": ["random_resize_crop", "autoaug"]})
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    take(build_train_loader(cfg, 0, 1, tokenizer), 2)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------------------------------
# Other shard sources
# --------------------------------------------------------------------------------------------------


def test_img2dataset_shards_and_captions(tmp_path, tokenizer):
    folder = str(tmp_path / "web")
    keys = write_img2dataset(folder, [5, 3], ext="webp") + write_img2dataset(str(tmp_path / "png"), [4], "png")
    cfg = make_config(str(tmp_path), train=("web", "png"), batch_size=4, num_workers=2, valid=("png",))
    cfg.data.datasets = {"web": DatasetSource(shards="web"), "png": DatasetSource(shards=str(tmp_path / "png"))}
    loader = build_train_loader(cfg, 0, 1, tokenizer)
    assert loader.steps_per_epoch == 3
    batches = take(loader, 3)
    seen = [k for b in batches for k in b.keys]
    assert sorted(seen) == sorted(keys)
    for batch in batches:
        assert batch.input_ids.tolist() == tokenize(tokenizer, [f"web caption {k}" for k in batch.keys], 12)[0].tolist()
    valid = list(build_valid_loader(cfg, "png", 0, 1, tokenizer))
    # no image_id in the json: the position in the dataset; one caption, whose id is the image id
    assert sorted(i for b in valid for i in b.image_ids.tolist()) == [0, 1, 2, 3]
    assert all(b.caption_ids.tolist() == b.image_ids.tolist() for b in valid)


def test_pipe_urls_are_streamed(tmp_path, tokenizer):
    root = str(tmp_path)
    keys = write_dataset(root, "flat", "train", [6, 6])
    tars = [os.path.join(root, "flat", f"train-{i:06d}.tar") for i in range(2)]
    cfg = make_config(root, batch_size=4)
    cfg.data.datasets = {"flat": DatasetSource(shards="::".join(f"pipe:cat {t}" for t in tars), size=12)}
    batches = take(build_train_loader(cfg, 0, 1, tokenizer), 3)
    assert sorted(k for b in batches for k in b.keys) == sorted(keys)
    cfg.data.datasets["flat"].shards = f"pipe:cat {tars[0]}::pipe:cat {root}/nothing.tar"
    loader = build_train_loader(cfg, 0, 1, tokenizer)
    batches = take(loader, 3)
    assert {k for b in batches for k in b.keys} == set(keys[:6])
    assert loader.error_counts()["unreadable_shard"] >= 6


def test_unresolvable_training_data_is_a_clear_error(tmp_path, tokenizer):
    root = str(tmp_path)
    write_dataset(root, "flat", "train", [4])
    cfg = make_config(root, train=("flat", "ghost"))
    with pytest.raises(DataSourceError, match="dataset 'ghost'"):
        build_train_loader(cfg, 0, 1, tokenizer)
    cfg = make_config(root)
    cfg.data.datasets = {"flat": DatasetSource(shards=os.path.join(root, "flat", "nope-{0..3}.tar"))}
    with pytest.raises(DataSourceError, match=r"nope-\{0\.\.3\}\.tar.*matches nothing"):
        build_train_loader(cfg, 0, 1, tokenizer)
    os.remove(os.path.join(root, "flat", "sizes.json"))
    with pytest.raises(DataSourceError, match="needs its size"):
        build_train_loader(make_config(root), 0, 1, tokenizer)


# --------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_faulty_dataset(root, name, split, trap_path):
    """Good samples plus one of each fault; returns (good keys, bad keys, expected counts)."""
    folder = os.path.join(root, name)
    os.makedirs(folder)
    good, sizes = [], {}

    def sample(key, image_id, **overrides):
        members = dict(sample_members(key, image_id, [f"cap {image_id}"], [image_id], name, split, image_id))
        members = {n: d for n, d in members.items() if overrides.get(n.split(".")[1], True) is not None}
        for ext, data in overrides.items():
            if data is not None:
                members[f"{key}.{ext}"] = data
        return list(members.items())

    members = []
    for i in range(6):
        key = f"{name}_{i:04d}"
        extra = {"pyd": pickle.dumps(_Trap(trap_path))} if i == 0 else {}
        members += sample(key, i, **extra)
        good.append(key)
    members += sample(f"{name}_corrupt", 100, jpg=b"\xff\xd8 not a jpeg at all")
    members += sample(f"{name}_nocaption", 101, txt=None, json=json.dumps({"image_id": 101}).encode())
    members += sample(f"{name}_badjson", 102, json=b"{not json")
    members += sample(f"{name}_noimage", 103, jpg=None)
    write_tar(os.path.join(folder, f"{split}-000000.tar"), members)
    sizes[f"{split}-000000.tar"] = 10
    # a tar cut inside its third sample's image: samples 0 and 1 survive
    truncated = []
    for i in range(4):
        truncated += sample(f"{name}_t{i}", 200 + i)
    path = os.path.join(folder, f"{split}-000001.tar")
    write_tar(path, truncated)
    with tarfile.open(path) as archive:
        cut = next(m for m in archive.getmembers() if m.name == f"{name}_t2.jpg").offset_data + 10
    with open(path, "r+b") as handle:
        handle.truncate(cut)
    good += [f"{name}_t0", f"{name}_t1"]
    sizes[f"{split}-000001.tar"] = 4
    with open(os.path.join(folder, f"{split}-000002.tar"), "wb") as handle:
        handle.write(os.urandom(3000))  # not a tar
    sizes[f"{split}-000002.tar"] = 3
    sizes[f"{split}-000003.tar"] = 2  # listed, but the file is gone
    with open(os.path.join(folder, "sizes.json"), "w") as handle:
        json.dump(sizes, handle)
    expected = {"corrupt_image": 1, "missing_caption": 1, "bad_json": 1, "missing_image": 1, "truncated_shard": 2,
                "unreadable_shard": 5}
    return good, expected


def test_faults_are_skipped_and_counted_in_training(tmp_path, tokenizer):
    root = str(tmp_path)
    trap = str(tmp_path / "unpickled")
    good, expected = write_faulty_dataset(root, "bad", "train", trap)
    cfg = make_config(root, train=("bad",), batch_size=2, num_workers=2,
                      extra={"data.train_splits": ["train"]})
    # the missing shard is named by the split pattern only if it exists; name all four explicitly
    cfg.data.datasets = {"bad": DatasetSource(shards=os.path.join(root, "bad", "train-{000000..000003}.tar"))}
    loader = build_train_loader(cfg, 0, 1, tokenizer)
    assert loader.steps_per_epoch == 9  # planned from sizes.json: 19 samples
    batches = take(loader, 12)
    assert all(len(b.keys) == 2 and b.images.shape[0] == 2 for b in batches)  # every batch full
    seen = [k for b in batches for k in b.keys]
    assert set(seen) == set(good)  # only good samples, all of them
    counts = loader.error_counts()
    assert set(counts) == set(expected) and all(counts[r] >= n for r, n in expected.items())
    loader.close()
    assert not os.path.exists(trap)


@pytest.mark.parametrize("world_size", [1, 2])
def test_faults_are_counted_exactly_in_validation(tmp_path, tokenizer, world_size):
    root = str(tmp_path)
    good, expected = write_faulty_dataset(root, "bad", "valid", str(tmp_path / "unpickled"))
    cfg = make_config(root, valid=("bad",), batch_size=4, num_workers=2)
    cfg.data.datasets = {"bad": DatasetSource(shards=os.path.join(root, "bad", "valid-{000000..000003}.tar"))}
    totals, keys = Counter(), []
    for rank in range(world_size):
        loader = build_valid_loader(cfg, "bad", rank, world_size, tokenizer)
        keys += [k for b in loader for k in b.keys]
        totals.update(loader.error_counts())
    assert sorted(keys) == sorted(good)
    assert dict(totals) == expected
    assert not os.path.exists(tmp_path / "unpickled")


def test_fault_warnings_are_rate_limited(tmp_path, tokenizer, caplog):
    root = str(tmp_path)
    folder = os.path.join(root, "flat")
    os.makedirs(folder)
    members = []
    for i in range(12):
        members += sample_members(f"k{i:03d}", i, [f"c {i}"], [i], "flat", "train", i)
        if i % 2:
            members[-3] = (f"k{i:03d}.jpg", b"garbage")
    write_tar(os.path.join(folder, "train-000000.tar"), members)
    json.dump({"train-000000.tar": 12}, open(os.path.join(folder, "sizes.json"), "w"))
    cfg = make_config(root, batch_size=2, max_bad_sample_warnings=2)
    with caplog.at_level(logging.WARNING, logger="zvl_ds.data"):
        loader = build_train_loader(cfg, 0, 1, tokenizer)
        take(loader, 4)  # 8 good samples: the whole first epoch (6 good, 6 corrupt) and some of the next
    assert set(loader.error_counts()) == {"corrupt_image"} and loader.error_counts()["corrupt_image"] >= 6
    messages = [r.getMessage() for r in caplog.records if "corrupt_image" in r.getMessage()]
    assert len(messages) == 3 and "not shown" in messages[-1]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers,known_sizes", [(0, True), (2, True), (2, False)])
def test_validation_sees_every_sample_exactly_once(tmp_path, tokenizer, world_size, num_workers, known_sizes):
    root = str(tmp_path)
    keys = write_dataset(root, "val", "valid", [5, 2], captions_per_image=3, id_offset=1000)
    if not known_sizes:
        os.remove(os.path.join(root, "val", "sizes.json"))
    cfg = make_config(root, batch_size=6, num_workers=num_workers)
    ids, seen_keys, batch_counts = [], [], []
    for rank in range(world_size):
        batches = list(build_valid_loader(cfg, "val", rank, world_size, tokenizer))
        batch_counts.append(len(batches))
        for batch in batches:
            assert isinstance(batch, ValidBatch)
            n = len(batch.keys)
            assert 1 <= n <= 6 // world_size
            assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (n, 3, 16, 16)
            assert batch.input_ids.shape == batch.attention_mask.shape == (3 * n, 12)
            assert batch.caption_image_ids.tolist() == [i for i in batch.image_ids.tolist() for _ in range(3)]
            assert batch.caption_ids.tolist() == [i * 10 + j for i in batch.image_ids.tolist() for j in range(3)]
            texts = [f"val {i} caption {j}" for i in batch.image_ids.tolist() for j in range(3)]
            assert batch.input_ids.tolist() == tokenize(tokenizer, texts, 12)[0].tolist()
            ids += batch.image_ids.tolist()
            seen_keys += batch.keys
    assert sorted(ids) == list(range(1000, 1007))
    assert sorted(seen_keys) == sorted(keys)
    if world_size == 3 and num_workers == 0:
        assert batch_counts == [1, 1, 2]  # 2, 2, 3 images at 2 per batch


@pytest.mark.parametrize("streamed", [False, True])
def test_truncated_shard_keeps_its_complete_samples(tmp_path, streamed):
    from zvl_ds.data.failures import FailureCounter
    from zvl_ds.data.reader import read_segment

    keys = write_dataset(str(tmp_path), "flat", "train", [6])
    path = os.path.join(str(tmp_path), "flat", "train-000000.tar")
    with tarfile.open(path) as archive:
        cut = archive.getmember(f"{keys[3]}.jpg").offset_data + 5  # inside the fourth sample's image
    os.truncate(path, cut)
    spec = f"pipe:cat {path}" if streamed else path
    faults = FailureCounter()
    assert [raw.key for raw in read_segment(spec, 0, 0, 6, faults)] == keys[:3]
    assert faults.counts == {"truncated_shard": 3}
    faults = FailureCounter()
    assert [raw.key for raw in read_segment(spec, 0, 1, 3, faults)] == keys[1:3]  # ends before the cut
    assert faults.counts == {}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_rank_without_samples_yields_nothing(tmp_path, tokenizer, num_workers):
    root = str(tmp_path)
    write_dataset(root, "val", "valid", [1, 1])  # 2 samples, 3 ranks
    cfg = make_config(root, batch_size=6, num_workers=num_workers)
    per_rank = [[i for b in build_valid_loader(cfg, "val", r, 3, tokenizer) for i in b.image_ids.tolist()]
                for r in range(3)]
    assert per_rank == [[], [0], [1]]


# --------------------------------------------------------------------------------------------------
# Crafted samples: deep json, ids beyond int64, a decompression bomb, a format no shard writer produces
# --------------------------------------------------------------------------------------------------


def png_bomb(width=9800, height=9700):
    """A valid grey PNG of 95 megapixels in ~100 KB: over the shard writer's pixel limit, under twice it (where
    Pillow's own DecompressionBombError starts; below it Pillow only warns and decodes)."""
    import struct
    import zlib as z

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", z.crc32(kind + data) & 0xFFFFFFFF)

    rows = z.compress(bytes((width + 1) * height), 9)  # filter byte 0 + zero pixels, every row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def write_crafted_dataset(root, name, split):
    """Four good samples and one of each crafted fault in one shard; returns (good keys, bad key -> reason for
    validation, for training)."""
    import io

    from PIL import Image

    folder = os.path.join(root, name)
    os.makedirs(folder)
    members, good = [], []
    for i in range(4):
        key = f"{name}_{i:04d}"
        members += sample_members(key, i, [f"cap {i}"], [i], name, split, i)
        good.append(key)
    gif = io.BytesIO()
    Image.new("RGB", (40, 32), (200, 10, 10)).save(gif, format="GIF")
    crafted = {"deepjson": ("json", b"[" * 200_000 + b"]" * 200_000),
               "hugeid": ("json", json.dumps({"image_id": 2**64, "captions": ["cap"]}).encode()),
               "bomb": ("jpg", png_bomb()),
               "gif": ("jpg", gif.getvalue())}
    for suffix, (ext, data) in crafted.items():
        key = f"{name}_{suffix}"
        sample = dict(sample_members(key, 50, ["cap"], [50], name, split, 50))
        sample[f"{key}.{ext}"] = data
        members += list(sample.items())
    write_tar(os.path.join(folder, f"{split}-000000.tar"), members)
    with open(os.path.join(folder, "sizes.json"), "w") as handle:
        json.dump({f"{split}-000000.tar": len(good) + len(crafted)}, handle)
    valid = {"deepjson": "bad_json", "hugeid": "bad_json", "bomb": "too_many_pixels", "gif": "corrupt_image"}
    train = {k: v for k, v in valid.items() if k != "hugeid"}  # training reads no ids
    return good, valid, train


def _skipped(caplog):
    """(reason, message) of every skip warning."""
    return [(r.args[1], r.args[2]) for r in caplog.records if r.getMessage().startswith("data: skipped")]


def test_crafted_samples_are_skipped_and_counted_by_name_in_validation(tmp_path, tokenizer, caplog):
    good, reasons, _ = write_crafted_dataset(str(tmp_path), "odd", "valid")
    cfg = make_config(str(tmp_path), valid=("odd",), batch_size=4, num_workers=0)
    loader = build_valid_loader(cfg, "odd", 0, 1, tokenizer)
    with caplog.at_level(logging.WARNING, logger="zvl_ds.data"):
        batches = list(loader)
    assert sorted(k for b in batches for k in b.keys) == good
    assert loader.error_counts() == dict(Counter(reasons.values()))
    shard = os.path.join(str(tmp_path), "odd", "valid-000000.tar")
    for suffix, reason in reasons.items():
        assert any(r == reason and m.startswith(f"{shard} sample 'odd_{suffix}'") for r, m in _skipped(caplog))


def test_crafted_samples_are_skipped_and_counted_in_training(tmp_path, tokenizer, caplog):
    good, _, reasons = write_crafted_dataset(str(tmp_path), "odd", "train")
    cfg = make_config(str(tmp_path), train=("odd",), batch_size=2, num_workers=0,
                      extra={"data.train_splits": ["train"]})
    loader = build_train_loader(cfg, 0, 1, tokenizer)
    with caplog.at_level(logging.WARNING, logger="zvl_ds.data"):
        batches = take(loader, 2)
    loader.close()
    assert sorted(k for b in batches for k in b.keys) == good
    assert loader.error_counts() == dict(Counter(reasons.values()))
    shard = os.path.join(str(tmp_path), "odd", "train-000000.tar")
    for suffix, reason in reasons.items():
        assert any(r == reason and m.startswith(f"{shard} sample 'odd_{suffix}'") for r, m in _skipped(caplog))


@pytest.mark.parametrize("first", ["with_ids", "without_ids"])
def test_validation_refuses_a_mix_of_real_and_position_ids(tmp_path, tokenizer, first):
    """Position 1 of the dataset would get id 1 from the fallback, the id a real sample carries: refused."""
    from tests.helpers.data_fixtures import image_bytes

    members = {"with_ids": [], "without_ids": []}
    for i in range(2):
        members["with_ids"] += sample_members(f"real_{i}", i, [f"real {i}"], [i], "mix", "valid", i)
        members["without_ids"] += [(f"bare_{i}.jpg", image_bytes(10 + i)), (f"bare_{i}.txt", f"bare {i}".encode())]
    order = [first, "with_ids" if first == "without_ids" else "without_ids"]
    folder = tmp_path / "mix"
    folder.mkdir()
    write_tar(str(folder / "valid-000000.tar"), members[order[0]] + members[order[1]])
    cfg = make_config(str(tmp_path), valid=("mix",), batch_size=4, num_workers=0)
    with pytest.raises(DataSourceError, match=r"validation dataset 'mix' mixes samples with and without a json "
                                              r"'image_id' \(.*valid-000000\.tar sample '(bare|real)_0'"):
        list(build_valid_loader(cfg, "mix", 0, 1, tokenizer))
    for kind in members:  # either kind alone is fine
        alone = tmp_path / kind / "mix"
        alone.mkdir(parents=True)
        write_tar(str(alone / "valid-000000.tar"), members[kind])
        cfg = make_config(str(tmp_path / kind), valid=("mix",), batch_size=4, num_workers=0)
        ids = sorted(i for b in build_valid_loader(cfg, "mix", 0, 1, tokenizer) for i in b.image_ids.tolist())
        assert ids == [0, 1]


# --------------------------------------------------------------------------------------------------
# Caption preparation (transforms.caption_train / caption_eval)
# --------------------------------------------------------------------------------------------------

# raw caption -> what training (clean, max_words 4, prompt) and evaluation (clean only) must read, by hand
RAW_CAPTIONS = ["A Dog!! (Running) on: the BEACH.", "Two   CATS; sleeping ~ together*", "#Red car parked \"here\"."]
TRAIN_READS = ["a picture of a dog running on", "a picture of two cats sleeping together",
               "a picture of red car parked here"]
EVAL_READS = ["a dog running on the beach", "two cats sleeping together", "red car parked here"]


def write_raw_caption_shard(root, name, split):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    members = []
    for index, caption in enumerate(RAW_CAPTIONS):
        members += sample_members(f"{name}_{index}", index, [caption, caption.upper()], [index * 10, index * 10 + 1],
                                  name, split, seed=index)
    write_tar(os.path.join(folder, f"{split}-000000.tar"), members)
    with open(os.path.join(folder, "sizes.json"), "w") as handle:
        json.dump({f"{split}-000000.tar": len(RAW_CAPTIONS)}, handle)


def test_training_captions_are_prepared_in_the_stream(tmp_path, tokenizer):
    write_raw_caption_shard(str(tmp_path), "raw", "train")
    caption_train = {"clean": True, "max_words": 4, "prompt": "a picture of "}
    cfg = make_config(str(tmp_path), train=("raw",), batch_size=3, num_workers=1,
                      extra={"transforms.caption_train": caption_train})
    (batch,) = take(build_train_loader(cfg, 0, 1, tokenizer), 1)
    expected = {f"raw_{i}": text for i, text in enumerate(TRAIN_READS)}
    assert batch.input_ids.tolist() == tokenize(tokenizer, [expected[k] for k in batch.keys], 12)[0].tolist()
    # and the captions as written would have read differently (so the check above can fail)
    written = tokenize(tokenizer, [RAW_CAPTIONS[int(k.split("_")[1])] for k in batch.keys], 12)[0].tolist()
    assert batch.input_ids.tolist() != written


def test_validation_captions_are_prepared_in_the_stream(tmp_path, tokenizer):
    write_raw_caption_shard(str(tmp_path), "raw", "valid")
    cfg = make_config(str(tmp_path), valid=("raw",), batch_size=4,
                      extra={"transforms.caption_eval": {"clean": True}})
    batches = list(build_valid_loader(cfg, "raw", 0, 1, tokenizer))
    read = [(cid, row) for b in batches for cid, row in zip(b.caption_ids.tolist(), b.input_ids.tolist())]
    # both captions of an image (as written and upper-cased) clean to the same text
    expected = {i * 10 + j: tokenize(tokenizer, [EVAL_READS[i]], 12)[0][0].tolist()
                for i in range(len(RAW_CAPTIONS)) for j in range(2)}
    assert sorted(cid for cid, _ in read) == sorted(expected)
    for cid, row in read:
        assert row == expected[cid], cid
    plain = make_config(str(tmp_path), valid=("raw",), batch_size=4)
    unchanged = [row for b in build_valid_loader(plain, "raw", 0, 1, tokenizer) for row in b.input_ids.tolist()]
    assert unchanged != [row for _, row in read]  # off by default: the captions as written
