"""Preemption, planted from outside: SIGTERM to a launcher's whole process group or to one rank, SIGUSR1 to
SLURM tasks (started as ``srun`` starts them, with SLURM's variables and no launcher), a second signal and a grace
period that runs out. The run saves one complete checkpoint and exits with 75; started again, it continues
exactly: its sample keys and final parameters equal an uninterrupted run's."""
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.processes import child_env
from tests.helpers.training_runs import (RESUMABLE, RESUMABLE_STEPS, TRAIN, command, common_args, final_weights,
                                         keys_by_step, rank_process, wait_for_steps)
from zvl_ds.runtime.dist import slurm_port
from zvl_ds.runtime.preemption import PREEMPTED_EXIT_CODE, REPEAT_WINDOW_S

# the uninterrupted runs these are compared with are made once per session (the `straight` fixture, conftest.py)
STEPS = RESUMABLE_STEPS
EXTRA = RESUMABLE


def assert_continues_exactly(run_dir, straight_dir, world_size):
    tag_a, weights_a = final_weights(straight_dir)
    tag_b, weights_b = final_weights(run_dir)
    assert tag_a == tag_b == f"step_{STEPS:08d}"
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), f"{name} differs after the preemption and resume"
    for rank in range(world_size):
        expected = keys_by_step(straight_dir, rank)
        assert len(expected) == STEPS and keys_by_step(run_dir, rank) == expected


def preempted_then_resumed(shards, tmp_path, launcher, nproc, target, signum=signal.SIGTERM):
    """Start a run, signal it mid-run, check the preemption checkpoint, then start the same command again."""
    args = common_args(shards, tmp_path, "run", STEPS, EXTRA)
    run_dir = str(tmp_path / "run")
    process = subprocess.Popen(command(launcher, nproc, args), env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        wait_for_steps(run_dir, 3, [process])
        if target == "group":  # what a scheduler does: every process of the job (launcher, ranks, loader workers)
            os.killpg(process.pid, signum)
        else:
            rank_process(process.pid, target).send_signal(signum)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = out + err
    latest = open(os.path.join(run_dir, "latest")).read().strip()
    stopped_at = int(latest.split("_")[1])
    assert 3 <= stopped_at < STEPS, output[-3000:]
    assert f"stopped after step {stopped_at}; checkpoint {run_dir}/{latest} is complete" in output, output[-3000:]
    assert f"Exiting with code {PREEMPTED_EXIT_CODE}" in output
    assert "error: " not in output, output[-3000:]  # no rank failed (torchrun alone reports a worker's exit 75)
    assert launcher == "torchrun" or "Traceback" not in output, output[-3000:]
    again = subprocess.run(command(launcher, nproc, args), env=child_env(), capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {run_dir}/{latest} at step {stopped_at}" in again.stdout
    return process.returncode, output, run_dir


@pytest.mark.parametrize("launcher,nproc,target", [
    ("deepspeed", 2, "group"), ("torchrun", 2, 1), ("deepspeed", 1, 0), ("torchrun", 1, "group"),
])
def test_sigterm_saves_once_and_the_resumed_run_continues_exactly(shards, tmp_path, straight, launcher, nproc,
                                                                    target):
    code, output, run_dir = preempted_then_resumed(shards, tmp_path, launcher, nproc, target)
    if target != "group":  # only the launcher's own exit code is left when the launcher itself got the signal
        assert code == PREEMPTED_EXIT_CODE or launcher == "torchrun", output[-3000:]  # torchrun exits 1 then
    if target == 1:  # the signal reached rank 1 only: rank 0 learned of it at the step boundary
        assert "[rank 1] SIGTERM received" in output and "[rank 0] SIGTERM received" not in output.split(
            "is complete")[0]
    assert_continues_exactly(run_dir, straight(nproc), nproc)


def free_slurm_job_id():
    """A job id whose derived rendezvous port is free on this machine now."""
    for _ in range(200):
        job_id = str(random.randrange(1, 10 ** 6))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", slurm_port(job_id)))
            except OSError:
                continue
        return job_id
    raise AssertionError("no free port in the SLURM port range")


def srun_tasks(args, cwd, job_id):
    """Two tasks as ``srun --ntasks 2`` starts them on one node: SLURM's variables only, no launcher."""
    tasks = []
    for rank in range(2):
        variables = dict(child_env(), SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                         SLURM_NODEID="0", SLURM_JOB_ID=job_id, SLURM_NTASKS_PER_NODE="2",
                         SLURM_JOB_NODELIST="localhost,gpu-b[01-02]", SLURM_NODELIST="localhost,gpu-b[01-02]")
        for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            variables.pop(name, None)
        tasks.append(subprocess.Popen([sys.executable, TRAIN, *args], env=variables, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=cwd, start_new_session=True))
    return tasks


def finish(tasks, timeout=300):
    try:
        return [(task.returncode, out + err) for task, (out, err) in
                ((task, task.communicate(timeout=timeout)) for task in tasks)]
    finally:
        for task in tasks:
            if task.poll() is None:
                os.killpg(task.pid, signal.SIGKILL)


def test_slurm_tasks_are_ranks_of_one_job_and_usr1_then_requeue_continues_exactly(shards, tmp_path, straight):
    args = common_args(shards, tmp_path, "run", STEPS, EXTRA)
    run_dir = str(tmp_path / "run")
    tasks = srun_tasks(args, tmp_path, free_slurm_job_id())
    try:
        wait_for_steps(run_dir, 3, tasks)
    except AssertionError:
        finish(tasks, timeout=5)
        raise
    for task in tasks:  # sbatch --signal=USR1@<seconds> signals every task of the step
        task.send_signal(signal.SIGUSR1)
    results = finish(tasks)
    assert [code for code, _ in results] == [PREEMPTED_EXIT_CODE] * 2, results[0][1][-3000:] + results[1][1][-3000:]
    assert "2 ranks" in results[0][1] and "SIGUSR1 received (preemption)" in results[0][1]
    latest = open(os.path.join(run_dir, "latest")).read().strip()
    # the requeued job: the same command, the same job id
    again = finish(srun_tasks(args, tmp_path, free_slurm_job_id()), timeout=600)
    assert [code for code, _ in again] == [0, 0], again[0][1][-3000:] + again[1][1][-3000:]
    assert f"resumed from {run_dir}/{latest}" in again[0][1]
    assert_continues_exactly(run_dir, straight(2), 2)


# A save that takes long: the preemption checkpoint is still being written when the second signal or the end of
# the grace period comes (its files are written, its manifest and `latest` not yet).
SLOW_SAVE = '''
import os, sys, time
from zvl_ds import train
from zvl_ds.runtime import checkpoint

original, calls = checkpoint.write_manifest, []

def write_manifest(folder, world_size):
    calls.append(folder)
    if len(calls) > 1:  # every save after the first periodic one
        open(os.environ["ZVL_TEST_SAVING_MARK"], "w").close()
        time.sleep(120)
    return original(folder, world_size)

checkpoint.write_manifest = write_manifest
sys.exit(train.cli())
'''


@pytest.mark.parametrize("ending", ["second signal", "grace period"])
def test_a_second_signal_or_the_grace_period_ends_the_job_at_once_keeping_latest(shards, tmp_path, ending):
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE)
    mark = tmp_path / "saving"
    extra = [*EXTRA, "ckpt.step_interval=2", "runner.preempt_timeout=4" if ending == "grace period" else ""]
    args = [arg for arg in common_args(shards, tmp_path, "run", 40, extra) if arg]
    process = subprocess.Popen(command("python", 1, args, str(script)), env=dict(
        child_env(), ZVL_TEST_SAVING_MARK=str(mark)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path, start_new_session=True)
    run_dir = tmp_path / "run"
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "latest").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.05)
        first = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)
        while not mark.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.05)
        if ending == "second signal":
            time.sleep(max(0.0, first + REPEAT_WINDOW_S + 0.5 - time.monotonic()))
            first = time.monotonic()
            os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        took = time.monotonic() - first
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert took < (10 if ending == "grace period" else 5), f"{took:.1f} s"
    reason = "a second signal (SIGTERM)" if ending == "second signal" else "runner.preempt_timeout=4 s passed"
    assert f"error: [rank 0] {reason}" in err and "without a new checkpoint" in err, err[-3000:]
    assert (run_dir / "latest").read_text().strip() == "step_00000002"
