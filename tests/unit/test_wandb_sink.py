"""The W&B sink's checks that need no W&B run: the package test before anything is built, and the run record."""
import sys

import pytest

from zvl_ds.config import ConfigError, load_config
from zvl_ds.runtime.wandb_sink import RUN_RECORD, new_run_id, read_run_record, require_wandb


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
