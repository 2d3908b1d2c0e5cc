"""Zero-shot classification sets in training (data.zeroshot): every image counted exactly once over 2 real ranks
(hand-computed accuracy on crafted images), and a real training run that logs eval/<set>/top1 and top5."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.data_fixtures import make_demo_shards
from tests.helpers.paths import REPO_ROOT
from tests.helpers.dist_utils import run_distributed
from tests.unit.test_classify import ColourModel, colour_folder  # noqa: F401  (fixture)

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")


def _cfg(folder, templates):
    from zvl_ds.config import load_config

    # identity normalisation and a size-preserving resize: the model sees the solid colours themselves
    return load_config(None, ["model.arch=tiny", f"data.zeroshot.colours.path={folder}",
                              f"data.zeroshot.colours.templates={templates}", "data.valid_name=[]",
                              "data.batch_size_val=4", "transforms.normalize.mean=[0,0,0]",
                              "transforms.normalize.std=[1,1,1]", "transforms.valid_transforms=[resize]",
                              "transforms.resize.size=8"])


def _worker(rank, world_size, folder, templates):
    import torch

    from zvl_ds.data import load_tokenizer
    from zvl_ds.evaluation.zero_shot import evaluate_zero_shot

    cfg = _cfg(folder, templates)
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    return evaluate_zero_shot(cfg, ColourModel(tokenizer), tokenizer, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_image_counted_once_over_the_ranks(colour_folder, tmp_path, world_size):  # noqa: F811
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n{}\n")
    results = run_distributed(_worker, world_size, (colour_folder, str(templates)), use_deepspeed=False)
    # 11 readable images (see test_classify): 8 top-1 hits, 9 top-5 hits; the corrupt file is counted once
    want = {"colours": {"top1": 100.0 * 8 / 11, "top5": 100.0 * 9 / 11, "topk": 5.0, "num_images": 11.0,
                        "num_skipped": 1.0, "num_classes": 8.0}}
    assert all(result == want for result in results)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_shards(tmp_path_factory.mktemp("demo"), train_size=32, valid_size=8, captions_per_image=1,
                            classify_size=10)


def _train(demo, tmp_path, extra):
    data, shards = demo
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, TRAIN, "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"),
               "data.batch_size=8", "data.batch_size_train=4", "data.batch_size_val=8", "data.num_workers=0",
               "data.shuffle_buffer=10", "log.num_image_samples=0", "runner.train_steps=2",
               "runner.val_interval_steps=2", f"data.data_path={shards}", f"ckpt.dir={tmp_path}", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_training_logs_zero_shot_accuracy(demo, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, _ = demo
    done = _train(demo, tmp_path, [f"data.zeroshot.shapes.path={data / 'demo_classify'}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "demo" / "eval_metrics.jsonl").read_text().splitlines()]
    shapes = lines[-1]["shapes"]
    assert lines[-1]["step"] == 2 and shapes["num_images"] == 10.0 and shapes["num_classes"] == 5.0
    assert 0.0 <= shapes["top1"] <= shapes["top5"] <= 100.0
    events = EventAccumulator(str(tmp_path / "demo" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"eval/shapes/top1", "eval/shapes/top5", "eval/demo_val/rsum"} <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/shapes/top1")[-1].value == pytest.approx(shapes["top1"])


def test_unreadable_zero_shot_set_fails_at_the_start(demo, tmp_path):
    done = _train(demo, tmp_path, [f"data.zeroshot.shapes.path={tmp_path / 'missing'}"])
    assert done.returncode == 2
    assert "data.zeroshot.shapes: image folder not found" in done.stderr
    assert not (tmp_path / "demo" / "eval_metrics.jsonl").exists()
