"""Schedules, DeepSpeed config filling, checkpoint bookkeeping, skip policy and the verify_exactness tool."""
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from dist_utils import free_port
from zvl_ds.checkpoint import (CheckpointError, find_resume_point, list_tags, prune_checkpoints, read_latest,
                               tag_for_step)
from zvl_ds.config import ConfigError, load_config
from zvl_ds.dga import SkipPolicy, StepResult, TrainingAborted
from zvl_ds.engine import build_ds_config, resolve_placement
from zvl_ds.exactness import GroupDifference
from zvl_ds.optim import parameter_groups
from zvl_ds.schedule import learning_rate


# ------------------------------------------------------------------------------------------------ schedules

def test_zerovl_cosine_schedule_hand_computed():
    cfg = load_config(None, ["optim.lr.init=1e-4", "optim.lr.warmup_proportion=0.1"]).optim.lr
    total = 100  # warm-up int(100 * 0.1) = 10 steps
    assert learning_rate(cfg, 0, total, 10) == 0.0
    assert learning_rate(cfg, 5, total, 10) == pytest.approx(0.5e-4)
    assert learning_rate(cfg, 10, total, 10) == pytest.approx(1e-4)  # start of the cosine: scale 1
    # half way through the cosine: m + (1 - m) * 0.5 * (1 + cos(pi/2)) with m = 0.1
    assert learning_rate(cfg, 55, total, 10) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))
    assert learning_rate(cfg, 100, total, 10) == pytest.approx(1e-4 * 0.1)  # ends at min_lr_scale


def test_lavis_schedules_hand_computed():
    cosine = load_config(None, ["optim.lr.name=linear_warmup_cosine_lr", "optim.lr.init=1.0", "optim.lr.min_lr=0.1",
                                "optim.lr.warmup_lr=0.0", "optim.lr.warmup_steps=4"]).optim.lr
    assert learning_rate(cosine, 2, 100, 10) == pytest.approx(0.5)
    assert learning_rate(cosine, 50, 100, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    step = load_config(None, ["optim.lr.name=linear_warmup_step_lr", "optim.lr.init=1.0", "optim.lr.min_lr=0.3",
                              "optim.lr.lr_decay_rate=0.5", "optim.lr.warmup_steps=0"]).optim.lr
    assert [learning_rate(step, s, 100, 10) for s in (0, 9, 10, 25, 99)] == pytest.approx([1, 1, 0.5, 0.3, 0.3])


def test_no_decay_group_holds_biases_norms_and_temperature():
    from zvl_ds.model import build_model

    cfg = load_config(None, ["model.arch=tiny", "loss.temperature.name=parameter"])
    model = build_model(cfg.model, cfg.loss)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["group_name"]: [names[id(p)] for p in g["params"]] for g in parameter_groups(model, 0.1, False)}
    assert "tau" in groups["no_decay"] and "image_tower.pos_embed" in groups["no_decay"]
    assert all(n.endswith("bias") or "norm" in n.lower() or "position_embeddings" in n or n in ("tau", "image_tower.pos_embed",
                                                                   "image_tower.cls_token")
               for n in groups["no_decay"])
    assert "image_projection.weight" in groups["decay"]
    (everything,) = parameter_groups(model, 0.1, True)
    assert len(everything["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ DeepSpeed config

def test_auto_fields_filled_from_yaml():
    cfg = load_config(None, ["data.batch_size=64", "optim.grad_clip=0.5", "precision=bf16"])
    ds = build_ds_config(os.path.join(REPO_ROOT, "ds_configs", "zero2.json"), cfg, world_size=4)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2


def test_clipping_is_explicitly_off_by_default():
    ds = build_ds_config(None, load_config(None, []), world_size=1)
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed itself would clip at 1.0


@pytest.mark.parametrize("field,value", [("train_batch_size", 100), ("gradient_clipping", 1.0),
                                         ("gradient_accumulation_steps", 4)])
def test_contradictions_are_errors(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value}"):
        build_ds_config({field: value}, load_config(None, ["data.batch_size=64"]), world_size=2)


def test_every_shipped_deepspeed_config_fills():
    cfg = load_config(None, ["data.batch_size=8"])
    for name in ("zero0", "zero1", "zero2", "zero3", "zero2_offload"):
        ds = build_ds_config(os.path.join(REPO_ROOT, "ds_configs", f"{name}.json"), cfg, world_size=2)
        assert "auto" not in str(ds), name


def test_fp16_refused_with_a_clear_message_where_the_device_lacks_it(monkeypatch):
    import zvl_ds.engine as engine

    # some CPUs have fp16 (AVX512-FP16/AMX), most do not: simulate one that does not
    monkeypatch.setattr(engine, "_fp16_supported", lambda device: False)
    with pytest.raises(ConfigError, match="fp16 is not supported on this device.*bf16"):
        resolve_placement(load_config(None, ["precision=fp16", "device=cpu"]))
    monkeypatch.setattr(engine, "_fp16_supported", lambda device: True)
    assert resolve_placement(load_config(None, ["precision=fp16", "device=cpu"])).dtype == torch.float16


# ------------------------------------------------------------------------------------------------ checkpoints

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


# ------------------------------------------------------------------------------------------------ skipping

def test_skip_policy_aborts_after_too_many_in_a_row():
    policy = SkipPolicy(max_in_a_row=3)
    skipped = StepResult(applied=False, loss=float("nan"), i2t_acc=0, t2i_acc=0, temperature=0.07,
                         skip_reason="non-finite loss")
    good = StepResult(applied=True, loss=1.0, i2t_acc=0, t2i_acc=0, temperature=0.07)
    policy.record(skipped, 1, None)
    policy.record(skipped, 2, None)
    policy.record(good, 3, None)  # the run recovered: the count in a row restarts
    policy.record(skipped, 4, None)
    policy.record(skipped, 5, None)
    with pytest.raises(TrainingAborted, match="3 consecutive steps skipped up to step 6.*out/run/step_00000004"):
        policy.record(skipped, 6, "out/run/step_00000004")
    assert policy.total == 5


def _nan_step_worker(rank, world_size):
    from zvl_ds.dga import StepBatch, StepOptions, dga_step
    from zvl_ds.engine import build_ds_config, initialize_engine
    from zvl_ds.model import build_model
    from zvl_ds.optim import build_optimizer

    cfg = load_config(None, ["model.arch=tiny", "data.batch_size=8", "optim.name=SGD", "optim.lr.init=0.1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    engine = initialize_engine(model, build_optimizer(model, cfg.optim),
                               build_ds_config({"zero_optimization": {"stage": 2}}, cfg, world_size))
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    poisoned = rank == 1  # one rank's inputs are broken: every rank must skip together

    def prepare(images):
        out = images.float() / 255
        return out * float("nan") if poisoned else out

    batch = StepBatch(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.ones(4, 16, dtype=torch.long),
                      torch.ones(4, 16, dtype=torch.long))
    result = dga_step(engine, batch, StepOptions(chunk=2, world_size=world_size, chunk_rows=4,
                                                 prepare_images=prepare), None, None)
    unchanged = all(torch.equal(before[n], p) for n, p in engine.module.named_parameters())
    return result.applied, result.skip_reason, unchanged


def test_non_finite_loss_skips_the_step_on_every_rank():
    from dist_utils import run_distributed

    results = run_distributed(_nan_step_worker, 2)
    assert results == [(False, "non-finite loss", True)] * 2


# ------------------------------------------------------------------------------------------------ verify tool

def test_verify_exactness_tool_passes_under_torchrun():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(REPO_ROOT, "tools", "verify_exactness.py"), "--synthetic",
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
               str(free_port()), os.path.join(REPO_ROOT, "tools", "verify_exactness.py"), "--synthetic",
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


def test_verify_report_fails_beyond_tolerance(capsys):
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    try:
        import verify_exactness
    finally:
        sys.path.pop(0)
    assert verify_exactness.report([GroupDifference("text tower", 1e-7, 1.0)], 1e-4) is True
    assert verify_exactness.report([GroupDifference("text tower", 1e-3, 1.0)], 1e-4) is False
    assert "exceeds tolerance" in capsys.readouterr().out
