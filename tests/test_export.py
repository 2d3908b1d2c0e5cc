"""Export: consolidate real DeepSpeed checkpoints (ZeRO 0-3, fp32 and bf16, 1 and 2 ranks) into a model folder,
then ``load_model`` must reproduce the checkpointed in-memory model's embeddings exactly."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import run_distributed

from conftest import REPO_ROOT

# Tiny model; the text tower is frozen in some runs (ZeRO-1 drops frozen tensors from zero_to_fp32's output).
BASE_OVERRIDES = ["model.arch=tiny", "loss.temperature.name=parameter", "loss.temperature.value=0.07",
                  "device=cpu", "data.batch_size=4", "data.batch_size_val=4", "data.exp_name=run",
                  "transforms.input_size=32", "transforms.resize.size=36", "transforms.center_crop.size=32"]
PROBE_SEED = 123


def _config(overrides):
    from zvl_ds.config import load_config

    return load_config(None, BASE_OVERRIDES + list(overrides))


def probe_inputs(cfg, n=3):
    """Fixed images (already normalised) and token ids to compare embeddings on."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    size = cfg.transforms.input_size
    images = torch.randn(n, 3, size, size, generator=gen)
    input_ids = torch.randint(5, 280, (n, cfg.model.max_length), generator=gen)
    mask = torch.ones_like(input_ids)
    mask[0, 6:] = 0
    input_ids[0, 6:] = 0
    return images, input_ids, mask


def _train_and_save(rank, world_size, run_root, overrides, stage, precision, steps=2):
    """Train the tiny model a few steps under DeepSpeed and save a checkpoint as the trainer does; returns
    (embeddings of the in-memory model on the probe inputs, its fp32 weights (ZeRO-0 fp32 only), bf16 weights)."""
    import deepspeed
    import torch.nn.functional as F

    from zvl_ds.checkpoint import save_checkpoint
    from zvl_ds.model import build_model
    from zvl_ds.optim import build_optimizer

    cfg = _config(list(overrides) + [f"precision={precision}", f"ckpt.dir={run_root}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    optimizer = build_optimizer(model, cfg.optim)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
                 "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                 "bf16": {"enabled": precision == "bf16"}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        images = torch.randn(4, 3, 32, 32, generator=gen).to(dtype)
        ids = torch.randint(5, 280, (4, cfg.model.max_length), generator=gen)
        out = engine(images=images, input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = out["image_embeds"].float() @ out["text_embeds"].float().T / out["temperature"].float()
        loss = F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))
        engine.backward(loss)
        engine.step()
    os.makedirs(cfg.run_dir, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as handle:
            handle.write(cfg.to_yaml())
    save_checkpoint(engine, cfg.run_dir, steps, {"step": steps, "config": cfg.to_dict()},
                    {"step": steps}, cfg.to_yaml(), keep_last=2)
    engine.eval()
    images, input_ids, mask = probe_inputs(cfg)
    with torch.no_grad():
        out = engine(images=images.to(dtype), input_ids=input_ids, attention_mask=mask)
    weights = {}
    if stage < 3:  # the module's own copy: fp32, or bf16(master) under bf16
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    masters = []  # the optimizer's fp32 master copies, one flat tensor per parameter group
    if precision == "bf16" and stage == 0:
        masters = [torch.cat([t.reshape(-1) for t in group]).clone() for group in engine.optimizer.fp32_groups]
    elif precision == "bf16" and stage in (1, 2):
        masters = [t.clone() for t in engine.optimizer.single_partition_of_fp32_groups]
    return {"image": out["image_embeds"].float(), "text": out["text_embeds"].float(),
            "temperature": out["temperature"].float(), "weights": weights, "masters": masters,
            "run_dir": cfg.run_dir}


def _train_many(rank, world_size, jobs):
    return [_train_and_save(rank, world_size, *job) for job in jobs]


# name: (overrides, stage, precision)
# ZeRO-3 last: its engine patches torch.nn.functional.linear for the rest of the process, which changes bf16
# rounding in engines made after it.
SINGLE_RANK_RUNS = {
    "z0_fp32": ([], 0, "fp32"),
    "z1_fp32_frozen_text": (["model.text_encoder.trainable=false"], 1, "fp32"),
    "z0_bf16": ([], 0, "bf16"),
    "z2_bf16": ([], 2, "bf16"),
    "z3_fp32": ([], 3, "fp32"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every single-rank checkpoint, made in one spawned process (DeepSpeed start-up is paid once)."""
    root = tmp_path_factory.mktemp("runs")
    jobs = [(str(root / name), overrides, stage, precision)
            for name, (overrides, stage, precision) in SINGLE_RANK_RUNS.items()]
    (results,) = run_distributed(_train_many, 1, (jobs,), timeout=300)
    return dict(zip(SINGLE_RANK_RUNS, results))


def _embed(model, cfg):
    images, input_ids, mask = probe_inputs(cfg)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(input_ids, mask)


@pytest.mark.parametrize("name", ["z0_fp32", "z1_fp32_frozen_text", "z3_fp32"])
def test_load_run_reproduces_fp32_embeddings_exactly(runs, name):
    from zvl_ds.export import load_run

    ref = runs[name]
    cfg, model, tag = load_run(ref["run_dir"])
    assert tag == "step_00000002"
    image, text = _embed(model, cfg)
    assert torch.equal(image, ref["image"]) and torch.equal(text, ref["text"])
    assert torch.equal(model.temperature(), ref["temperature"])
    if ref["weights"]:  # the module itself is the fp32 truth
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in ref["weights"].items())


@pytest.mark.parametrize("name", ["z0_bf16", "z2_bf16"])
def test_bf16_runs_export_the_fp32_master_weights(runs, name):
    from zvl_ds.export import load_run
    from zvl_ds.optim import parameter_groups

    ref = runs[name]
    cfg, model, _ = load_run(ref["run_dir"])
    trained = {k: v for k, v in model.state_dict().items() if k in dict(model.named_parameters())}
    assert all(v.dtype == torch.float32 for v in trained.values())
    # the export holds the optimizer's fp32 masters exactly (same group order as the trainer builds)...
    groups = parameter_groups(model, cfg.optim.param.weight_decay, cfg.optim.decay_all)
    assert len(groups) == len(ref["masters"])
    for group, master in zip(groups, ref["masters"]):
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]])
        assert torch.equal(flat, master[:flat.numel()])
    # ... which are not the bf16 copies the engine computed with, but round to them
    not_bf16 = sum(int((v != v.bfloat16().float()).sum()) for v in trained.values())
    assert not_bf16 > 1000
    state = model.state_dict()
    assert all(torch.equal(state[k].to(v.dtype), v) for k, v in ref["weights"].items())
    model_bf16 = model.to(torch.bfloat16)
    images, input_ids, mask = probe_inputs(cfg)
    with torch.no_grad():
        image = model_bf16.encode_image(images.bfloat16()).float()
        text = model_bf16.encode_text(input_ids, mask).float()
    assert torch.equal(image, ref["image"]) and torch.equal(text, ref["text"])
