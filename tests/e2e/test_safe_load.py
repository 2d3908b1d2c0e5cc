"""Checkpoint files are read with the weights-only unpickler before DeepSpeed (which unpickles anything) opens
them: a crafted file is refused by name and its payload never runs, here by the training entry point (the crafted
file and the check itself: tests/unit/test_safe_load.py)."""
import os
import sys

import pytest

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import run_side_by_side
from tests.unit.test_safe_load import crafted_run

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")


WAYS = ["resume_ckpt_path", "auto_resume_evaluate"]


@pytest.fixture(scope="module")
def refused_resumes(shards, tmp_path_factory):
    """{how: (crafted step folder, payload marker, finished process)}: train.py asked to resume from a crafted
    checkpoint each way, the two runs side by side."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    crafted, commands = {}, {}
    for how in WAYS:
        root = tmp_path_factory.mktemp(how)
        marker = root / "pwned"
        tag_dir = crafted_run(root, marker)
        args = [f"ckpt.dir={root}", "data.exp_name=run", "device=cpu", "evaluate=true", f"data.data_path={shards}"]
        if how == "resume_ckpt_path":
            args += [f"resume_ckpt_path={tag_dir}", "data.exp_name=other"]
        crafted[how] = (tag_dir, marker)
        commands[how] = [sys.executable, TRAIN, "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), *args]
    done = run_side_by_side(commands, timeout=300, env=env)
    return {how: (*crafted[how], done[how]) for how in WAYS}


@pytest.mark.parametrize("how", WAYS)
def test_training_refuses_to_resume_from_a_crafted_checkpoint(refused_resumes, how):
    tag_dir, marker, done = refused_resumes[how]
    assert done.returncode != 0
    assert f"{tag_dir}/mp_rank_00_model_states.pt cannot be read as a weights-only" in done.stderr, done.stderr[-3000:]
    assert "ckpt.trust_checkpoint=true" in done.stderr
    assert not marker.exists()
