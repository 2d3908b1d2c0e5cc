"""A stored teacher through the entry points, as a user runs them: ``python -m zvl_ds.reinforce_shards`` writes a tiny
Hugging Face CLIP teacher's embeddings (48 px, its own tokenizer) beside the demo shards, then ``zvl_ds/train.py``
trains the ``tiny`` student with ``distill.source=stored``: the teacher is never loaded, the reference line comes from
the stored validation embeddings, and the checkpoint records the teacher's identity."""
import json
import os
import subprocess
import sys

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from zvl_ds.base.checksums import file_sha256

STEPS = 3
OVERRIDES = ["loss.name=NCE", "data.batch_size=16", "data.batch_size_train=8", "data.batch_size_val=24",
             f"runner.train_steps={STEPS}", f"runner.val_interval_steps={STEPS}", "distill.contrastive_weight=0.5"]


def test_reinforce_then_train_from_the_stored_embeddings(shards, tmp_path):
    from tools.tiny_checkpoints import write_tiny_teacher_folder

    teacher = write_tiny_teacher_folder(str(tmp_path / "teacher"), "hf_clip")
    config = ["--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), f"data.data_path={shards}",
              f"distill.teacher={teacher}", *OVERRIDES]
    done = subprocess.run([sys.executable, "-m", "zvl_ds.reinforce_shards", *config], capture_output=True, text=True,
                          timeout=300, env=child_env(), cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the two training sets (96 samples each, 1 caption each) and the validation set (24 samples, 2 captions each)
    assert "7 written, 0 kept from before, 0 failed; 216 samples and 240 captions embedded" in done.stdout
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "zvl_ds", "train.py"), *config,
                           "distill.source=stored", f"ckpt.dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300, env=child_env(), cwd=str(tmp_path))
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    assert "distilling from the embeddings of" in text and "width 16" in text
    assert "Loading weights" not in text  # the teacher is never loaded
    rows = [json.loads(line) for line in open(tmp_path / "out" / "demo" / "eval_metrics.jsonl")]
    assert [row["step"] for row in rows] == [0, STEPS] and set(rows[0]) == {"step", "demo_val_teacher"}
    reference = rows[0]["demo_val_teacher"]
    assert (reference["num_images"], reference["num_texts"]) == (24, 48) and reference["rsum"] > 0
    from zvl_ds.model.safe_load import load_weights_only

    states = load_weights_only(str(tmp_path / "out" / "demo" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt"),
                               RuntimeError, "")
    assert states["teacher"]["sha256"] == file_sha256(os.path.join(teacher, "model.safetensors"))
