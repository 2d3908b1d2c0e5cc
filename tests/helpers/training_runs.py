"""Training runs of the real entry point for the end-to-end tests: the command lines (the deepspeed launcher,
torchrun, one process), the demo run's arguments, and what the tests read back from a run folder."""
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from tests.helpers.dist_utils import free_port
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")
BIN = os.path.dirname(sys.executable)
SMALL = ["data.batch_size=16", "data.batch_size_train=4", "data.batch_size_val=16", "data.num_workers=1",
         "data.shuffle_buffer=50", "log.interval_train=1", "log.num_image_samples=4"]

# The resumable runs of the preemption and kill tests: no evaluation, every rank's sample keys recorded, and no
# periodic checkpoint (a test that wants one sets ckpt.step_interval after these)
RESUMABLE_STEPS = 16
RESUMABLE = ["data.enable_valid=false", "log.tensorboard=false", "runner.val_interval_steps=1000",
             "ckpt.step_interval=100", "log.record_sample_keys=true", "ckpt.keep_last=5"]


def torchrun(args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), TRAIN, *args]


def command(launcher, nproc, args, script=TRAIN):
    """``script`` under the deepspeed launcher or torchrun with ``nproc`` ranks, or in one process ("python")."""
    if launcher == "deepspeed":
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc), "--no_local_rank", "--master_port",
                str(free_port()), script, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port()), script, *args]
    return [sys.executable, script, *args]


def common_args(shards, out_dir, exp_name, steps, extra=()):
    return ["--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
            "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), *SMALL,
            f"data.data_path={shards}", f"ckpt.dir={out_dir}", f"data.exp_name={exp_name}",
            f"runner.train_steps={steps}", *extra]


def run_uninterrupted(shards, out_dir, world_size):
    """The resumable run of ``RESUMABLE_STEPS`` steps, uninterrupted, under torchrun; returns its run folder."""
    args = common_args(shards, out_dir, "run", RESUMABLE_STEPS, RESUMABLE)
    done = subprocess.run(command("torchrun", world_size, args), env=child_env(), capture_output=True, text=True,
                          timeout=600, cwd=out_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return str(out_dir / "run")


def kill_tree(process):
    """SIGKILL the launcher and every worker (torchrun starts its workers in sessions of their own)."""
    import psutil

    family = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
    for member in family:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=60)
    process.wait(timeout=60)


def final_weights(run_dir):
    tag = open(os.path.join(run_dir, "latest")).read().strip()
    state = torch.load(os.path.join(run_dir, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                       weights_only=False)  # our own checkpoint: DeepSpeed stores its config objects in it
    return tag, state["module"]


def keys_by_step(run_dir, rank):
    """The last record of every step (a killed run's steps after its checkpoint are replayed on resume)."""
    seen = {}
    with open(os.path.join(run_dir, "sample_keys", f"rank_{rank}.txt")) as handle:
        for line in handle:
            step, *keys = line.split()
            seen[int(step)] = keys
    return seen


def wait_for_steps(run_dir, steps, processes, timeout=300):
    """Until rank 0 has recorded ``steps`` steps (so a signal now lands mid-run)."""
    keys = os.path.join(run_dir, "sample_keys", "rank_0.txt")
    deadline = time.monotonic() + timeout
    while not (os.path.exists(keys) and len(open(keys).read().splitlines()) >= steps):
        assert all(p.poll() is None for p in processes), "the run ended before the signal could be sent"
        assert time.monotonic() < deadline, f"fewer than {steps} steps within {timeout} s"
        time.sleep(0.05)


def rank_process(launcher_pid, rank):
    """The worker process of ``rank`` under a launcher (not one of its DataLoader workers, whose parent is a rank)."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "RANK" not in child.parent().environ():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} worker under process {launcher_pid}")


def interrupted_at(straight, resumed, tag):
    """``resumed``: the run folder ``straight`` as it stood when checkpoint ``tag`` was its latest (that checkpoint
    and the run's config only), for a run that resumes from there to the end."""
    resumed.mkdir()
    shutil.copytree(straight / tag, resumed / tag)
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")
    (resumed / "latest").write_text(tag)
