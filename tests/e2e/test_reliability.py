"""Faults planted on purpose: a rank that raises, a full disk on one rank, a damaged checkpoint, bad paths.

Each distributed case runs the real entry point under a real launcher (2 CPU ranks, gloo) through a small
wrapper script that plants the fault in one rank only, then checks what users see: the exit codes, the
message, how long the job took to end, and what is left on disk.
"""
import errno
import io
import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers.paths import REPO_ROOT
from tests.helpers.dist_utils import free_port
from tests.e2e.test_train import BIN, TRAIN, common_args
from tests.helpers.processes import child_env
from zvl_ds.base.atomic_write import atomic_folder, atomic_path
from zvl_ds.runtime.checkpoint import CheckpointError, find_resume_point, refuse_overwrite
from zvl_ds.base.cli import run
from zvl_ds.base.errors import UserError
from zvl_ds.observe.records import drop_rows_after

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


COLLECTIVE_TIMEOUT_S = 20


def test_a_hung_rank_fails_the_others_after_the_collective_timeout(shards, tmp_path):
    import signal

    from tests.e2e.test_train import kill_tree

    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN)
    mark = tmp_path / "fault_stop.time"
    args = common_args(shards, tmp_path, "run", 6, QUIET + [f"runner.collective_timeout={COLLECTIVE_TIMEOUT_S}"])
    process = subprocess.Popen(launch("torchrun", str(script), args), cwd=tmp_path, text=True,
                               env=dict(child_env(), ZVL_TEST_FAULT="stop", ZVL_TEST_FAULT_MARK=str(mark)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # bounded here too: without the collective timeout the job would wait 600 s or forever
        stdout, stderr = process.communicate(timeout=COLLECTIVE_TIMEOUT_S + 240)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
    finally:  # the stopped rank cannot act on the launcher's SIGTERM; make sure it does not outlive the test
        pid_file = tmp_path / "fault_stop.time.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    ended = time.time()
    output = stdout + stderr
    assert mark.exists(), "rank 1 never stopped: " + output[-3000:]
    took = ended - float(mark.read_text())
    print(f"the job ended {took:.0f} s after rank 1 was stopped")  # shown with pytest -s
    assert process.returncode != 0, f"exit code 0 {took:.0f} s after rank 1 was stopped: " + output[-3000:]
    # rank 0 waits in the step's all-reduce for the stopped rank: no earlier than the timeout, and not forever
    # (the launcher then takes its own grace period to end the stopped rank)
    assert COLLECTIVE_TIMEOUT_S - 1 <= took < COLLECTIVE_TIMEOUT_S + 120, \
        f"the job ended {took:.0f} s after rank 1 hung: " + output[-3000:]
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


# ------------------------------------------------------------------------------------------------ records

def test_rows_after_the_resume_step_are_dropped(tmp_path):
    (tmp_path / "sample_keys").mkdir()
    keys = tmp_path / "sample_keys" / "rank_1.txt"
    keys.write_text("0 a b\n1 c d\n2 e f\n3 g h\n4 i")  # the last row was cut off by a kill
    metrics = tmp_path / "eval_metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "demo": {"rsum": s}}) + "\n" for s in (2, 4, 6)))
    drop_rows_after(str(tmp_path), 4, rank=1, main_process=True)
    assert keys.read_text() == "0 a b\n1 c d\n2 e f\n3 g h\n"  # steps 4.. are replayed after the resume
    assert [json.loads(row)["step"] for row in metrics.read_text().splitlines()] == [2, 4]
    drop_rows_after(str(tmp_path), 2, rank=0, main_process=False)  # another rank's file, not rank 0's metrics
    assert keys.read_text() == "0 a b\n1 c d\n2 e f\n3 g h\n"
    assert len(metrics.read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------------ atomic writes

def test_atomic_path_removes_its_temp_file_on_error(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(OSError, match="No space"):
        with atomic_path(str(target)) as temp, open(temp, "w") as handle:
            handle.write("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_folder_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "tokenizer"
    target.mkdir()
    (target / "vocab.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(str(target)) as temp:
            (tmp_path / "tokenizer.tmp" / "vocab.txt").write_text("half")
            assert temp == str(tmp_path / "tokenizer.tmp")
            raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(tmp_path)) == ["tokenizer"] and (target / "vocab.txt").read_text() == "old"
    with atomic_folder(str(target)) as temp:
        (tmp_path / "tokenizer.tmp" / "tokenizer.json").write_text("new")
    assert os.listdir(target) == ["tokenizer.json"] and sorted(os.listdir(tmp_path)) == ["tokenizer"]


# ------------------------------------------------------------------------------------------------ exit path

def test_run_turns_user_errors_into_one_line_and_exit_2(capsys):
    def wrong_input():
        raise UserError("data.data_path: /nowhere does not exist")

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "/out/shard.tar")

    def bug():
        raise KeyError("a bug keeps its traceback")

    assert run(wrong_input) == 2
    assert capsys.readouterr().err == "error: data.data_path: /nowhere does not exist\n"
    assert run(full_disk) == 2
    assert capsys.readouterr().err == "error: No space left on device (/out/shard.tar)\n"
    with pytest.raises(KeyError):
        run(bug)
    assert run(lambda: 0) == 0 and run(lambda: None) == 0 and run(lambda: 1) == 1


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


def test_img2dataset_folder_names_the_key_that_selects_it(tmp_path):
    from zvl_ds.config import DataConfig
    from zvl_ds.data.sources import DataSourceError, resolve_dataset

    folder = tmp_path / "cc3m"
    folder.mkdir()
    for index in range(2):  # img2dataset names its shards 00000.tar, 00001.tar, ... with no split prefix
        (folder / f"{index:05d}.tar").write_bytes(b"")
    for data_path in (str(tmp_path), str(folder)):  # the parent folder, or the img2dataset folder itself
        with pytest.raises(DataSourceError, match=r"without a split prefix .*data\.datasets\.cc3m\.shards="):
            resolve_dataset(DataConfig(data_path=data_path), "cc3m", ["train"])
    # following the advice works
    from zvl_ds.config import load_config

    cfg = load_config(os.path.join(REPO_ROOT, "configs", "demo.yaml"),
                      [f"data.data_path={folder}", f"data.datasets.cc3m.shards={folder}", "data.datasets.cc3m.size=2"])
    assert resolve_dataset(cfg.data, "cc3m", ["train"]).shards == (str(folder / "00000.tar"),
                                                                    str(folder / "00001.tar"))


# ------------------------------------------------------------------------------------------------ make_shards

def _make_shards_cli():
    from zvl_ds import make_shards

    return make_shards


def test_make_shards_out_is_a_file_exits_2(tmp_path):
    from tests.unit.test_shards import make_dataset

    make_dataset(tmp_path / "data", images=2)
    (tmp_path / "out").write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "zvl_ds.make_shards", "--data-root",
                           str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "out"), "--quiet"],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is a file" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out").read_text() == "not a folder"


def test_make_shards_full_disk_exits_2_and_keeps_finished_shards(tmp_path, monkeypatch):
    import tarfile

    from tests.unit.test_shards import make_dataset

    make_dataset(tmp_path / "data", images=6)
    cli = _make_shards_cli()
    written = {"members": 0}
    original = tarfile.TarFile.addfile

    def addfile(self, *args, **kwargs):  # the disk fills up in the middle of the second shard
        written["members"] += 1
        if written["members"] > 8:
            raise OSError(errno.ENOSPC, "No space left on device", self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    args = ["--data-root", str(tmp_path / "data"), "--dataset", "ds", "--out", str(tmp_path / "out"),
            "--samples-per-shard", "2", "--quiet"]
    assert run(lambda: cli.main(args)) == 2
    assert "No space left on device" in stderr.getvalue()
    monkeypatch.undo()
    out = tmp_path / "out" / "ds"
    finished = sorted(p.name for p in out.glob("train-*.tar"))
    assert finished and not list(out.glob("*.tmp"))
    with tarfile.open(out / finished[0]) as archive:  # a finished shard is whole
        assert len(archive.getnames()) >= 2
