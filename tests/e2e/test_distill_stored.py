"""A stored teacher through the entry points, as a user runs them: the two commands of docs/distillation.md's "Stored
teacher embeddings" section, as written there (with this test's small batch and few steps appended), in a folder
whose ``quickstart/shards`` are the demo shards and whose ``quickstart/model`` is a tiny Hugging Face CLIP teacher
(48 px, its own tokenizer). ``python -m zvl_ds.reinforce_shards`` writes its embeddings beside the shards, then
``zvl_ds/train.py`` trains the ``tiny`` student with ``distill.source=stored``: the teacher is never loaded, the
reference line comes from the stored validation embeddings, and the checkpoint records the teacher's identity."""
import json
import os
import re
import shlex
import subprocess
import sys

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env
from zvl_ds.base.checksums import file_sha256
from zvl_ds.data.teacher_store import embeddings_path

STEPS = 3
OVERRIDES = ["data.batch_size=16", "data.batch_size_train=8", "data.batch_size_val=24", f"runner.train_steps={STEPS}",
             f"runner.val_interval_steps={STEPS}", "distill.contrastive_weight=0.5"]


def documented_commands():
    """The bash commands of the docs section, continuations joined, as the user copies them."""
    text = open(os.path.join(REPO_ROOT, "docs", "distillation.md"), encoding="utf-8").read()
    section = text.split('## Stored teacher embeddings ("reinforced" shards)', 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


def as_run_here(command):
    """A documented command for this checkout: its python, and the repository's script and config paths."""
    words = shlex.split(command)
    assert words[0] == "python", command
    return [sys.executable] + [os.path.join(REPO_ROOT, word) if word.startswith(("zvl_ds/", "configs/")) else word
                               for word in words[1:]]


def test_reinforce_then_train_from_the_stored_embeddings(shards, tmp_path):
    from tools.tiny_checkpoints import write_tiny_teacher_folder

    reinforce, train = documented_commands()
    assert "-m zvl_ds.reinforce_shards" in reinforce and "distill.source=stored" in train
    os.makedirs(tmp_path / "quickstart")
    os.symlink(shards, tmp_path / "quickstart" / "shards")
    teacher = write_tiny_teacher_folder(str(tmp_path / "quickstart" / "model"), "hf_clip")
    done = subprocess.run(as_run_here(reinforce) + OVERRIDES, capture_output=True, text=True, timeout=300,
                          env=child_env(), cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the two training sets (96 samples each, 1 caption each) and the validation set (24 samples, 2 captions each)
    assert "7 written, 0 kept from before, 0 failed; 216 samples and 240 captions embedded" in done.stdout
    tars = [os.path.join(folder, name) for folder, _, names in os.walk(shards) for name in names
            if name.endswith(".tar")]
    assert len(tars) == 7 and all(os.path.exists(embeddings_path(tar)) for tar in tars)  # beside each shard
    done = subprocess.run(as_run_here(train) + OVERRIDES, capture_output=True, text=True, timeout=300,
                          env=child_env(), cwd=str(tmp_path))
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    assert "distilling from the embeddings of" in text and "width 16" in text
    assert "Loading weights" not in text  # the teacher is never loaded
    run = tmp_path / "quickstart" / "output" / "demo_stored"
    rows = [json.loads(line) for line in open(run / "eval_metrics.jsonl")]
    assert [row["step"] for row in rows] == [0, STEPS] and set(rows[0]) == {"step", "demo_val_teacher"}
    reference = rows[0]["demo_val_teacher"]
    assert (reference["num_images"], reference["num_texts"]) == (24, 48) and reference["rsum"] > 0
    from zvl_ds.model.safe_load import load_weights_only

    states = load_weights_only(str(run / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt"), RuntimeError, "")
    assert states["teacher"]["sha256"] == file_sha256(os.path.join(teacher, "model.safetensors"))
