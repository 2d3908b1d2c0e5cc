"""The W&B sink's checks that need no W&B run: the package test before anything is built, and the run record."""
import sys

import pytest

from zvl_ds.config import ConfigError, load_config
from zvl_ds.observe.wandb_sink import RUN_RECORD, new_run_id, read_run_record, require_wandb


def test_wandb_is_required_only_when_enabled(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as for a missing package
    require_wandb(load_config(None))  # TensorBoard alone: wandb is not needed
    with pytest.raises(ConfigError, match=r"wandb.enable=true but the wandb package cannot be imported .*\.\[wandb\]"):
        require_wandb(load_config(None, ["wandb.enable=true"]))


def test_run_record_round_trip_and_a_damaged_record_named(tmp_path):
    assert read_run_record(str(tmp_path)) is None  # a folder's first W&B run
    (tmp_path / RUN_RECORD).write_text('{"id": "abc12345", "last_step": 7}')
    assert read_run_record(str(tmp_path)) == {"id": "abc12345", "last_step": 7}
    (tmp_path / RUN_RECORD).write_text('{"last_step": 7')
    with pytest.raises(ConfigError, match=rf"{RUN_RECORD}: not a W&B run record .*remove it"):
        read_run_record(str(tmp_path))


def test_new_run_ids_have_wandbs_form_and_differ():
    ids = {new_run_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 8 and i.isalnum() and i == i.lower() for i in ids)


@pytest.mark.slow
def test_a_resume_continues_the_recorded_run_and_a_fresh_start_begins_a_new_one(tmp_path, monkeypatch):
    """Real offline W&B runs opened by the sink, read back from their files."""
    pytest.importorskip("wandb")  # the optional extra; CI installs it
    from tests.helpers import wandb_files
    from zvl_ds.observe.wandb_sink import WandbSink

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of this process alone
    (tmp_path / "wandb_files").mkdir()
    run_dir = str(tmp_path / "run")
    cfg = load_config(None, ["wandb.enable=true", "wandb.mode=offline", "data.exp_name=sink"])

    def session(resuming, steps):
        sink = WandbSink.open(cfg, run_dir, resuming)
        for step in steps:
            sink.scalars(step, {"train/loss": 1.0 / step, "absent": None})
        sink.close()
        return read_run_record(run_dir)["id"]

    first = session(False, [1, 2, 3])
    assert session(True, [2, 3, 4]) == first  # resumed from a step-1 checkpoint: 2 and 3 are replays
    fresh = session(False, [1, 2])  # started from scratch in the same folder (ckpt.overwrite)
    assert fresh != first
    steps = [[row["_step"] for row in wandb_files.history(folder)]
             for folder in wandb_files.offline_runs(str(tmp_path / "wandb_files"), first)]
    assert steps == [[1, 2, 3], [4]]
    (fresh_folder,) = wandb_files.offline_runs(str(tmp_path / "wandb_files"), fresh)
    assert [row["train/loss"] for row in wandb_files.history(fresh_folder)] == [1.0, 0.5]
    assert read_run_record(run_dir) == {"id": fresh, "last_step": 2}
