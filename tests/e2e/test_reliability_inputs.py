"""Faults in the inputs, planted from outside with real files: shards that vanish mid-run, a damaged checkpoint,
crafted model folders. Each runs the real entry point and checks what users see: exit code, message, files left.
"""
import glob
import os
import shutil
import subprocess
import sys
import time

from tests.helpers.data_fixtures import write_dataset
from tests.helpers.dist_utils import free_port
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from tests.e2e.test_train import TRAIN
from zvl_ds.runtime.checkpoint import find_resume_point

TINY_RUN = ["--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), "data.train_type=shuffle",
            "data.enable_valid=false", "log.tensorboard=false", "data.batch_size=8", "data.batch_size_train=8",
            "data.num_workers=1", "data.shuffle_buffer=20"]


def _wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return os.path.exists(path)


# ------------------------------------------------------------------------------------------------ vanishing data

def test_shards_deleted_mid_run_stop_every_rank_after_a_last_checkpoint(tmp_path):
    shards = tmp_path / "shards"
    write_dataset(str(shards), "big", "train", [16] * 12)
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, f"data.data_path={shards}", "data.train_name=[big]", "log.interval_train=2",
            "ckpt.step_interval=4", "runner.train_steps=150", f"ckpt.dir={tmp_path}", "data.exp_name=run",
            "data.skip_window=200", "ckpt.keep_last=5"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), TRAIN, *args]
    process = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=tmp_path)
    try:
        assert _wait_for(str(run_dir / "latest"), process), "no first checkpoint"
        deleted = sorted(glob.glob(str(shards / "big" / "train-*.tar")))[3:]  # a dropped mount: 9 of 12 gone
        for shard in deleted:
            os.remove(shard)
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, output[-3000:]  # torchrun exits 1 whatever its workers' codes were
    for rank in (0, 1):  # every rank stops, at the same step, with the same verdict
        assert f"error: [rank {rank}] data: too many samples skipped" in output, output[-4000:]
    assert "[unreadable_shard]" in output and "dataset 'big'" in output
    assert any(os.path.basename(shard) in output.split("too many samples skipped", 1)[1] for shard in deleted)
    assert "step 150/150" not in output
    # the good state up to the stop is saved and complete; the run did not go on for the remaining steps
    latest = (run_dir / "latest").read_text().strip()
    point = find_resume_point(str(run_dir), None, True)
    assert point.tag == latest and f"saved checkpoint {run_dir / latest}" in output
    assert 4 < int(latest[len("step_"):]) < 150
