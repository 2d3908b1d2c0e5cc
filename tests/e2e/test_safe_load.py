"""Checkpoint files are read with the weights-only unpickler before DeepSpeed (which unpickles anything) opens
them: a crafted file is refused by name and its payload never runs, here by the training entry point (the crafted
file and the check itself: tests/unit/test_safe_load.py)."""
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT
from tests.unit.test_safe_load import crafted_run

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")


@pytest.mark.parametrize("how", ["resume_ckpt_path", "auto_resume_evaluate"])
def test_training_refuses_to_resume_from_a_crafted_checkpoint(shards, tmp_path, how):
    marker = tmp_path / "pwned"
    tag_dir = crafted_run(tmp_path, marker)
    args = [f"ckpt.dir={tmp_path}", "data.exp_name=run", "device=cpu", "evaluate=true", f"data.data_path={shards}"]
    if how == "resume_ckpt_path":
        args += [f"resume_ckpt_path={tag_dir}", "data.exp_name=other"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, TRAIN, "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"{tag_dir}/mp_rank_00_model_states.pt cannot be read as a weights-only" in done.stderr, done.stderr[-3000:]
    assert "ckpt.trust_checkpoint=true" in done.stderr
    assert not marker.exists()
