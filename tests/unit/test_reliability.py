"""Faults planted on purpose, the single-process parts (the runs under launchers are in tests/e2e/test_reliability.py):
records cut back to a resume step, atomic writes, the one exit path, an img2dataset folder named by its key, and a
full disk under make_shards."""
import errno
import io
import json
import os
import sys

import pytest

from tests.helpers.paths import REPO_ROOT
from zvl_ds.base.atomic_write import atomic_folder, atomic_path
from zvl_ds.base.cli import run
from zvl_ds.base.errors import UserError
from zvl_ds.observe.records import drop_rows_after


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
