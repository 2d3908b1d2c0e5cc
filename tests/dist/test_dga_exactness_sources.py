"""The exact DGA step with another library's towers (model.arch hf_clip, hf_siglip, open_clip): two distributed
optimizer steps equal two plain single-process full-batch steps within 1e-5, on real processes.

Tiny random checkpoints written in the test, with the randomness each model has switched on: attention dropout in
the Hugging Face CLIP / SigLIP towers, patch dropout in the OpenCLIP image tower. CLIP learns the temperature
taken from its logit scale (under MixUpNCE, both sides of the coin), SigLIP its scale and bias (in 5 x 3 tiles).

The runs share one spawn per world size (1 and 2 ranks), each case with its own engine from a fresh process's state
(tests/helpers/dist_utils.py); each kind's checkpoint is written once for all its cases.
"""
import importlib.util
import math

import pytest
import torch

from tests.dist.test_dga_exactness import (GLOBAL_BATCH, LR, MEAN, STD, assert_close_to_reference, draws_for,
                                           global_batch, normalise)
from tests.helpers.dist_utils import Case, SharedSpawn
from zvl_ds.config import load_config
from zvl_ds.objective.exactness import reference_loss
from tools.tiny_checkpoints import CLIP_TEMPERATURE, SIGLIP_BIAS, SIGLIP_SCALE

CHUNK = 4
LOSS_OF = {"hf_clip": "MixUpNCE", "hf_siglip": "SigLIP", "open_clip": "NCE"}


def write_source(kind, folder):
    from tools.tiny_checkpoints import write_tiny_hf_folder, write_tiny_open_clip_folder

    if kind == "open_clip":
        pytest.importorskip("open_clip")
        return write_tiny_open_clip_folder(folder, patch_dropout=0.3)
    return write_tiny_hf_folder(folder, kind, dropout=0.2)


def make_cfg(kind, folder):
    source = ([f"model.open_clip.name=local-dir:{folder}"] if kind == "open_clip"
              else [f"model.hf_folder={folder}"])
    overrides = [f"model.arch={kind}", *source, "seed=3", f"data.batch_size={GLOBAL_BATCH}",
                 f"data.batch_size_train={CHUNK}", f"loss.name={LOSS_OF[kind]}", "loss.chunk_rows=5", "optim.name=SGD",
                 f"optim.lr.init={LR}", "optim.param.weight_decay=0.01", f"transforms.normalize.mean={MEAN}",
                 f"transforms.normalize.std={STD}"]
    if kind == "hf_siglip":
        overrides.append("loss.chunk_cols=3")
    return load_config(None, overrides)


def _worker(rank, world_size, kind, folder, stage):
    import deepspeed

    from zvl_ds.model.build import build_model
    from zvl_ds.objective.build import build_step
    from zvl_ds.objective.step import RUNNERS, StepBatch, step_seed
    from zvl_ds.runtime.engine import build_ds_config, initialize_engine
    from zvl_ds.runtime.optim import build_optimizer

    cfg = make_cfg(kind, folder)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loss)
    ds_config = build_ds_config({"zero_optimization": {"stage": stage}, "zero_force_ds_cpu_optimizer": False}, cfg,
                                world_size)
    engine = initialize_engine(model, build_optimizer(model, cfg.optim), ds_config)
    images, input_ids, attention_mask = global_batch(cfg)
    per_rank = GLOBAL_BATCH // world_size
    local = slice(rank * per_rank, (rank + 1) * per_rank)
    batch = StepBatch(images[local], input_ids[local], attention_mask[local])
    cfg.runner.name = "clip_bsgs"
    step = build_step(cfg, world_size, rank)  # normalises as the test's normalise() does
    losses = []
    for index, mixup in enumerate(draws_for(cfg.loss.name, ("image", "text"))):
        torch.manual_seed(step_seed(cfg.seed, index, rank))
        result = RUNNERS["clip_bsgs"](engine, batch, step.options, mixup, step.partner)
        assert result.applied, result.skip_reason
        losses.append(result.loss)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        state = {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}
    return {"params": state if rank == 0 else None, "losses": losses}


def reference(kind, folder, world_size):
    from zvl_ds.model.build import build_model
    from zvl_ds.runtime.optim import build_optimizer

    cfg = make_cfg(kind, folder)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loss)
    model.train()
    opt = build_optimizer(model, cfg.optim)
    images, input_ids, attention_mask = global_batch(cfg)
    losses = []
    for index, mixup in enumerate(draws_for(cfg.loss.name, ("image", "text"))):
        opt.zero_grad()
        loss = reference_loss(model, normalise(images), input_ids, attention_mask, world_size=world_size,
                              chunk=CHUNK // world_size, seed=cfg.seed, step=index, mixup=mixup)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses


RUNS = [("hf_clip", 1, 0), ("hf_clip", 2, 1), ("hf_clip", 2, 2), ("hf_clip", 2, 3), ("hf_siglip", 1, 3),
        ("hf_siglip", 2, 0), ("open_clip", 2, 2)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each kind's tiny checkpoint, written once (open_clip's only where it imports: its test skips otherwise)."""
    root = tmp_path_factory.mktemp("sources")
    kinds = [kind for kind in LOSS_OF if kind != "open_clip" or importlib.util.find_spec("open_clip") is not None]
    return {kind: write_source(kind, str(root / kind)) for kind in kinds}


@pytest.fixture(scope="module")
def spawns(sources):
    """One spawn of 1 rank and one of 2, each running its world size's runs (started when a test first asks)."""
    cases = {1: {}, 2: {}}
    for kind, world_size, stage in RUNS:
        if kind in sources:
            cases[world_size][kind, stage] = Case(_worker, (kind, sources[kind], stage))
    return {world_size: SharedSpawn(world_size, by_key, timeout_per_case=120) for world_size, by_key in cases.items()}


@pytest.mark.parametrize("kind,world_size,stage", RUNS)
def test_dga_with_library_towers_matches_full_batch_reference(sources, spawns, kind, world_size, stage):
    if kind == "open_clip":
        pytest.importorskip("open_clip")
    folder = sources[kind]
    results = spawns[world_size][kind, stage]
    params, losses = results[0]["params"], results[0]["losses"]
    expected, ref_losses = reference(kind, folder, world_size)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    print(f"{kind} ranks={world_size} zero={stage}: ", end="")
    assert_close_to_reference(params, expected, 1e-5)
    # the checkpoint's scale (and bias) were the start, and they learned
    if kind == "hf_siglip":
        for name, initial in (("logit_scale_log", math.log(SIGLIP_SCALE)), ("logit_bias", SIGLIP_BIAS)):
            assert abs(float(params[name].reshape(-1)[0]) - initial) > 1e-4, name
    else:
        assert abs(float(params["tau"].reshape(-1)[0]) - CLIP_TEMPERATURE) > 1e-5
