"""Resuming on another world size (docs/workflow.md): ZeRO-1 re-splits its optimizer state, ZeRO-3 loads the
weights only and says so. A 2-rank run under torchrun, continued by one process (ZeRO-2: tests/e2e/test_train.py)."""
import os
import subprocess
import sys

import torch

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from tests.helpers.training_runs import TRAIN, common_args, torchrun

QUIET = ["data.enable_valid=false", "log.tensorboard=false", "runner.val_interval_steps=1000",
         "data.batch_size=8", "data.batch_size_train=4", "optim.lr.name=constant"]


def run_training(command, tmp_path):
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def args_for(stage, shards, tmp_path, steps, extra=()):
    args = common_args(shards, tmp_path, f"zero{stage}", steps, QUIET + list(extra))
    args[1] = os.path.join(REPO_ROOT, "ds_configs", f"zero{stage}.json")
    return args


def test_zero1_resumed_on_one_rank_re_splits_its_optimizer_state(shards, tmp_path):
    run_training(torchrun(args_for(1, shards, tmp_path, 2)), tmp_path)
    output = run_training([sys.executable, TRAIN, *args_for(1, shards, tmp_path, 3)], tmp_path)
    assert "optimizer state re-split for this world size" in output and "at step 2" in output, output[-3000:]
    optim = torch.load(tmp_path / "zero1" / "step_00000003" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       map_location="cpu", weights_only=False)["optimizer_state_dict"]  # our own checkpoint
    adam_steps = {int(state["step"]) for state in optim["base_optimizer_state"]["state"].values()}
    assert adam_steps == {3}, f"Adam restarted instead of continuing: steps {adam_steps}"


def test_zero3_resumed_on_one_rank_loads_the_weights_only_and_says_so(shards, tmp_path):
    from zvl_ds.model.saved_run import load_run

    run_training(torchrun(args_for(3, shards, tmp_path, 2)), tmp_path)
    # learning rate 0 (AdamW's decay is scaled by it too): step 3 changes nothing, so its weights are the ones loaded
    output = run_training([sys.executable, TRAIN, *args_for(3, shards, tmp_path, 3, ["optim.lr.init=0.0"])],
                          tmp_path)
    assert "written by 2 ranks, now 1: ZeRO-3" in output and "only the weights are loaded" in output, output[-3000:]
    _, saved, _ = load_run(str(tmp_path / "zero3"), "step_00000002")
    _, resumed, _ = load_run(str(tmp_path / "zero3"), "step_00000003")
    resumed_state = resumed.state_dict()
    for name, value in saved.state_dict().items():
        assert torch.equal(value, resumed_state[name]), f"{name}: not the checkpoint's weights after the resume"
