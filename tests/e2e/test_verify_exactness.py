"""The verify_exactness tool, run under torchrun on 2 CPU ranks as a user runs it."""
import os
import subprocess
import sys

from tests.helpers.paths import REPO_ROOT
from zvl_ds.runtime.dist import free_port


def verify(args):
    """python -m zvl_ds.verify_exactness --synthetic ARGS under torchrun on 2 CPU ranks; it must pass."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "zvl_ds.verify_exactness", "--synthetic", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_verify_exactness_tool_passes_under_torchrun():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "zvl_ds.verify_exactness", "--synthetic",
               "--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
               "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"),
               "data.batch_size=16", "data.batch_size_train=4", "model.image_encoder.kwargs.drop_path_rate=0.1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for group in ("image tower", "text tower", "image projection", "text projection", "temperature", "PASS"):
        assert group in done.stdout


def test_verify_exactness_tool_accepts_siglip():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "zvl_ds.verify_exactness", "--synthetic",
               "--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
               "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), "data.batch_size=8",
               "data.batch_size_train=4", "loss.name=SigLIP", "loss.temperature.name=constant", "loss.chunk_rows=3",
               "loss.chunk_cols=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "loss SigLIP" in done.stdout
    for group in ("image tower", "text tower", "sigmoid scale/bias", "PASS"):
        assert group in done.stdout


def test_verify_exactness_tool_accepts_patch_dropout():
    # ZeRO-3, 2 ranks: pass 2 of each chunk must drop the patches of its pass 1 for the update to match
    done = verify(["--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero3.json"),
                   "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), "data.batch_size=16",
                   "data.batch_size_train=4", "model.image_encoder.patch_dropout=0.5"])
    print(done.stdout)  # the per-group table, with pytest -s
    for group in ("image tower", "text tower", "PASS"):
        assert group in done.stdout


def test_verify_exactness_exits_1_on_a_step_that_is_not_exact():
    # gather_backward=false is ZeroVL's option to stop the gradient at the gathered keys of other ranks: a real
    # configuration whose step is NOT the full-batch gradient at 2 ranks, so the tool must fail it
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "zvl_ds.verify_exactness", "--synthetic",
               "--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
               "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), "data.batch_size=8",
               "data.batch_size_train=8", "runner.name=clip", "loss.nce_loss.gather_backward=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAIL: tolerance" in done.stdout and "<-- exceeds tolerance" in done.stdout, done.stdout[-3000:]
    print(done.stdout[-2000:])  # the report, shown with pytest -s
    # exit 1 is the verdict, not a crash: no traceback through the tool's own code (torchrun prints its own
    # ChildFailedError traceback for any rank that exits non-zero)
    assert 'zvl_ds/verify_exactness.py", line' not in done.stderr, done.stderr[-3000:]
