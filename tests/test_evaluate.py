"""Retrieval metrics against hand-computed cases and an argsort reference, the retrieval-examples grid, and
distributed evaluation over 1, 2 and 3 real processes."""
import numpy as np
import pytest
import torch

from zvl_ds.evaluate import render_retrieval_grid, retrieval_metrics, top_captions

T = torch.tensor

# A hand-checked case with ties and several captions per image (2-d, exact arithmetic).
#   images  I0(id 10)=[1,0]  I1(id 20)=[0,1]  I2(id 30)=[1,1]
#   captions c0->10 [1,0]  c1->10 [0,1]  c2->20 [1,0]  c3->30 [.5,.5]  c4->20 [0,.5]
IMAGES = T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
IMAGE_IDS = T([10, 20, 30])
TEXTS = T([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.0, 0.5]])
TEXT_IMAGE_IDS = T([10, 10, 20, 30, 20])
# I2T (best caption; ties with wrong captions count against the query):
#   I0 scores c0..c4 = 1,0,1,.5,0 ; best positive c0=1 ; wrong c2=1 ties      -> rank 2
#   I1 scores        = 0,1,0,.5,.5; best positive c4=.5; wrong c1=1, c3=.5    -> rank 3
#   I2 scores        = 1,1,1,1,.5 ; positive c3=1      ; wrong c0,c1,c2 tie   -> rank 4
I2T_RANKS = [2, 3, 4]
# T2I: c0 true I0=1, I2=1 ties -> 2 ; c1 true I0=0, all >= 0 -> 3 ; c2 true I1=0, all >= 0 -> 3 ;
#      c3 true I2=1, others .5 -> 1 ; c4 true I1=.5, I2=.5 ties -> 2
T2I_RANKS = [2, 3, 3, 1, 2]


def _expected(i2t, t2i, num_images, without_captions=0):
    out = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        ranks = np.array(ranks, dtype=float)
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks <= k))
        out[f"{prefix}_mean_rank"] = float(ranks.mean())
        out[f"{prefix}_median_rank"] = float(np.median(ranks))
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    out["num_images"] = float(num_images)
    out["num_texts"] = float(len(t2i))
    out["num_images_without_captions"] = float(without_captions)
    return out


def _assert_metrics(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_hand_computed_ties_and_several_captions():
    got = retrieval_metrics(IMAGES, IMAGE_IDS, TEXTS, TEXT_IMAGE_IDS)
    _assert_metrics(got, _expected(I2T_RANKS, T2I_RANKS, 3))
    assert got["i2t_r1"] == 0.0 and got["t2i_r1"] == 20.0 and got["rsum"] == 420.0
    assert got["t2i_mean_rank"] == pytest.approx(2.2)


def test_image_without_captions_is_a_distractor_not_a_query():
    # I3 (id 40) = [2,0] has no caption: I2T still has 3 queries; in T2I it outranks or ties where its score
    # is >= the true one: c0 (2>=1) -> 3, c1 (0>=0) -> 4, c2 (2>=0) -> 4, c3 (1>=1) -> 2, c4 (0<.5) -> 2
    images = torch.cat([IMAGES, T([[2.0, 0.0]])])
    got = retrieval_metrics(images, T([10, 20, 30, 40]), TEXTS, TEXT_IMAGE_IDS)
    _assert_metrics(got, _expected(I2T_RANKS, [3, 4, 4, 2, 2], 4, without_captions=1))


def test_duplicate_image_rows_keep_the_first_occurrence_and_order_does_not_matter():
    # id 20 appears three times (a padded sampler would do that); later copies are ignored even if they differ
    images = torch.cat([IMAGES[[2]], IMAGES[[1]], IMAGES[[0]], IMAGES[[1]], T([[5.0, 5.0]])])
    ids = T([30, 20, 10, 20, 20])
    perm = torch.tensor([3, 0, 4, 2, 1])
    got = retrieval_metrics(images, ids, TEXTS[perm], TEXT_IMAGE_IDS[perm])
    _assert_metrics(got, _expected(I2T_RANKS, [T2I_RANKS[i] for i in perm.tolist()], 3))


def test_single_image():
    got = retrieval_metrics(T([[0.6, 0.8]]), T([7]), T([[1.0, 0.0], [0.0, 1.0]]), T([7, 7]))
    _assert_metrics(got, _expected([1], [1, 1], 1))
    assert got["rsum"] == 600.0


def test_collapsed_model_gets_no_credit_from_ties():
    # every embedding equal: pessimistic ties put each true match behind all wrong candidates
    images, texts = torch.ones(12, 4), torch.ones(24, 4)
    ids = torch.arange(12)
    got = retrieval_metrics(images, ids, texts, ids.repeat(2))
    assert got["rsum"] == 0.0
    assert got["i2t_mean_rank"] == 23.0  # 22 wrong captions ahead of the best of its two
    assert got["t2i_mean_rank"] == 12.0


def test_missing_image_id_is_a_clear_error():
    with pytest.raises(ValueError, match=r"2 caption\(s\) refer to 2 image_id\(s\).*: 5, 99"):
        retrieval_metrics(IMAGES, IMAGE_IDS, torch.cat([TEXTS, TEXTS[:2]]), torch.cat([TEXT_IMAGE_IDS, T([99, 5])]))


@pytest.mark.parametrize("images, ids, texts, text_ids, message", [
    (torch.zeros(0, 2), T([], dtype=torch.long), TEXTS, TEXT_IMAGE_IDS, "at least one image"),
    (IMAGES, IMAGE_IDS, torch.zeros(0, 2), T([], dtype=torch.long), "at least one image and one caption"),
    (IMAGES, IMAGE_IDS[:2], TEXTS, TEXT_IMAGE_IDS, "3 image rows vs 2 ids"),
    (IMAGES, IMAGE_IDS, torch.ones(5, 3), TEXT_IMAGE_IDS, "differ in width"),
    (torch.full((3, 2), float("nan")), IMAGE_IDS, TEXTS, TEXT_IMAGE_IDS, "NaN or inf"),
])
def test_bad_inputs(images, ids, texts, text_ids, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(images, ids, texts, text_ids)


def _random_case(seed, num_images=37, captions_per_image=3, dim=16):
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=1)
    ids = torch.randperm(1000, generator=gen)[:num_images]
    text_ids = ids.repeat_interleave(captions_per_image)
    texts = torch.nn.functional.normalize(images.repeat_interleave(captions_per_image, 0)
                                          + 0.9 * torch.randn(len(text_ids), dim, generator=gen), dim=1)
    return images, ids, texts, text_ids


def _argsort_reference(images, ids, texts, text_ids):
    """Independent reference: float64 full matrix, descending argsort, position of the first true match."""
    sims = images.double().numpy() @ texts.double().numpy().T
    ids, text_ids = ids.numpy(), text_ids.numpy()
    i2t = [1 + int(np.flatnonzero(text_ids[np.argsort(-row, kind="stable")] == ids[i])[0])
           for i, row in enumerate(sims)]
    t2i = [1 + int(np.flatnonzero(ids[np.argsort(-col, kind="stable")] == text_ids[j])[0])
           for j, col in enumerate(sims.T)]
    return _expected(i2t, t2i, len(ids))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_argsort_reference_and_is_block_size_invariant(seed):
    images, ids, texts, text_ids = _random_case(seed)
    want = _argsort_reference(images, ids, texts, text_ids)
    assert 0 < want["i2t_r1"] < 100 and 0 < want["t2i_r1"] < 100  # a case where ranking actually matters
    for block_size in (1, 2, 7, 36, 37, 1024):
        _assert_metrics(retrieval_metrics(images, ids, texts, text_ids, block_size=block_size), want)


def test_top_captions():
    assert top_captions(IMAGES[[0]], TEXTS[[4, 3, 0]], k=2).tolist() == [[2, 1]]  # scores 0, .5, 1
    assert top_captions(IMAGES, TEXTS[:2], k=3).shape == (3, 2)


# ------------------------------------------------------------------------------------------------ grid

def test_render_retrieval_grid_places_images_and_marks_hits():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[0, 0] = 200  # red
    images[1, 2] = 180  # blue
    captions = [["a red square", "a blue square " * 20, "nothing"], ["x", "y", "z"]]
    correct = [[True, False, False], [False, False, False]]
    grid = render_retrieval_grid(images, captions, correct=correct, thumb_size=64, text_width=300)
    padding, row_height = 6, 64 + 12
    assert grid.dtype == np.uint8 and grid.shape == (2 * row_height, 64 + 300 + 18, 3)
    assert (grid[padding:padding + 64, padding:padding + 64] == [200, 0, 0]).all()
    assert (grid[row_height + padding:row_height + padding + 64, padding:padding + 64] == [0, 0, 180]).all()
    text_area = grid[:, 64 + 2 * padding:]
    green = text_area[..., 1].astype(int) - text_area[..., 0].astype(int) > 40  # grey text has R == G
    assert green[:row_height].sum() > 20  # the correct caption of row 0 is drawn in green
    assert green[row_height:].sum() == 0  # row 1 has no correct caption
    assert (text_area[row_height:].max(axis=2) > 100).sum() > 20  # but its captions are drawn
    assert (text_area[:, -2:] == [24, 24, 24]).all()  # a too-long caption is cut, not drawn past the edge


def test_render_retrieval_grid_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 images but 1 caption lists"):
        render_retrieval_grid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [["a"]])
    with pytest.raises(ValueError, match="uint8"):
        render_retrieval_grid(torch.zeros(1, 3, 8, 8), [["a"]])


# ------------------------------------------------------------------------------------------------ integration

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

VALID_NAMES = ["demo_val", "demo_one"]  # 23 images x 3 captions in 5 shards; 1 image (other ranks get none)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    """Demo validation data through the same code as tools/make_demo_data.py and tools/make_shards.py."""
    from zvl_ds.data import annotations, shards
    from zvl_ds.data.demo import make_demo_data

    root = tmp_path_factory.mktemp("eval_data")
    for data, size, captions, name, per_shard in (("data", 23, 3, "demo_val", 5), ("data2", 1, 5, "demo_one", 10)):
        make_demo_data(str(root / data), seed=len(data), train_size=1, valid_size=size, captions_per_image=captions)
        sources, _ = annotations.resolve_sources(str(root / data), ["demo_val"], "valid", None, None)
        shards.convert_sources(sources, str(root / data / "shards"), shards.ShardSettings(samples_per_shard=per_shard),
                               workers=1, policy="overwrite", progress=False)
        os.makedirs(root / "shards", exist_ok=True)
        shutil.move(str(root / data / "shards" / "demo_val"), str(root / "shards" / name))
    return str(root / "shards")


def eval_overrides(shard_root):
    return ["model.arch=tiny", "device=cpu", f"data.data_path={shard_root}", f"data.valid_name={VALID_NAMES}",
            "data.batch_size=6", "data.batch_size_val=6", "data.num_workers=0", "transforms.input_size=32",
            "transforms.resize.size=36", "transforms.center_crop.size=32", "log.num_image_samples=4",
            "loss.temperature.name=parameter"]


def build_tiny(overrides):
    from zvl_ds.config import load_config
    from zvl_ds.data import load_tokenizer
    from zvl_ds.model import build_model

    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.loss), load_tokenizer(cfg.model.text_encoder)


def _eval_worker(rank, world_size, overrides, zero3):
    from zvl_ds.data import build_valid_loader
    from zvl_ds.evaluate import embed_validation, evaluate_retrieval, evaluate_with_examples, log_retrieval_examples

    cfg, model, tokenizer = build_tiny(overrides)
    if zero3:  # parameters partitioned: every forward is collective, ranks must call the model in lockstep
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
            "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True})
        model = engine.module
    device = torch.device("cpu")
    metrics = evaluate_retrieval(cfg, model, tokenizer, device, torch.float32, progress=False)

    class Monitor:
        def __init__(self):
            self.images = {}

        def image(self, name, grid, step):
            self.images[name] = (grid.shape, step)

    monitor = Monitor()
    again, grids = evaluate_with_examples(cfg, model, tokenizer, device, torch.float32,
                                          num_examples=cfg.log.num_image_samples, progress=False)
    assert again == metrics
    log_retrieval_examples(monitor, grids, step=7)
    loader = build_valid_loader(cfg, "demo_val", rank, world_size, tokenizer)
    embedded = embed_validation(model, loader, device, torch.float32, cfg.transforms.normalize, progress=False)
    return {"metrics": metrics, "images": monitor.images, "image_ids": embedded.image_ids.tolist(),
            "caption_ids": embedded.caption_ids.tolist(), "text_image_ids": embedded.text_image_ids.tolist()}


def _read_shards(folder):
    """Independent reader: every sample of every tar (image bytes, image id, captions)."""
    samples = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(folder, name)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.rsplit(".", 1)[0] for n in members}):
            meta = json.loads(members[key + ".json"])
            samples.append((members[key + ".jpg"], meta["image_id"], meta["captions"], meta["caption_ids"]))
    return samples


def _reference_metrics(overrides, folder):
    """One sample at a time, no loader, no process group: the full-batch reference."""
    from zvl_ds.data import normalize_images, tokenize
    from zvl_ds.data.transforms import ImageTransform, to_uint8_chw

    cfg, model, tokenizer = build_tiny(overrides)
    model.eval()
    transform = ImageTransform(cfg.transforms.valid_transforms, cfg.transforms)
    images, ids, texts, text_ids = [], [], [], []
    with torch.no_grad():
        for data, image_id, captions, _ in _read_shards(folder):
            pixels = to_uint8_chw(transform(data, random.Random(0))).unsqueeze(0)
            images.append(model.encode_image(normalize_images(pixels, cfg.transforms.normalize, "cpu")))
            ids.append(image_id)
            input_ids, mask = tokenize(tokenizer, captions, cfg.model.max_length)
            texts.append(model.encode_text(input_ids, mask))
            text_ids.extend([image_id] * len(captions))
    return retrieval_metrics(torch.cat(images), torch.tensor(ids), torch.cat(texts), torch.tensor(text_ids))


@pytest.fixture(scope="module")
def reference(shard_root):
    overrides = eval_overrides(shard_root)
    want = {name: _reference_metrics(overrides, os.path.join(shard_root, name)) for name in VALID_NAMES}
    assert want["demo_val"]["num_images"] == 23 and want["demo_val"]["num_texts"] == 69
    assert want["demo_one"]["num_images"] == 1 and want["demo_one"]["rsum"] == 600.0
    return want


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_distributed_evaluation_is_identical_over_1_2_3_ranks(shard_root, reference, world_size):
    overrides = eval_overrides(shard_root)
    if world_size == 1:  # no process group at all
        results = [_eval_worker(0, 1, overrides, False)]
    else:
        # at 2 ranks the model is a ZeRO-3 engine's module: every forward gathers parameters collectively, and
        # on demo_one rank 1 has no data at all yet must take part in rank 0's forward (no hang)
        zero3 = world_size == 2
        results = run_distributed(_eval_worker, world_size, (overrides, zero3), timeout=240, use_deepspeed=zero3)
    for result in results:  # every rank returns the same numbers
        assert result["metrics"] == results[0]["metrics"]
    for name in VALID_NAMES:
        _assert_metrics(results[0]["metrics"][name], reference[name])
    # each sample exactly once, whatever the number of ranks
    all_samples = _read_shards(os.path.join(shard_root, "demo_val"))
    assert sorted(results[0]["image_ids"]) == sorted(s[1] for s in all_samples)
    assert sorted(results[0]["caption_ids"]) == sorted(c for s in all_samples for c in s[3])
    assert sorted(zip(results[0]["caption_ids"], results[0]["text_image_ids"])) == sorted(
        (c, s[1]) for s in all_samples for c in s[3])
    # the examples grid: rank 0 logs one per dataset (4 rows of 140 px, or 1 row); the other ranks log nothing
    assert results[0]["images"] == {f"eval/{name}/retrieval_examples": ((4 * 140 if name == "demo_val" else 140,
                                                                         128 + 520 + 18, 3), 7)
                                    for name in VALID_NAMES}
    assert all(r["images"] == {} for r in results[1:])


def _run_cli(args, cwd, torchrun=False):
    script = os.path.join(REPO_ROOT, "tools", "evaluate.py")
    if torchrun:
        from dist_utils import free_port

        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), script]
    else:
        command = [sys.executable, script]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    return subprocess.run(command + args, cwd=cwd, capture_output=True, text=True, timeout=180, env=env)


def test_evaluate_cli_on_an_exported_model_one_process_and_torchrun(shard_root, reference, tmp_path):
    from zvl_ds.export import write_model_folder

    overrides = eval_overrides(shard_root)
    cfg, model, tokenizer = build_tiny(overrides)
    model_dir = write_model_folder(str(tmp_path / "model"), cfg, model, tokenizer, {"run_dir": "test", "tag": "x"})
    # the data settings come from --cfg and overrides; the model brings its own transforms and caption length
    (tmp_path / "data.yaml").write_text(f"data:\n  data_path: {shard_root}\n  valid_name: [demo_val]\n"
                                        "  batch_size: 6\n  batch_size_val: 6\n  num_workers: 0\n")
    args = ["--model", model_dir, "--cfg", str(tmp_path / "data.yaml"), "--valid-name", *VALID_NAMES,
            "--no-progress"]
    single = _run_cli(args + ["--out", "one.json"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "rsum" in single.stdout and "demo_one" in single.stdout and "600.00" in single.stdout
    got = json.loads((tmp_path / "one.json").read_text())
    assert list(got) == VALID_NAMES
    for name in VALID_NAMES:
        _assert_metrics(got[name], reference[name])
    two = _run_cli(args + ["--out", "two.json"], cwd=tmp_path, torchrun=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text()) == got
    assert two.stdout.count("rsum") == 1  # only rank 0 prints


def test_evaluate_cli_reports_bad_input(tmp_path):
    missing = _run_cli(["--model", str(tmp_path / "nothing"), "--cfg", "x.yaml"], cwd=tmp_path)
    assert missing.returncode == 2 and "run folder not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_chance_metrics_hand_computed():
    from zvl_ds.evaluate import chance_metrics

    two = chance_metrics(num_images=2, num_texts=2)  # one caption each: a coin flip at K=1, certain at K>=2
    assert two["i2t_r1"] == pytest.approx(50.0) and two["t2i_r1"] == pytest.approx(50.0)
    assert two["i2t_r5"] == 100.0 and two["t2i_r10"] == 100.0
    # 200 images x 5 captions: T2I R@1 = 1/200; I2T R@1 = 5/1000; I2T R@5 = 1 - C(995,5)/C(1000,5)
    demo = chance_metrics(num_images=200, num_texts=1000)
    assert demo["t2i_r1"] == pytest.approx(0.5) and demo["i2t_r1"] == pytest.approx(0.5)
    expected = 1 - (995 * 994 * 993 * 992 * 991) / (1000 * 999 * 998 * 997 * 996)
    assert demo["i2t_r5"] == pytest.approx(100 * expected)
    assert demo["rsum"] == pytest.approx(sum(v for k, v in demo.items() if k != "rsum"))
