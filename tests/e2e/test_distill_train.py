"""Distillation through the entry points, as a user runs them: the ``tiny`` student (32 px, the demo tokenizer)
learns from a tiny Hugging Face CLIP teacher of another size and tokenizer (48 px, its own), through the trainer; the
teacher's retrieval figures come first, its identity is in the checkpoint, a resume with another teacher is refused,
only the student is exported; and ``verify_exactness`` passes with the teacher partitioned at ZeRO-3 on 2 ranks."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from zvl_ds.base.checksums import file_sha256
from zvl_ds.runtime.dist import free_port

STEPS = 3
# the demo config with NCE (MixUpNCE has no distillation), a global batch of 16 in DGA chunks of 8
OVERRIDES = ["loss.name=NCE", "data.batch_size=16", "data.batch_size_train=8", "data.batch_size_val=24",
             f"runner.train_steps={STEPS}", f"runner.val_interval_steps={STEPS}", "distill.contrastive_weight=0.5"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from tools.tiny_checkpoints import write_tiny_teacher_folder

    root = tmp_path_factory.mktemp("teachers")
    return write_tiny_teacher_folder(str(root / "clip"), "hf_clip"), write_tiny_teacher_folder(str(root / "other"),
                                                                                               "hf_clip", seed=2)


def train(shards, out, teacher, steps=STEPS):
    command = [sys.executable, os.path.join(REPO_ROOT, "zvl_ds", "train.py"), "--cfg",
               os.path.join(REPO_ROOT, "configs", "demo.yaml"), f"data.data_path={shards}", f"ckpt.dir={out}",
               *OVERRIDES, f"runner.train_steps={steps}", f"distill.teacher={teacher}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=child_env(), cwd=str(out))


@pytest.fixture(scope="module")
def run(shards, teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    done = train(shards, out, teachers[0])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def test_the_teacher_is_evaluated_once_first_then_the_student_trains(run):
    out, done = run
    text = done.stdout + done.stderr
    assert "distilling from" in text and "48 px" in text
    rows = [json.loads(line) for line in open(os.path.join(out, "demo", "eval_metrics.jsonl"))]
    assert [row["step"] for row in rows] == [0, STEPS]
    assert set(rows[0]) == {"step", "demo_val_teacher"} and "demo_val" in rows[1]
    assert rows[0]["demo_val_teacher"]["rsum"] > 0
    assert text.index("demo_val_teacher @ step 0") < text.index(f"step {STEPS}/{STEPS}")


def test_the_checkpoint_records_the_teacher_and_not_its_weights(run, teachers):
    from zvl_ds.model.safe_load import load_weights_only

    out, _ = run
    states = load_weights_only(os.path.join(out, "demo", f"step_{STEPS:08d}", "mp_rank_00_model_states.pt"),
                               RuntimeError, "")
    identity = states["teacher"]
    assert identity["teacher"] == teachers[0] and identity["kind"] == "hf_clip"
    assert identity["sha256"] == file_sha256(os.path.join(teachers[0], "model.safetensors"))
    assert not any("teacher" in key for key in states["module"])


def test_only_the_student_is_exported(run):
    from safetensors.torch import load_file

    from zvl_ds.config import load_config
    from zvl_ds.model.build import build_model

    from zvl_ds.export.formats import export_model

    out, _ = run
    export_model(str(out / "demo"), str(out / "exported"))  # what python -m zvl_ds.export runs
    student = build_model(load_config(os.path.join(REPO_ROOT, "configs", "demo.yaml"), ["loss.name=NCE"]).model,
                          load_config(None, ["loss.temperature.name=parameter"]).loss)
    assert set(load_file(str(out / "exported" / "model.safetensors"))) == set(student.state_dict())


def test_resuming_with_another_teacher_is_refused(run, shards, teachers):
    out, _ = run
    done = train(shards, out, teachers[1], steps=STEPS + 1)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "cannot resume" in done.stderr and teachers[0] in done.stderr and teachers[1] in done.stderr


def test_verify_exactness_passes_with_a_partitioned_teacher(teachers, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "zvl_ds.verify_exactness", "--synthetic",
               "--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero3.json"),
               "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), "data.batch_size=16",
               "data.batch_size_train=4", "loss.name=NCE", f"distill.teacher={teachers[0]}",
               "distill.contrastive_weight=0.5", "loss.chunk_cols=3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=child_env(), cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout)  # the per-group table, with pytest -s
    assert "distilled from" in done.stdout and "0.1 of 0.2 MiB" in done.stdout + done.stderr  # partitioned
    for group in ("image tower", "text tower", "temperature", "PASS"):
        assert group in done.stdout
