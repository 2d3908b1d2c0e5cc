"""Model EMA and partial locking through the real entry points: a run resumed from its checkpoint at ZeRO-3 (2 CPU
ranks under torchrun) ends with the same EMA as the uninterrupted run, evaluates it as <set>_ema, and
``python -m zvl_ds.export --ema`` writes it."""
import json
import os
import shutil
import subprocess
import sys

import torch

from tests.helpers.dist_utils import free_port
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from tests.helpers.training_runs import interrupted_at

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")
STEPS = 4


def train(shards, out_dir, exp_name):
    args = ["--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero3.json"),
            "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"),
            "data.batch_size=16", "data.batch_size_train=4", "data.batch_size_val=16", "data.num_workers=1",
            "data.shuffle_buffer=50", "log.num_image_samples=0", "log.tensorboard=false",
            f"data.data_path={shards}", f"ckpt.dir={out_dir}", f"data.exp_name={exp_name}",
            f"runner.train_steps={STEPS}", "ckpt.step_interval=2", "ckpt.keep_last=5", f"runner.val_interval_steps={STEPS}",
            "model.ema.decay=0.6", "model.ema.warmup_steps=2", "model.image_encoder.unlocked_groups=2",
            "model.text_encoder.unlocked_layers=1", "model.image_encoder.patch_dropout=0.25"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), TRAIN, *args]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=out_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def export(run_dir, out, *flags, in_process=False):
    """``python -m zvl_ds.export RUN --out OUT FLAGS``; with ``in_process`` its main() here (the same command
    without an interpreter's start-up: the command itself is run at least once per test)."""
    argv = [str(run_dir), "--out", str(out), *flags]
    if in_process:
        from zvl_ds.export.__main__ import main

        assert main(argv) == 0
    else:
        done = subprocess.run([sys.executable, "-m", "zvl_ds.export", *argv], env=child_env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model.safetensors"))


def test_resumed_run_ends_with_the_uninterrupted_runs_ema_at_zero3(shards, tmp_path):
    straight = tmp_path / "straight"
    log = train(shards, tmp_path, "straight")
    assert "image_tower: the last 2 of 3 groups of blocks train" in log
    rows = [json.loads(line) for line in (straight / "eval_metrics.jsonl").read_text().splitlines()]
    assert "demo_val" in rows[-1] and "demo_val_ema" in rows[-1] and "rsum" in rows[-1]["demo_val_ema"]

    # the interrupted run: the straight run's folder as it was at step 2, resumed to the end
    resumed = tmp_path / "resumed"
    interrupted_at(straight, resumed, "step_00000002")
    log = train(shards, tmp_path, "resumed")
    assert f"resumed from {resumed / 'step_00000002'} at step 2" in log

    ema_a = export(straight, tmp_path / "ema_a", "--ema")
    ema_b = export(resumed, tmp_path / "ema_b", "--ema", in_process=True)
    trained = export(straight, tmp_path / "trained", in_process=True)
    assert ema_a.keys() == ema_b.keys() == trained.keys()
    worst = max(float((ema_a[name] - ema_b[name]).abs().max()) for name in ema_a)
    print(f"EMA after resume vs uninterrupted (ZeRO-3, 2 ranks): largest difference {worst:.1e}")
    assert worst == 0.0
    # frozen groups: the EMA is the weights themselves (the LayerNorms of frozen text layers train, as OpenCLIP's)
    averaged = [name for name in ema_a if not torch.equal(ema_a[name], trained[name])]
    assert averaged and all(not name.startswith(("image_tower.patch_embed", "text_tower.embeddings.word"))
                            for name in averaged)
    for name in ("image_tower.patch_embed.proj.weight", "text_tower.embeddings.word_embeddings.weight"):
        assert torch.equal(ema_a[name], trained[name])


def test_export_ema_of_a_run_without_ema_exits_2(shards, tmp_path):
    run_dir = tmp_path / "plain"
    (run_dir / "step_00000001").mkdir(parents=True)
    (run_dir / "latest").write_text("step_00000001")
    shutil.copy(os.path.join(REPO_ROOT, "configs", "demo.yaml"), run_dir / "config.yaml")
    done = subprocess.run([sys.executable, "-m", "zvl_ds.export", str(run_dir), "--ema", "--out",
                           str(tmp_path / "out")], env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error:" in done.stderr
