"""LoRA adapters through the real entry points (one CPU process, as a user runs ``python zvl_ds/train.py``): a run
resumed from its small checkpoint ends with the uninterrupted run's weights and model EMA; a resume onto another
base exits 2 with a message naming the cause; ``python -m zvl_ds.export`` writes the merged
model (which ``zvl_ds.load_model`` reads) and ``--adapters-only`` peft's files."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from tests.helpers.training_runs import interrupted_at

pytest.importorskip("peft")
TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")
STEPS = 2
LORA = ["model.image_encoder.lora.r=4", "model.image_encoder.lora.dropout=0.2", "model.text_encoder.lora.r=4",
        "model.text_encoder.lora.dropout=0.2", "model.ema.decay=0.6"]


def train(shards, out_dir, exp_name, *extra, expect=0):
    args = ["--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), "data.batch_size=16", "data.batch_size_train=4",
            "data.num_workers=1", "data.shuffle_buffer=50", "data.enable_valid=false", "log.tensorboard=false",
            f"data.data_path={shards}", f"ckpt.dir={out_dir}", f"data.exp_name={exp_name}",
            f"runner.train_steps={STEPS}", "ckpt.step_interval=1", "ckpt.keep_last=5", *LORA, *extra]
    done = subprocess.run([sys.executable, TRAIN, *args], env=child_env(), capture_output=True, text=True,
                          timeout=600, cwd=out_dir)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def export_cli(run_dir, out, *flags):
    done = subprocess.run([sys.executable, "-m", "zvl_ds.export", str(run_dir), "--out", str(out), *flags],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return str(out)


def merged_weights(run_dir, out, ema=False):
    """What ``python -m zvl_ds.export RUN [--ema]`` writes, in this process (the CLI runs once, below)."""
    from safetensors.torch import load_file

    from zvl_ds.export.formats import export_model

    export_model(str(run_dir), str(out), ema=ema)
    return load_file(os.path.join(out, "model.safetensors"))


def test_small_checkpoints_resume_exactly_refuse_another_base_and_export(shards, tmp_path):
    straight = tmp_path / "straight"
    log = train(shards, tmp_path, "straight")
    assert "image_tower: LoRA adapters on 4 modules" in log and "checkpoints hold the trainable tensors only" in log
    base = json.loads((straight / "step_00000002" / "adapter_base.json").read_text())
    assert base["frozen_tensors"] > 0 and len(base["frozen_sha256"]) == 64

    resumed = tmp_path / "resumed"
    interrupted_at(straight, resumed, "step_00000001")
    log = train(shards, tmp_path, "resumed")
    assert f"resumed from {resumed / 'step_00000001'} at step 1" in log

    for ema in (False, True):
        a = merged_weights(straight, tmp_path / f"a{ema}", ema)
        b = merged_weights(resumed, tmp_path / f"b{ema}", ema)
        assert a.keys() == b.keys() and not any(".lora_" in key or "base_layer" in key for key in a)
        worst = max(float((a[name] - b[name]).abs().max()) for name in a)
        print(f"merged export (ema={ema}): resumed vs uninterrupted, largest difference {worst:.1e}")
        assert worst == 0.0
    import zvl_ds

    loaded = zvl_ds.load_model(str(tmp_path / "aFalse"))
    assert loaded.encode_text(["a red circle"]).shape == (1, loaded.model.text_projection.out_features)

    adapters = export_cli(straight, tmp_path / "adapters", "--adapters-only")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapters))
    config = json.loads(open(os.path.join(adapters, "adapter_config.json")).read())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and len(config["target_modules"]) == 8

    # another seed builds other random tower weights: the frozen base the adapters were trained on is gone
    log = train(shards, tmp_path, "straight", "runner.train_steps=3", "seed=7", expect=2)
    assert "the frozen base model differs from the one the checkpoint's adapters were trained on" in log
    assert str(straight / "step_00000002") in log and "Traceback" not in log
