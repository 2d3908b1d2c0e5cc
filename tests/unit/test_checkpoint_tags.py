"""Checkpoint bookkeeping in a run folder: tags, pruning, the "latest" pointer and where a run resumes."""
import os

import pytest

from zvl_ds.runtime.checkpoint import (CheckpointError, find_resume_point, list_tags, prune_checkpoints, read_latest,
                               tag_for_step)


def make_tags(run_dir, steps, latest):
    for step in steps:
        os.makedirs(os.path.join(run_dir, tag_for_step(step)))
    with open(os.path.join(run_dir, "latest"), "w") as handle:
        handle.write(tag_for_step(latest))


def test_prune_keeps_last_and_never_latest(tmp_path):
    make_tags(str(tmp_path), [10, 20, 30, 40], latest=20)
    removed = prune_checkpoints(str(tmp_path), keep_last=2)
    assert removed == ["step_00000010"]
    assert list_tags(str(tmp_path)) == ["step_00000020", "step_00000030", "step_00000040"]


def test_resume_point_rules(tmp_path):
    run = str(tmp_path / "run")
    assert find_resume_point(run, None, auto_resume=True) is None
    make_tags(run, [5, 10], latest=10)
    assert find_resume_point(run, None, auto_resume=True).tag == "step_00000010"
    assert find_resume_point(run, None, auto_resume=False) is None
    explicit = find_resume_point("/elsewhere", os.path.join(run, "step_00000005"), auto_resume=True)
    assert (explicit.run_dir, explicit.tag) == (run, "step_00000005")
    with pytest.raises(CheckpointError, match="neither a run folder"):
        find_resume_point(run, str(tmp_path), auto_resume=True)
    with open(os.path.join(run, "latest"), "w") as handle:
        handle.write("step_00000099")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_latest(run)
