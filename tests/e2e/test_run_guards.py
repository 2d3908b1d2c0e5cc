"""Faults planted from outside that used to cost a run its progress or its checkpoints: a second job on the same run
folder, a step that leaves non-finite weights, a full disk under a side output (TensorBoard, eval_metrics.jsonl)."""
import glob
import os
import signal
import subprocess
import time

import torch

from tests.helpers.processes import child_env
from tests.helpers.training_runs import command, common_args, wait_for_steps

QUIET = ["data.enable_valid=false", "log.tensorboard=false", "runner.val_interval_steps=1000"]


def run(args, tmp_path, launcher="python", nproc=1, timeout=600):
    return subprocess.run(command(launcher, nproc, args), env=child_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


# ------------------------------------------------------------------------------------------------ run folder lock

def test_a_second_job_on_the_run_folder_stops_at_once_and_writes_nothing(shards, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(command("python", 1, common_args(shards, tmp_path, "run", 500, [
        *QUIET, "ckpt.step_interval=2", "log.record_sample_keys=true"])), env=child_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True)
    try:
        wait_for_steps(str(run_dir), 3, [first])
        config_before = (run_dir / "config.yaml").read_bytes()
        # a duplicated submission with another setting, on 2 ranks: every rank stops, nothing is written
        second = run(common_args(shards, tmp_path, "run", 500, [*QUIET, "log.interval_train=5"]), tmp_path,
                     "torchrun", 2)
        assert second.returncode != 0
        assert "error: [rank 0]" in second.stderr and "error: [rank 1]" in second.stderr, second.stderr[-3000:]
        assert f"{run_dir} is in use by another job (host " in second.stderr
        assert f"pid {first.pid}, started 20" in second.stderr, second.stderr[-3000:]
        assert (run_dir / "config.yaml").read_bytes() == config_before
        assert first.poll() is None, "the first job was disturbed"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a killed job: its lock goes with it
        first.wait(timeout=60)
    # the next job gets the folder at once; refused for changed data settings, it leaves config.yaml as it was
    changed = run(common_args(shards, tmp_path, "run", 500, [*QUIET, "data.shuffle_buffer=49"]), tmp_path)
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "cannot continue the data stream" in changed.stderr and "in use by another job" not in changed.stderr
    assert (run_dir / "config.yaml").read_bytes() == config_before


# ------------------------------------------------------------------------------------------------ non-finite weights

# An infinite learning rate from step 5 on. The config refuses optim.lr.init=inf at load (exit 2), so the plant reaches
# the step the way a schedule's arithmetic would: through the schedule function the loop calls.
INFINITE_LR = '''
import sys
from zvl_ds import train, trainer

schedule = trainer.learning_rate

def learning_rate(lr_cfg, step, total_steps, steps_per_epoch):
    return float("inf") if step >= 4 else schedule(lr_cfg, step, total_steps, steps_per_epoch)

trainer.learning_rate = learning_rate
sys.exit(train.cli())
'''


def test_a_step_that_leaves_non_finite_weights_never_becomes_latest(shards, tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "infinite_lr.py"
    script.write_text(INFINITE_LR)
    poisoned = subprocess.run(command("torchrun", 2, common_args(shards, tmp_path, "run", 12, [
        *QUIET, "ckpt.step_interval=2", "ckpt.keep_last=1", "runner.max_skipped_steps=3"]), str(script)),
        env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = poisoned.stdout + poisoned.stderr
    assert poisoned.returncode != 0
    assert output.count("step 5 left non-finite weights") == 2, output[-5000:]  # both ranks, agreed
    assert f"Last good checkpoint: {run_dir}/step_00000004" in output
    assert (run_dir / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000004"]
    weights = torch.load(run_dir / "step_00000004" / "mp_rank_00_model_states.pt", map_location="cpu",
                         weights_only=False)["module"]  # our own checkpoint
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())


# ------------------------------------------------------------------------------------------------ side outputs

def test_a_full_disk_under_eval_metrics_saves_the_training_state_first(shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink("/dev/full", run_dir / "eval_metrics.jsonl")  # every write to it fails with ENOSPC
    done = run(common_args(shards, tmp_path, "run", 6, [
        "data.enable_valid=true", "runner.val_interval_steps=2", "log.tensorboard=false", "ckpt.step_interval=100"]),
        tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"error: writing {run_dir}/eval_metrics.jsonl failed: No space left on device (rank 0); the training "
            f"state is saved first, in {run_dir}/step_00000003") in done.stderr, done.stderr[-3000:]
    assert (run_dir / "latest").read_text().strip() == "step_00000003"


def test_a_full_disk_under_tensorboard_saves_the_training_state_first(shards, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command("python", 1, common_args(shards, tmp_path, "run", 200, [
        "data.enable_valid=false", "ckpt.step_interval=100", "log.record_sample_keys=true"])), env=child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        wait_for_steps(str(run_dir), 3, [process])
        (events,) = glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))
        os.symlink("/dev/full", events + ".full")
        os.replace(events + ".full", events)  # the disk under tensorboard/ is full from now on
        planted = time.monotonic()
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 2, err[-3000:]
    assert time.monotonic() - planted < 120
    assert f"error: writing TensorBoard events under {run_dir}/tensorboard failed: No space left on device" in err
    latest = (run_dir / "latest").read_text().strip()
    assert f"the training state is saved first, in {run_dir}/{latest}" in err, err[-3000:]
    assert int(latest.split("_")[1]) >= 3
