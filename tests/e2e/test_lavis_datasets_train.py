"""A LAVIS-style config (``run:`` and ``datasets:`` blocks, the tiny preset) trains and evaluates on demo shards."""
import json
import os
import subprocess
import sys

import yaml

from tests.helpers.data_fixtures import make_demo_shards
from tests.helpers.paths import REPO_ROOT

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")

LAVIS_CONFIG = """\
model: {arch: tiny}
run:
  task: retrieval
  seed: 0
  device: cpu
  amp: false
  init_lr: 1.0e-3
  lr_sched: constant_lr
  train_splits: [train]
  valid_splits: [valid]
  output_dir: OUT
datasets:
  demo_flat:
    vis_processor: &images
      train: {name: clip_image_train, image_size: 32, min_scale: 0.7, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
      eval: {name: clip_image_eval, image_size: 32, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
    text_processor: &captions
      train: {name: blip_caption, prompt: "a picture of ", max_words: 12}
      eval: {name: blip_caption}
    build_info: {images: {storage: SHARDS/demo_flat}}
  demo_val:
    vis_processor: *images
    text_processor: *captions
    build_info: {images: {storage: SHARDS/demo_val}}
data:
  exp_name: lavis
  train_name: [demo_flat]
  valid_name: [demo_val]
  data_path: /nonexistent  # the shards are found through the datasets' storage only
  batch_size: 4
  batch_size_val: 8
  num_workers: 0
  shuffle_buffer: 8
"""


def test_lavis_config_with_datasets_block_trains_two_steps_and_evaluates(tmp_path):
    _, shards = make_demo_shards(tmp_path, train_size=12, valid_size=8, captions_per_image=1, in_process=True)
    config = tmp_path / "lavis.yaml"
    config.write_text(LAVIS_CONFIG.replace("SHARDS", str(shards)).replace("OUT", str(tmp_path / "out")))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, TRAIN, "--cfg", str(config), "runner.train_steps=2",
                           "runner.val_interval_steps=2", "log.num_image_samples=0", "log.tensorboard=false"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "out" / "lavis"
    last = json.loads((run_dir / "eval_metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["demo_val"]["num_images"] == 8.0
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())  # the run records our keys, not the block
    assert resolved["transforms"]["caption_train"] == {"clean": True, "max_words": 12, "prompt": "a picture of "}
    assert resolved["transforms"]["valid_transforms"] == ["resize", "center_crop"]
    assert resolved["data"]["datasets"]["demo_val"]["folder"] == os.path.join(str(shards), "demo_val")
