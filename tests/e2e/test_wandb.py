"""Weights & Biases logging through the real entry point, offline (``WANDB_MODE=offline``, ``WANDB_DIR`` in the
test folder): the offline run's transaction log is read back from its files and compared with what TensorBoard got;
a resumed run continues the same W&B run without logging a step twice; without wandb the run stops at once."""
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import wandb_files
from tests.helpers.dist_utils import free_port
from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")
SMALL = ["data.batch_size=16", "data.batch_size_train=4", "data.batch_size_val=16", "data.num_workers=1",
         "data.shuffle_buffer=50", "log.interval_train=2", "log.num_image_samples=4"]


def train_args(shards, out_dir, steps, extra=()):
    return ["--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
            "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), *SMALL, f"data.data_path={shards}",
            f"ckpt.dir={out_dir}", "data.exp_name=wb", f"runner.train_steps={steps}", "ckpt.step_interval=2",
            "ckpt.keep_last=3", "wandb.enable=true", "wandb.project=zvl_test", *extra]


def with_corrupt_images(shards, dest):
    """A copy of the shards where every 4th training image is not an image: the loaders skip and count them, so
    the data counters (``data/skipped_corrupt_image``) have something to log."""
    shutil.copytree(shards, dest)
    for tar in sorted(dest.glob("demo_*/train-*.tar")):
        with tarfile.open(tar) as archive:
            members = [(member, archive.extractfile(member).read()) for member in archive.getmembers()]
        images = [member.name for member, _ in members if member.name.endswith(".jpg")]
        spoilt = set(images[::4])
        with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
            for member, data in members:
                data = b"not an image" if member.name in spoilt else data
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
    return str(dest)


def offline_env(wandb_dir):
    return dict(child_env(), WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true")


def torchrun(args, env, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               TRAIN, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def tensorboard_scalars(run_dir):
    """{tag: {step: value}} of every scalar TensorBoard got, the last value where a step was written twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def tensorboard_image(run_dir, tag, step):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (image,) = [event for event in events.Images(tag) if event.step == step]
    return np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))


def wandb_scalars(rows):
    """{key: {step: value}} of the numbers in W&B history rows (W&B's own ``_step``, ``_runtime``, ... left out)."""
    found = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and isinstance(value, (int, float)):
                found.setdefault(key, {})[row["_step"]] = value
    return found


def test_offline_run_logs_what_tensorboard_gets_and_a_resume_continues_it(shards, tmp_path):
    pytest.importorskip("wandb")  # the optional extra; CI installs it (tools/install.sh --test)
    wandb_dir, out = tmp_path / "wandb_files", tmp_path / "out"
    wandb_dir.mkdir()
    env = offline_env(wandb_dir)
    shards = with_corrupt_images(shards, tmp_path / "shards")
    torchrun(train_args(shards, out, 4, ["runner.val_interval_steps=4"]), env, tmp_path)
    run_dir = out / "wb"
    record = json.loads((run_dir / "wandb_run.json").read_text())
    assert record["last_step"] == 4
    (first,) = wandb_files.offline_runs(str(wandb_dir), record["id"])
    rows = wandb_files.history(first)

    # every scalar TensorBoard got, at the same steps with the same values: training, time, memory, data, eval
    logged, expected = wandb_scalars(rows), tensorboard_scalars(str(run_dir))
    for tag in ("train/loss", "train/lr", "memory/peak_device_bytes", "time/pass1", "eval/demo_val/rsum"):
        assert tag in expected, sorted(expected)  # the comparison below covers every group
    assert any(tag.startswith("data/skipped_") for tag in expected)
    assert sorted(logged) == sorted(expected)
    for tag, values in expected.items():
        assert sorted(logged[tag]) == sorted(values), tag
        for step, value in values.items():
            assert math.isclose(logged[tag][step], value, rel_tol=1e-6, abs_tol=1e-12), (tag, step)
    assert sorted(logged["train/loss"]) == [1, 2, 3, 4]
    # the retrieval example grid, as an image at the evaluation's step: the very pixels TensorBoard shows
    images = [(row["_step"], row[key]) for row in rows for key in row if key == "eval/demo_val/retrieval_examples"]
    assert [(step, image["_type"]) for step, image in images] == [(4, "image-file")]
    pixels = np.asarray(Image.open(os.path.join(first, "files", images[0][1]["path"])))
    assert pixels.shape[:2] == (images[0][1]["height"], images[0][1]["width"])
    np.testing.assert_array_equal(pixels, tensorboard_image(str(run_dir), "eval/demo_val/retrieval_examples", 4))
    # the resolved config: the one the run folder records
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    recorded = wandb_files.config(first)
    assert {key: recorded[key] for key in resolved} == resolved

    # Resume from step 2, as after a stop past the step-2 checkpoint: steps 3 and 4, already logged, are replayed
    # by training; they must not be logged to W&B again.
    (run_dir / "latest").write_text("step_00000002")
    again = torchrun(train_args(shards, out, 6, ["runner.val_interval_steps=1000"]), env, tmp_path)
    assert "at step 2" in again.stdout
    assert json.loads((run_dir / "wandb_run.json").read_text()) == {"id": record["id"], "last_step": 6}
    first_again, second = wandb_files.offline_runs(str(wandb_dir), record["id"])  # the same run id, continued
    assert first_again == first
    resumed = wandb_scalars(wandb_files.history(second))
    assert sorted(resumed["train/loss"]) == [5, 6]
    every_step = [row["_step"] for folder in (first, second) for row in wandb_files.history(folder)
                  if "train/loss" in row]
    assert every_step == [1, 2, 3, 4, 5, 6]
    # TensorBoard has the replayed steps again; W&B kept the first values
    assert math.isclose(logged["train/loss"][3], tensorboard_scalars(str(run_dir))["train/loss"][3], rel_tol=1e-5)


def test_without_wandb_installed_the_run_stops_before_the_model_with_exit_2(shards, tmp_path):
    # a wandb that cannot be imported, first on the path: what Python raises where the package is not installed
    missing = tmp_path / "no_wandb" / "wandb"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(missing.parent), env["PYTHONPATH"]])
    done = subprocess.run([sys.executable, TRAIN, *train_args(shards, tmp_path / "out", 2)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "wandb.enable=true but the wandb package cannot be imported" in done.stderr
    assert "pip install -e .[wandb]" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "wb").exists()  # stopped before the run folder, the process group, the model
