"""Checkpoint files are read with the weights-only unpickler before DeepSpeed (which unpickles anything) opens
them: a crafted file is refused by name and its payload never runs (the training entry point refusing one:
tests/e2e/test_safe_load.py)."""
import pytest
import torch


class CreatesAFile:
    """Unpickling this calls ``open(path, "w")``: the file appearing proves that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def crafted_run(root, marker):
    """A run folder whose checkpoint's model-states file runs code when unpickled."""
    tag_dir = root / "run" / "step_00000002"
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "payload": CreatesAFile(str(marker))},
               tag_dir / "mp_rank_00_model_states.pt")
    (root / "run" / "latest").write_text("step_00000002")
    return tag_dir


def test_the_payload_is_real(tmp_path):
    marker = tmp_path / "pwned"
    tag_dir = crafted_run(tmp_path, marker)
    torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)  # what DeepSpeed's loader does
    assert marker.exists()


def test_check_refuses_a_crafted_file_by_name_without_running_it(tmp_path):
    from zvl_ds.base.errors import UserError
    from zvl_ds.model.safe_load import check_checkpoint_folder

    marker = tmp_path / "pwned"
    tag_dir = crafted_run(tmp_path, marker)
    (tag_dir / "zero").mkdir()  # files in sub-folders (the universal format) are checked too
    torch.save({"param": torch.ones(3)}, tag_dir / "zero" / "fp32.pt")
    with pytest.raises(UserError, match=r"mp_rank_00_model_states\.pt cannot be read as a weights-only"):
        check_checkpoint_folder(str(tag_dir), opt_out="set x")
    assert not marker.exists()
    (tag_dir / "mp_rank_00_model_states.pt").unlink()
    torch.save({"payload": CreatesAFile(str(marker))}, tag_dir / "zero" / "fp32.pt")
    with pytest.raises(UserError, match=r"zero/fp32\.pt cannot be read"):
        check_checkpoint_folder(str(tag_dir))
    assert not marker.exists()
