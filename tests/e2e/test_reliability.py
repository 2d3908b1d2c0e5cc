"""Faults planted on purpose: a rank that raises, a full disk on one rank, a damaged checkpoint, bad paths
(the single-process parts: tests/unit/test_reliability.py).

Each distributed case runs the real entry point under a real launcher (2 CPU ranks, gloo) through a small
wrapper script that plants the fault in one rank only, then checks what users see: the exit codes, the
message, how long the job took to end, and what is left on disk.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers.dist_utils import free_port
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from tests.helpers.training_runs import BIN, TRAIN, common_args
from zvl_ds.base.cli import run
from zvl_ds.runtime.checkpoint import CheckpointError, find_resume_point, refuse_overwrite

# Plants one fault, chosen by ZVL_TEST_FAULT, in one rank, then runs the trainer as zvl_ds/train.py would.
# ZVL_TEST_FAULT_MARK receives the time the fault fired, so the test can measure how long the job took to end.
FAULTY_TRAIN = '''
import errno, os, sys, time

import torch

from zvl_ds import train
from zvl_ds.base.cli import run

FAULT, RANK = os.environ["ZVL_TEST_FAULT"], int(os.environ["RANK"])


def mark():
    with open(os.environ["ZVL_TEST_FAULT_MARK"], "w") as handle:
        handle.write(repr(time.time()))


if FAULT == "step" and RANK == 1:
    original_batch = train.Trainer._to_step_batch

    def to_step_batch(self, batch):
        if self.step == 3:
            mark()
            raise RuntimeError("planted fault on rank 1 at step 3")
        return original_batch(self, batch)

    train.Trainer._to_step_batch = to_step_batch

if FAULT == "stop" and RANK == 1:  # a hung rank: stopped by SIGSTOP before its step 3, never resumed
    import signal

    original_stop_batch = train.Trainer._to_step_batch

    def stop_at_step_3(self, batch):
        if self.step == 3:
            with open(os.environ["ZVL_TEST_FAULT_MARK"] + ".pid", "w") as handle:
                handle.write(str(os.getpid()))
            mark()
            os.kill(os.getpid(), signal.SIGSTOP)
        return original_stop_batch(self, batch)

    train.Trainer._to_step_batch = stop_at_step_3

if FAULT == "eval" and RANK == 0:
    from zvl_ds.evaluation import embed

    def metrics(self, *args, **kwargs):
        mark()
        raise ValueError("planted fault in rank 0's ranking")

    embed.EmbeddedSet.metrics = metrics

if FAULT == "enospc" and RANK == 1:
    original_save = torch.save

    def save(obj, target, *args, **kwargs):
        if "step_00000004" in str(target) and "zvl_rank_" in str(target):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return original_save(obj, target, *args, **kwargs)

    torch.save = save

sys.exit(run(train.main))
'''

QUIET = ["data.enable_valid=false", "log.tensorboard=false", "runner.val_interval_steps=1000"]


def launch(launcher, script, args):
    if launcher == "deepspeed":
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port",
                str(free_port()), script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), script, *args]


def run_with_fault(tmp_path, launcher, fault, args):
    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN)
    mark = tmp_path / f"fault_{fault}.time"
    variables = dict(child_env(), ZVL_TEST_FAULT=fault, ZVL_TEST_FAULT_MARK=str(mark))
    done = subprocess.run(launch(launcher, str(script), args), env=variables, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    ended = time.time()
    fired = float(mark.read_text()) if mark.exists() else None
    return done, fired, ended


# ------------------------------------------------------------------------------------------------ hangs

@pytest.mark.parametrize("launcher,fault,message", [
    ("deepspeed", "step", "planted fault on rank 1 at step 3"),
    ("torchrun", "eval", "planted fault in rank 0's ranking"),
])
def test_a_failing_rank_ends_every_rank_within_a_minute(shards, tmp_path, launcher, fault, message):
    extra = ["data.enable_valid=true", "runner.val_interval_steps=2"] if fault == "eval" else QUIET
    done, fired, ended = run_with_fault(tmp_path, launcher, fault, common_args(shards, tmp_path, "run", 6, extra))
    output = done.stdout + done.stderr
    assert fired is not None, "the planted fault never fired: " + output[-3000:]
    assert ended - fired < 60, f"the job took {ended - fired:.0f} s to end after the fault"
    assert done.returncode != 0
    assert message in output, output[-3000:]
    if fault == "eval":  # rank 1 learns rank 0's error instead of waiting for numbers that never come
        assert "[rank 1]" in output and "evaluation of demo_val failed on rank 0" in output, output[-3000:]


# Long enough that no legitimate collective of a loaded 2-core machine waits this long (ranks out of step at start
# up, a first batch), short enough not to stretch the suite.
COLLECTIVE_TIMEOUT_S = 10


def _has_ended(worker) -> bool:
    import psutil

    try:
        return worker.status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped by the launcher
    except psutil.NoSuchProcess:
        return True


def test_a_hung_rank_fails_the_others_after_the_collective_timeout(shards, tmp_path):
    import signal

    from tests.helpers.training_runs import kill_tree, rank_process

    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN)
    mark = tmp_path / "fault_stop.time"
    log = tmp_path / "job.log"  # a file, not a pipe: nothing reads the job's output while it runs
    args = common_args(shards, tmp_path, "run", 6, QUIET + [f"runner.collective_timeout={COLLECTIVE_TIMEOUT_S}"])
    with open(log, "w") as output_file:
        process = subprocess.Popen(launch("torchrun", str(script), args), cwd=tmp_path, text=True,
                                   env=dict(child_env(), ZVL_TEST_FAULT="stop", ZVL_TEST_FAULT_MARK=str(mark)),
                                   stdout=output_file, stderr=subprocess.STDOUT)
    # bounded here too: without the collective timeout the job would wait 600 s or forever
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT_S + 240
    ended = None
    try:
        rank_0 = None
        while rank_0 is None and process.poll() is None:
            assert time.monotonic() < deadline, "no rank 0 worker started"
            try:
                rank_0 = rank_process(process.pid, 0)
            except AssertionError:  # not started yet
                time.sleep(0.05)
        # the others (rank 0) are what the collective timeout ends; the launcher afterwards takes its own grace
        # period (30 s) to end the stopped rank, which cannot act on its SIGTERM: the test ends that rank instead
        while rank_0 is not None and not _has_ended(rank_0) and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = time.time()
    finally:  # the stopped rank must not outlive the test
        pid_file = tmp_path / "fault_stop.time.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            kill_tree(process)
    output = log.read_text()
    assert mark.exists(), "rank 1 never stopped: " + output[-3000:]
    took = ended - float(mark.read_text())
    print(f"rank 0 ended {took:.0f} s after rank 1 was stopped")  # shown with pytest -s
    assert process.returncode != 0, f"exit code 0 {took:.0f} s after rank 1 was stopped: " + output[-3000:]
    # rank 0 waits in the step's all-reduce for the stopped rank: no earlier than the timeout, and not forever
    assert COLLECTIVE_TIMEOUT_S - 1 <= took < COLLECTIVE_TIMEOUT_S + 120, \
        f"rank 0 ended {took:.0f} s after rank 1 hung: " + output[-3000:]
    assert "timed out" in output.lower() or "timeout" in output.lower(), output[-3000:]


# ------------------------------------------------------------------------------------------------ checkpoints

def test_full_disk_on_one_rank_keeps_latest_and_resume_refuses_a_damaged_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    args = common_args(shards, tmp_path, "run", 4, [*QUIET, "ckpt.step_interval=2", "ckpt.keep_last=1",
                                                    "log.record_sample_keys=true"])
    done, fired, _ = run_with_fault(tmp_path, "torchrun", "enospc", args)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]  # torchrun exits 1 whatever its workers' codes were
    assert "error: [rank 0] checkpoint step_00000004" in output and "error: [rank 1] checkpoint" in output
    assert "rank 1: OSError" in output and "No space left on device" in output, output[-3000:]
    assert "checkpoint step_00000004" in output and "still names step_00000002" in output
    assert (run_dir / "latest").read_text().strip() == "step_00000002"
    assert find_resume_point(str(run_dir), None, True).tag == "step_00000002"  # complete, as its manifest says
    manifest = json.loads((run_dir / "step_00000002" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"zvl_rank_00000.pt", "zvl_rank_00001.pt"} <= set(manifest["files"])
    assert not list(run_dir.glob("step_00000004/*.tmp"))

    # the failed attempt's step_00000004 is cleared before it is written again: no stray file survives
    (run_dir / "step_00000004" / "stray_from_the_failed_attempt").write_text("x")
    again = subprocess.run(launch("torchrun", TRAIN, args), env=child_env(), capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "at step 2" in again.stdout
    assert (run_dir / "latest").read_text().strip() == "step_00000004"
    assert not (run_dir / "step_00000004" / "stray_from_the_failed_attempt").exists()
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000004"]  # pruned only after success
    for rank in (0, 1):  # steps 2 and 3 ran twice, but each is recorded once
        rows = (run_dir / "sample_keys" / f"rank_{rank}.txt").read_text().splitlines()
        assert [int(row.split()[0]) for row in rows] == [0, 1, 2, 3]

    # a rank file deleted from the checkpoint is refused by name, not read as a change of world size
    os.remove(run_dir / "step_00000004" / "zvl_rank_00001.pt")
    with pytest.raises(CheckpointError, match=r"incomplete: zvl_rank_00001\.pt is missing"):
        find_resume_point(str(run_dir), None, True)
    # and a truncated one by its size
    (run_dir / "step_00000004" / "zvl_rank_00000.pt").write_bytes(b"short")
    with pytest.raises(CheckpointError, match=r"zvl_rank_00000\.pt has 5 bytes"):
        find_resume_point(str(run_dir), str(run_dir / "step_00000004"), False)


def test_starting_over_in_a_folder_with_checkpoints_needs_overwrite(shards, tmp_path):
    run_dir = tmp_path / "demo"
    (run_dir / "step_00000010").mkdir(parents=True)
    refuse_overwrite(str(run_dir), resumes=True, overwrite=False)  # resuming is fine
    refuse_overwrite(str(run_dir), resumes=False, overwrite=True)  # so is saying so
    refuse_overwrite(str(tmp_path / "fresh"), resumes=False, overwrite=False)  # nothing to lose
    done = subprocess.run([sys.executable, TRAIN, "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"),
                           f"ckpt.dir={tmp_path}", "data.exp_name=demo", "ckpt.auto_resume=false",
                           f"data.data_path={shards}"],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: " in done.stderr and "already holds checkpoints (step_00000010)" in done.stderr
    assert "ckpt.overwrite=true" in done.stderr and "Traceback" not in done.stderr
    assert (run_dir / "step_00000010").is_dir()


# ------------------------------------------------------------------------------------------------ exit path

def test_wrong_data_path_exits_2_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    from zvl_ds import train, trainer

    def built(*args, **kwargs):
        raise AssertionError("the model or the process group was set up before the data sources were checked")

    monkeypatch.setattr(trainer, "build_model", built)  # the Trainer builds the model
    monkeypatch.setattr(train.dist, "init_distributed", built)
    argv = ["--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), f"data.data_path={tmp_path / 'nowhere'}",
            f"ckpt.dir={tmp_path}"]
    assert run(lambda: train.main(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset ") and str(tmp_path / "nowhere") in err
    done = subprocess.run([sys.executable, TRAIN, *argv], env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(tmp_path / "nowhere") in done.stderr


# ------------------------------------------------------------------------------------------------ make_shards

def test_make_shards_out_is_a_file_exits_2(tmp_path):
    from tests.unit.test_shards import make_dataset

    make_dataset(tmp_path / "data", images=2)
    (tmp_path / "out").write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "zvl_ds.make_shards", "--data-root",
                           str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "out"), "--quiet"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is a file" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out").read_text() == "not a folder"
