"""LAVIS's whole-model weights end to end: a short run is exported; a new run started with ``model.load_pretrained``
from the export begins at exactly the exported weights (and a resume does not load them again); ``evaluate: true``
with ``model.load_finetuned`` reports the metrics ``python -m zvl_ds.eval_retrieval`` computes on the export."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.paths import REPO_ROOT
from tests.helpers.processes import child_env, run_side_by_side

TRAIN = os.path.join(REPO_ROOT, "zvl_ds", "train.py")
DEMO = os.path.join(REPO_ROOT, "configs", "demo.yaml")
SMALL = ["data.batch_size=16", "data.batch_size_train=8", "data.batch_size_val=16", "data.num_workers=0",
         "data.shuffle_buffer=16", "log.num_image_samples=0", "log.tensorboard=false", "runner.val_interval_steps=1000"]


def train_command(shards, out_dir, exp_name, extra, ds_config=None):
    """The real entry point, one process (ZeRO-0 unless ``ds_config`` names one of ds_configs/)."""
    options = ["--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", ds_config)] if ds_config else []
    return [sys.executable, TRAIN, *options, "--cfg", DEMO, *SMALL, f"data.data_path={shards}", f"ckpt.dir={out_dir}",
            f"data.exp_name={exp_name}", *extra]


def train(shards, out_dir, exp_name, extra, ds_config=None):
    done = subprocess.run(train_command(shards, out_dir, exp_name, extra, ds_config), env=child_env(),
                          capture_output=True, text=True, timeout=300, cwd=out_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def exported(shards, tmp_path_factory):
    """(output folder, exported model folder) of a 2-step run at a high learning rate (weights far from init)."""
    from zvl_ds.export.formats import export_model

    out = tmp_path_factory.mktemp("init_weights")
    train(shards, out, "source", ["runner.train_steps=2", "optim.lr.init=1e-2", "optim.lr.warmup_steps=0"])
    return out, export_model(str(out / "source"), str(out / "exported"))


@pytest.fixture(scope="module")
def first_runs(shards, exported):
    """{test: its first run, finished}: the first run of each test below needs only the export, so they start side
    by side (one process each, sharing the two cores); each test asserts on its own run as it did."""
    out, folder = exported
    pretrained = ["model.load_pretrained=true", f"model.pretrained={folder}"]
    return run_side_by_side({
        "finetune": train_command(shards, out, "finetune", ["runner.train_steps=1", "optim.lr.init=0",
                                                            "ckpt.auto_resume=true", *pretrained]),
        "zero3": train_command(shards, out, "finetune_zero3", [
            "runner.train_steps=1", "optim.lr.init=0", "model.load_pretrained=true",
            f"model.pretrained={out / 'source' / 'step_00000002'}"], ds_config="zero3.json"),
        "evaluate": train_command(shards, out, "evaluate", ["runner.train_steps=1", "seed=5",
                                                            "runner.val_interval_steps=1000"]),
        "wrong_shape": train_command(shards, out, "wrong_shape", ["runner.train_steps=1", "model.projection.dim=32",
                                                                  *pretrained]),
    }, timeout=300, env=child_env(), cwd=out)


def succeeded(done):
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_fine_tuning_starts_from_the_exported_weights_and_resume_keeps_its_own(shards, exported, first_runs):
    from zvl_ds.config import load_config
    from zvl_ds.model.saved_run import load_run
    from zvl_ds.model.build import build_model

    out, folder = exported
    source = load_file(os.path.join(folder, "model.safetensors"))
    # the weights a fresh run of this config starts from (the trainer seeds, then builds) differ from the export,
    # so equality below means the export was loaded
    cfg = load_config(DEMO, SMALL)
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.model, cfg.loss).state_dict()
    assert any(not torch.equal(fresh[key], value) for key, value in source.items())

    # lr 0 (AdamW's decay is lr x weight_decay: none either): the saved step-1 weights are the step-0 ones
    done = succeeded(first_runs["finetune"])  # train.py ... finetune: runner.train_steps=1 optim.lr.init=0
    assert f"initialised the model from model.pretrained={folder}: {len(source)} tensors loaded, 0 missing, " \
           "0 unexpected" in done.stdout
    _, model, _ = load_run(str(out / "finetune"))
    state = model.state_dict()
    assert set(state) == set(source)
    mismatched = [key for key, value in source.items() if not torch.equal(state[key], value)]
    assert not mismatched, f"not the exported weights: {mismatched[:5]}"

    # a resumed run restores its checkpoint and does not load model.pretrained again (a missing source would fail)
    again = train(shards, out, "finetune", ["runner.train_steps=2", "optim.lr.init=0", "model.load_pretrained=true",
                                            f"model.pretrained={out / 'no_such_export'}"])
    assert "resumed from" in again.stdout and "at step 1" in again.stdout
    assert "initialised the model" not in again.stdout
    assert f"model.pretrained is not loaded: the run resumes from its checkpoint {out / 'finetune'}" in again.stdout


def test_zero3_run_starts_from_a_checkpoint_folder(exported, first_runs):
    """The source run's step folder, consolidated (its weights are the export's), loaded before DeepSpeed
    partitions the parameters: ZeRO-3 gets every weight of the source."""
    from zvl_ds.model.saved_run import load_run

    out, folder = exported
    done = succeeded(first_runs["zero3"])  # ZeRO-3, model.pretrained=the source run's step_00000002
    assert "initialised the model from model.pretrained=" in done.stdout and "0 missing, 0 unexpected" in done.stdout
    source = load_file(os.path.join(folder, "model.safetensors"))
    state = load_run(str(out / "finetune_zero3"))[1].state_dict()
    assert set(state) == set(source)
    mismatched = [key for key, value in source.items() if not torch.equal(state[key], value)]
    assert not mismatched, f"not the exported weights: {mismatched[:5]}"


def test_evaluate_finetuned_gives_the_metrics_of_eval_retrieval(shards, exported, first_runs, tmp_path):
    from zvl_ds.eval_retrieval import main as eval_retrieval

    out, folder = exported
    # the run folder already holds a checkpoint of other weights: the finetuned ones are evaluated, not it
    succeeded(first_runs["evaluate"])  # train.py ... evaluate: runner.train_steps=1 seed=5
    latest = (out / "evaluate" / "latest").read_text()
    train(shards, out, "evaluate", ["evaluate=true", "data.train_name=[no_such_set]", "model.load_finetuned=true",
                                    f"model.finetuned={folder}"])
    assert (out / "evaluate" / "latest").read_text() == latest  # nothing resumed, nothing saved
    in_training = json.loads((out / "evaluate" / "eval_metrics.jsonl").read_text().splitlines()[-1])
    assert in_training["step"] == 0

    metrics_path = tmp_path / "metrics.json"
    assert eval_retrieval(["--model", folder, "--cfg", DEMO, "--out", str(metrics_path), "--no-progress", *SMALL,
                           f"data.data_path={shards}"]) == 0
    standalone = json.loads(metrics_path.read_text())
    assert set(standalone) == {"demo_val"}
    assert standalone["demo_val"]["num_images"] == 24
    for key, value in standalone["demo_val"].items():
        assert in_training["demo_val"][key] == pytest.approx(value, abs=1e-9), key


def test_a_source_of_another_shape_stops_the_run_with_exit_2(exported, first_runs):
    out, folder = exported
    done = first_runs["wrong_shape"]  # model.projection.dim=32, model.pretrained=the export
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error: model.pretrained=" in done.stderr
    assert "image_projection.weight: (64, 64) in the source, (32, 64) in the model" in done.stderr
    assert "Traceback" not in done.stderr and not (out / "wrong_shape" / "latest").exists()
