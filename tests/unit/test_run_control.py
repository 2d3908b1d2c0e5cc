"""What controls a run from outside: preemption signals, the run folder's lock, SLURM's variables, config values that
would only fail later, and the finiteness check of the weights. Signals and locks are planted on real processes."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from zvl_ds.config import ConfigError, load_config
from zvl_ds.objective.skip import local_weights_finite
from zvl_ds.runtime.dist import first_slurm_host, slurm_launch_env, slurm_port
from zvl_ds.runtime.preemption import PREEMPTED_EXIT_CODE, REPEAT_WINDOW_S
from zvl_ds.runtime.run_lock import LOCK_FILE, RunFolderBusy, acquire_run_lock, release_run_lock

DEMO = os.path.join(REPO_ROOT, "configs", "demo.yaml")

# ------------------------------------------------------------------------------------------------ preemption

# a process that watches for preemption signals the way a training rank does, and reports what it noted
WATCHER = '''
import sys, time
from zvl_ds.runtime.preemption import PreemptionWatch
watch = PreemptionWatch(float(sys.argv[1]), rank=3).start()
print("ready", flush=True)
deadline = time.monotonic() + 60
while not watch.signal_number and time.monotonic() < deadline:
    time.sleep(0.01)
print("noted", watch.signal_number, flush=True)
time.sleep(float(sys.argv[2]))
print("survived", flush=True)
'''


def start_watcher(grace_s, linger_s):
    process = subprocess.Popen([sys.executable, "-c", WATCHER, str(grace_s), str(linger_s)], env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_a_signal_is_noted_not_fatal_and_copies_within_the_window_count_once():
    process = start_watcher(grace_s=30, linger_s=1)
    process.send_signal(signal.SIGUSR1)
    time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)  # what a launcher forwarding the group's signal adds
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert out.split() == ["noted", str(int(signal.SIGUSR1)), "survived"]
    assert "[rank 3] SIGUSR1 received: finishing the current step, then saving a checkpoint" in err


@pytest.mark.slow  # a child interpreter and its grace period: about 6 s
def test_a_second_signal_ends_the_process_at_once():
    process = start_watcher(grace_s=60, linger_s=60)
    process.send_signal(signal.SIGTERM)
    assert process.stdout.readline().split() == ["noted", str(int(signal.SIGTERM))]
    time.sleep(REPEAT_WINDOW_S + 0.5)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "a second signal (SIGTERM): ending at once without a new checkpoint" in err


def test_the_grace_period_running_out_ends_the_process():
    process = start_watcher(grace_s=1.5, linger_s=60)
    sent = time.monotonic()
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=30)
    assert 1.4 < time.monotonic() - sent < 10
    assert process.returncode == 128 + signal.SIGUSR1, err
    assert "runner.preempt_timeout=1.5 s passed since SIGUSR1" in err and "latest" in err


def test_preempted_exit_code_is_distinct():
    assert PREEMPTED_EXIT_CODE not in (0, 1, 2) and PREEMPTED_EXIT_CODE < 128


# ------------------------------------------------------------------------------------------------ run folder lock

HOLDER = '''
import os, sys, time
from zvl_ds.runtime.run_lock import acquire_run_lock, close_inherited_locks
acquire_run_lock(sys.argv[1])
ready, done = os.pipe()
if os.fork() == 0:  # like a DataLoader worker: a forked child that outlives its parent for a while
    close_inherited_locks()
    os.write(done, b"x")
    time.sleep(60)
    os._exit(0)
os.read(ready, 1)
print("locked", flush=True)
time.sleep(60)
'''


def test_a_second_job_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], env=child_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy) as refused:
            acquire_run_lock(run_dir)
        message = str(refused.value)
        assert run_dir in message and f"pid {holder.pid}" in message and socket.gethostname() in message
        assert "started 20" in message
        holder.send_signal(signal.SIGKILL)  # the forked child lives on; the lock must go with its holder
        holder.wait(timeout=30)
        fd = acquire_run_lock(run_dir)
        assert fd is not None and f'"pid": {os.getpid()}' in (tmp_path / "run" / LOCK_FILE).read_text()
        release_run_lock(fd)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # the holder's session: the forked child too
        holder.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ SLURM

@pytest.mark.parametrize("nodelist,first", [
    ("node[01-04],other", "node01"), ("node[07,01-04]", "node07"), ("gpu-a[003,005-007],gpu-b1", "gpu-a003"),
    ("rack[1-2]-n[3-4]", "rack1-n3"), ("alpha,beta", "alpha"), ("single", "single"),
])
def test_first_slurm_host_expands_without_scontrol(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_variables_give_rank_world_and_rendezvous():
    srun = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
            "SLURM_JOB_NODELIST": "node[01-04],other", "SLURM_NTASKS_PER_NODE": "2"}
    assert slurm_launch_env(srun) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                      "MASTER_ADDR": "node01", "MASTER_PORT": str(slurm_port("123456"))}
    assert slurm_port("123456") == slurm_port("123456") != slurm_port("123457")
    # the step's own node list wins over the job's (a step may run on part of the allocation)
    assert slurm_launch_env({**srun, "SLURM_STEP_NODELIST": "node[03-04]"})["MASTER_ADDR"] == "node03"
    # a user's MASTER_ADDR / MASTER_PORT and, above all, a launcher's own variables win
    assert "MASTER_ADDR" not in slurm_launch_env({**srun, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert slurm_launch_env({**srun, "RANK": "0", "WORLD_SIZE": "2"}) == {}
    assert slurm_launch_env({"LOCAL_RANK": "0"}) == {}  # not a SLURM task


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("override,key", [
    ("optim.lr.init=nan", "optim.lr.init"), ("optim.lr.init=-1e-4", "optim.lr.init"),
    ("optim.lr.init=.inf", "optim.lr.init"), ("optim.lr.min_lr=-1", "optim.lr.min_lr"),
    ("optim.lr.warmup_proportion=1.5", "optim.lr.warmup_proportion"), ("optim.lr.warmup_steps=-3",
                                                                      "optim.lr.warmup_steps"),
    ("optim.lr_mult.text_tower=nan", "optim.lr_mult.text_tower"), ("optim.param.betas=[0.9,1.0]",
                                                                   "optim.param.betas[1]"),
    ("optim.param.weight_decay=nan", "optim.param.weight_decay"), ("optim.grad_clip=-1", "optim.grad_clip"),
    ("ckpt.step_interval=0", "ckpt.step_interval"), ("log.interval_train=0", "log.interval_train"),
    ("runner.collective_timeout=-5", "runner.collective_timeout"),
    ("runner.collective_timeout=nan", "runner.collective_timeout"),
    ("runner.preempt_timeout=0", "runner.preempt_timeout"), ("data.loader_timeout=-1", "data.loader_timeout"),
    ("runner.train_steps=-2", "runner.train_steps"), ("epoch=0", "epoch"),
])
def test_values_that_can_only_fail_later_are_refused_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(DEMO, ["data.train_steps=-1", "runner.train_steps=-1", override])


def test_unset_run_length_keeps_its_meaning():
    # -1 is the documented "not set": the run length comes from epoch (or data.train_steps)
    cfg = load_config(DEMO, ["runner.train_steps=-1", "epoch=3", "optim.lr.init=0"])
    assert cfg.runner.train_steps == -1 and cfg.epoch == 3
    assert load_config(DEMO, ["runner.train_steps=5", "epoch=0"]).epoch == 0  # train_steps decides


def test_a_config_error_exits_2_before_anything_runs(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "zvl_ds", "train.py"), "--cfg", DEMO,
                           "optim.lr.init=nan", f"ckpt.dir={tmp_path}"], env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "optim.lr.init" in done.stderr and "Traceback" not in done.stderr
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------ weights

def test_local_weights_finite_finds_one_bad_value_in_any_dtype():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
    module.register_parameter("empty", torch.nn.Parameter(torch.empty(0)))
    assert local_weights_finite(module)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with torch.no_grad():
            module[1].weight[1, 2] = bad
        assert not local_weights_finite(module)
        with torch.no_grad():
            module[1].weight[1, 2] = 0.5
        assert local_weights_finite(module)


def test_a_worker_closes_only_the_lock_never_a_reused_descriptor(tmp_path):
    """The lock's descriptor closed in this process and its number reused (here by a pipe): a forked loader worker's
    close_inherited_locks must leave the pipe alone (closing it hung the next DataLoader)."""
    from zvl_ds.runtime import run_lock

    fd = acquire_run_lock(str(tmp_path / "run"))
    os.close(fd)  # closed behind the lock's back: the number is free again
    read_end, write_end = os.pipe()
    reused = read_end if read_end == fd else write_end if write_end == fd else None
    try:
        if reused is None:
            pytest.skip("the operating system gave the pipe other descriptor numbers")
        run_lock.close_inherited_locks()
        os.fstat(reused)  # still open: raises OSError if the worker-side clean-up closed it
    finally:
        for end in (read_end, write_end):
            try:
                os.close(end)
            except OSError:
                pass
