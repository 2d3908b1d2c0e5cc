"""LAVIS's run command as its users type it: ``python -m torch.distributed.run --nproc_per_node=2 zvl_ds/train.py
--cfg-path CONFIG``, with a LAVIS ``run:`` schedule on a zvl_ds base config."""
import os
import subprocess
import sys

import pytest

from tests.helpers.dist_utils import free_port
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")
DEMO = os.path.join(REPO_ROOT, "configs", "demo.yaml")
SMALL = ["data.batch_size=16", "data.batch_size_train=4", "data.batch_size_val=16", "data.num_workers=1",
         "data.shuffle_buffer=50", "log.interval_train=1", "data.enable_valid=false"]

LAVIS_ON_DEMO = """\
_base_: {demo}
run:
  lr_sched: linear_warmup_cosine_lr
  init_lr: 0.002
  min_lr: 0.0001
  warmup_lr: 0.0005
  warmup_steps: 2
  output_dir: {out}
"""


def test_lavis_run_command_trains_two_ranks_with_the_childs_schedule(shards, tmp_path):
    config = tmp_path / "lavis_on_demo.yaml"
    config.write_text(LAVIS_ON_DEMO.format(demo=DEMO, out=tmp_path / "out"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               TRAIN, "--cfg-path", str(config), *SMALL, f"data.data_path={shards}", "runner.train_steps=2"]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "out" / "demo"
    assert (run_dir / "latest").read_text().strip() == "step_00000002"
    assert "2 ranks" in done.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    # LAVIS's warm-up by hand: warmup_lr + (init_lr - warmup_lr) * step / warmup_steps, at steps 0 and 1
    lrs = {event.step: event.value for event in events.Scalars("train/lr")}
    assert lrs == pytest.approx({1: 0.0005, 2: 0.0005 + (0.002 - 0.0005) / 2})
