"""Distributed evaluation over 1, 2 and 3 real processes (ZeRO-3 too) equals one process's, and the evaluate
tool on an exported model, alone and under torchrun."""
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from tests.helpers.paths import REPO_ROOT
from tests.helpers.dist_utils import run_distributed
from tests.unit.test_evaluate import _assert_metrics
from zvl_ds.evaluation.metrics import retrieval_metrics

VALID_NAMES = ["demo_val", "demo_one"]  # 23 images x 3 captions in 5 shards; 1 image (other ranks get none)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    """Demo validation data through the same code as zvl_ds.make_demo_data and zvl_ds.make_shards."""
    from zvl_ds.data.writing import annotations
    from zvl_ds.data.writing import shard_writer as shards
    from zvl_ds.data.writing.demo import make_demo_data

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
    from zvl_ds.model.build import build_model

    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.loss), load_tokenizer(cfg.model.text_encoder)


def _eval_worker(rank, world_size, overrides, zero3):
    from zvl_ds.data import build_valid_loader
    from zvl_ds.evaluation.embed import embed_validation
    from zvl_ds.evaluation.retrieval import evaluate_retrieval, evaluate_with_examples, log_retrieval_examples

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
    from zvl_ds.data import normalize_images
    from zvl_ds.data import tokenize
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
    tool = ["-m", "zvl_ds.eval_retrieval"]
    if torchrun:
        from tests.helpers.dist_utils import free_port

        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), *tool]
    else:
        command = [sys.executable, *tool]
    # run from another folder: this checkout's package must be the one imported
    python_path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=python_path)
    return subprocess.run(command + args, cwd=cwd, capture_output=True, text=True, timeout=180, env=env)


def test_evaluate_cli_on_an_exported_model_one_process_and_torchrun(shard_root, reference, tmp_path):
    from zvl_ds.export.model_folder import write_model_folder

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
