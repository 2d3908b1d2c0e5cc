"""End-to-end training runs: the real entry point under the deepspeed launcher and torchrun (2 CPU ranks)."""
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.dist_utils import free_port
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env, ssh_to_localhost_works
from tests.helpers.training_runs import (BIN, RESUMABLE, RESUMABLE_STEPS, TRAIN, common_args, final_weights,
                                         keys_by_step, kill_tree, torchrun)


def read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_deepspeed_launcher_two_ranks_trains_logs_checkpoints_and_resumes(shards, tmp_path):
    args = common_args(shards, tmp_path, "demo", 40, ["runner.val_interval_steps=40", "ckpt.step_interval=20",
                                                      "optim.lr.init=1e-3"])
    command = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port",
               str(free_port()), TRAIN, *args]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "demo"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "latest").read_text().strip() == "step_00000040"
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000020", "step_00000040"]
    events = read_scalars(str(run_dir))
    tags = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/i2t_acc", "train/t2i_acc", "train/lr", "train/temperature",
                "train/samples_per_sec", "train/samples_per_sec_per_device", "train/skipped_steps",
                "time/data_wait", "time/pass1", "time/loss", "time/pass2", "time/optimizer",
                "memory/peak_device_bytes", "eval/demo_val/rsum", "eval/demo_val/i2t_r1"]:
        assert tag in tags, f"missing TensorBoard tag {tag}; have {sorted(tags)}"
    assert "config" in " ".join(events.Tags()["tensors"])
    assert events.Tags()["images"], "the retrieval examples grid was not logged"
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, "loss did not fall"

    # resume: a longer run picks up from step 40 instead of starting again
    longer = common_args(shards, tmp_path, "demo", 44, ["runner.val_interval_steps=1000", "ckpt.step_interval=20"])
    again = subprocess.run(torchrun(longer), env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "at step 40" in again.stdout
    assert (run_dir / "latest").read_text().strip() == "step_00000044"

    # changed data settings cannot continue the checkpointed stream: a clear error, not a traceback
    changed = common_args(shards, tmp_path, "demo", 48, ["data.shuffle_buffer=49"])
    refused = subprocess.run(torchrun(changed), env=child_env(), capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
    assert refused.returncode != 0
    assert "cannot continue the data stream" in refused.stderr and "shuffle" in refused.stderr
    assert "Traceback" not in refused.stderr.split("cannot continue")[0][-200:]

    # another world size (ZeRO-2): one process continues the 2-rank run with its optimizer state re-split
    alone = common_args(shards, tmp_path, "demo", 46, ["runner.val_interval_steps=1000"])
    single = subprocess.run([sys.executable, TRAIN, *alone], env=child_env(), capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "optimizer state re-split for this world size" in single.stdout and "at step 44" in single.stdout
    assert (run_dir / "latest").read_text().strip() == "step_00000046"
    optim = torch.load(run_dir / "step_00000046" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]  # our own checkpoint (DeepSpeed pickles objects)
    adam_steps = {int(state["step"]) for state in optim["base_optimizer_state"]["state"].values()}
    assert adam_steps == {46}, f"Adam restarted instead of continuing: steps {adam_steps}"

    # evaluation only (evaluate: true) needs no training data
    only_eval = common_args(shards, tmp_path, "demo", 46, ["evaluate=true", "data.train_name=[no_such_set]"])
    evaluated = subprocess.run([sys.executable, TRAIN, *only_eval], env=child_env(), capture_output=True, text=True,
                               timeout=600, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "eval demo_val @ step 46" in evaluated.stdout


def test_sigkill_then_resume_gives_identical_parameters_and_samples(shards, tmp_path, straight):
    # the resumable run with a checkpoint every 4 steps, against the same run uninterrupted (shared with the
    # preemption tests: tests/e2e/conftest.py)
    steps, interval = RESUMABLE_STEPS, 4
    extra = [*(arg for arg in RESUMABLE if not arg.startswith("ckpt.step_interval=")), f"ckpt.step_interval={interval}"]
    straight_dir = straight(2)

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(torchrun(common_args(shards, tmp_path, "killed", steps, extra)), env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not (killed_dir / "latest").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    kill_tree(process)
    resumed_from = (killed_dir / "latest").read_text().strip()
    assert resumed_from != f"step_{steps:08d}", "the run finished before it could be killed"

    again = subprocess.run(torchrun(common_args(shards, tmp_path, "killed", steps, extra)), env=child_env(),
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {killed_dir / resumed_from}" in again.stdout

    tag_a, weights_a = final_weights(straight_dir)
    tag_b, weights_b = final_weights(str(killed_dir))
    assert tag_a == tag_b == f"step_{steps:08d}"
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), f"{name} differs after resume"
    resume_step = int(resumed_from.split("_")[1])
    for rank in (0, 1):
        keys_a, keys_b = keys_by_step(straight_dir, rank), keys_by_step(str(killed_dir), rank)
        assert [keys_a[s] for s in range(resume_step, steps)] == [keys_b[s] for s in range(resume_step, steps)]
        assert len(keys_a) == steps


def test_config_error_exits_2_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, TRAIN, "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"),
                           "data.bach_size=3"], env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "did you mean data.batch_size" in done.stderr
    assert "Traceback" not in done.stderr


def test_contradicting_deepspeed_config_is_refused(shards, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": 999, "zero_optimization": {"stage": 2}}')
    args = common_args(shards, tmp_path, "bad", 2)
    args[1] = str(ds)
    done = subprocess.run([sys.executable, TRAIN, *args], env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train_batch_size=999" in done.stderr and "contradicts" in done.stderr


@pytest.mark.skipif(not ssh_to_localhost_works(),
                    reason="needs pdsh and passwordless ssh to localhost (CI sets them up: tools/ci_ssh_localhost.sh)")
def test_multi_node_hostfile_launch(shards, tmp_path):
    """Two "nodes" (localhost and 127.0.0.1, one rank each) through the deepspeed launcher's pdsh runner."""
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # the launcher exports these to every node
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\nHF_HUB_OFFLINE=1\n"
                                             "TRANSFORMERS_OFFLINE=1\n")
    args = common_args(shards, tmp_path, "nodes", 4, ["data.enable_valid=false", "ckpt.step_interval=2"])
    command = [os.path.join(BIN, "deepspeed"), "--hostfile", "hostfile", "--no_local_rank", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), TRAIN, *args]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pdsh" in done.stdout + done.stderr and "2 ranks" in done.stdout
    assert (tmp_path / "nodes" / "latest").read_text().strip() == "step_00000004"
