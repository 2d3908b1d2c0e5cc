"""LoRA adapters under the exact DGA step, on 2 real processes (gloo), at ZeRO 0, 2 and 3, from one spawn:

- two optimizer steps equal two plain single-process full-batch steps within 1e-5 (adapters on both towers with
  LoRA dropout, replayed in pass 2; the text tower's last layer unlocked; a learnable temperature; drop-path);
- the checkpoint after the first step holds the trainable tensors only, and a new engine resumed from it takes the
  second step to the same weights as the uninterrupted run;
- ``load_run`` rebuilds the frozen base from the config and gives the checkpointed model's embeddings;
- ``python -m zvl_ds.verify_exactness`` passes with adapters (its report, in the same processes, last).

peft starts each B matrix at zero, where the A matrices get no gradient: the test starts B at seeded random values
on both sides, so every adapter tensor has a gradient to compare.
"""
import contextlib
import io
import os

import pytest
import torch

from tests.dist.test_dga_exactness import GLOBAL_BATCH, MEAN, STD, global_batch, normalise
from tests.helpers.dist_utils import run_distributed
from tests.helpers.paths import REPO_ROOT
from zvl_ds.objective.exactness import compare_tensors, reference_loss

pytest.importorskip("peft")
CHUNK, WORLD = 4, 2
STAGES = (0, 2, 3)  # ZeRO-3 last: its engine patches torch.nn.functional.linear for the rest of the process
OVERRIDES = ["model.arch=tiny", "runner.name=clip_bsgs", "seed=3", f"data.batch_size={GLOBAL_BATCH}", f"data.batch_size_train={CHUNK}",
             "loss.name=NCE", "loss.temperature.name=parameter", "loss.temperature.value=0.1", "loss.chunk_rows=5",
             "optim.name=SGD", "optim.lr.init=0.5", "optim.param.momentum=0.9", "optim.param.weight_decay=0.01",
             f"transforms.normalize.mean={MEAN}", f"transforms.normalize.std={STD}", "transforms.input_size=32",
             "model.image_encoder.kwargs.drop_path_rate=0.2",
             "model.image_encoder.lora.r=4", "model.image_encoder.lora.dropout=0.3",
             "model.text_encoder.lora.r=2", "model.text_encoder.lora.alpha=3", "model.text_encoder.lora.dropout=0.2",
             "model.text_encoder.unlocked_layers=1"]


def make_cfg(run_dir="unused"):
    from zvl_ds.config import load_config

    return load_config(None, OVERRIDES + [f"ckpt.dir={run_dir}", "data.exp_name=run"])


def probe(cfg):
    generator = torch.Generator().manual_seed(5)
    return torch.randn(3, 3, 32, 32, generator=generator), torch.randint(5, 200, (3, cfg.model.max_length),
                                                                         generator=generator)


def built_model(cfg, random_b=True):
    """The configured model; ``random_b``: every LoRA B matrix at seeded random values (see the module docstring)."""
    from zvl_ds.model.build import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loss)
    if random_b:
        generator = torch.Generator().manual_seed(21)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def _engine(model, cfg, stage):
    from zvl_ds.runtime.engine import build_ds_config, initialize_engine
    from zvl_ds.runtime.optim import build_optimizer

    ds_config = build_ds_config({"zero_optimization": {"stage": stage}, "zero_force_ds_cpu_optimizer": False}, cfg,
                                WORLD)
    return initialize_engine(model, build_optimizer(model, cfg.optim), ds_config)


def _step(engine, cfg, rank, index):
    from zvl_ds.objective.build import build_step
    from zvl_ds.objective.step import RUNNERS, StepBatch

    images, input_ids, attention_mask = global_batch(cfg)
    local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    configured = build_step(cfg, WORLD, rank)
    configured.seed_rng(index)
    result = RUNNERS["clip_bsgs"](engine, StepBatch(images[local], input_ids[local], attention_mask[local]),
                                  configured.options, None, configured.partner)
    assert result.applied, result.skip_reason
    return result.loss


def _weights(engine, stage):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {name: p.detach().float().clone() for name, p in engine.module.named_parameters()}


def _case(rank, stage, root):
    """Two steps, a small checkpoint after the first, and a resumed second step: the results of one ZeRO stage."""
    from zvl_ds.model.adapters import ADAPTER_BASE_FILE, base_identity
    from zvl_ds.runtime.checkpoint import ResumePoint, load_checkpoint, save_checkpoint

    cfg = make_cfg(os.path.join(root, f"zero{stage}"))
    model = built_model(cfg)
    identity = base_identity(cfg.model, model)
    engine = _engine(model, cfg, stage)
    losses = [_step(engine, cfg, rank, 0)]
    save_checkpoint(engine, cfg.run_dir, 1, {"step": 1}, {"step": 1}, cfg.to_yaml(), keep_last=2,
                    json_files={ADAPTER_BASE_FILE: identity}, trainable_only=True)
    engine.eval()
    images, input_ids = probe(cfg)
    with torch.no_grad():
        out = engine(images=images, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    embeddings = (out["image_embeds"].float(), out["text_embeds"].float())
    engine.train()
    losses.append(_step(engine, cfg, rank, 1))
    straight = _weights(engine, stage)
    resumed_engine = _engine(built_model(cfg, random_b=False), cfg, stage)  # adapters from the checkpoint alone
    load_checkpoint(resumed_engine, ResumePoint(cfg.run_dir, "step_00000001"), stage, trainable_only=True)
    _step(resumed_engine, cfg, rank, 1)
    resumed = _weights(resumed_engine, stage)
    resume_diff = max(float((straight[name] - resumed[name]).abs().max()) for name in straight)
    return {"params": straight if rank == 0 else None, "losses": losses, "resume_diff": resume_diff,
            "embeddings": embeddings, "run_dir": cfg.run_dir}


def _verify_exactness():
    """The tool as a user runs it (here inside the test's processes); it leaves the process group at its end."""
    from zvl_ds.verify_exactness import main

    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        code = main(["--synthetic", "--deepspeed_config", os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
                     "--cfg", os.path.join(REPO_ROOT, "configs", "demo.yaml"), "data.batch_size=16",
                     "data.batch_size_train=4", "model.image_encoder.lora.r=4", "model.image_encoder.lora.dropout=0.3",
                     "model.text_encoder.lora.r=4", "model.text_encoder.lora.dropout=0.3"])
    return code, report.getvalue()


def _worker(rank, world_size, root):
    results = {stage: _case(rank, stage, root) for stage in STAGES}
    results["verify"] = _verify_exactness()
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_distributed(_worker, WORLD, (str(tmp_path_factory.mktemp("lora")),), timeout=600)


@pytest.fixture(scope="module")
def reference():
    """Two plain full-batch steps in this process: one autograd graph over every chunk of both ranks."""
    from zvl_ds.runtime.optim import build_optimizer

    cfg = make_cfg()
    model = built_model(cfg)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    images, input_ids, attention_mask = global_batch(cfg)
    losses = []
    for step in range(2):
        optimizer.zero_grad()
        loss = reference_loss(model, normalise(images), input_ids, attention_mask, world_size=WORLD,
                              chunk=CHUNK // WORLD, seed=cfg.seed, step=step, mixup=None)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    start = built_model(cfg)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, dict(start.named_parameters())


@pytest.mark.parametrize("stage", STAGES)
def test_two_steps_with_adapters_equal_the_full_batch_reference(ranks, reference, stage):
    expected, ref_losses, start = reference
    result = ranks[0][stage]
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    worst = compare_tensors(result["params"], expected)
    name, value = max(worst.items(), key=lambda item: item[1])
    print(f"ZeRO-{stage}, 2 ranks: worst relative difference {value:.2e} ({name})")
    assert value <= 1e-5, f"{name}: {value:.2e}"
    # every adapter matrix, the unlocked layer, the projections and the temperature moved; the frozen base did not
    moved = {n for n, p in result["params"].items() if not torch.equal(p, start[n].detach())}
    trainable = {n for n, p in start.items() if p.requires_grad}
    assert moved == trainable
    assert any(".lora_A." in n for n in moved) and any(".lora_B." in n for n in moved) and "tau" in moved
    assert "text_tower.encoder.layer.1.attention.self.query.base_layer.weight" in moved
    assert "image_tower.blocks.0.attn.qkv.base_layer.weight" not in moved


@pytest.mark.parametrize("stage", STAGES)
def test_small_checkpoint_resumes_exactly_and_holds_only_trainable_tensors(ranks, stage):
    result = ranks[0][stage]
    print(f"ZeRO-{stage}: resumed vs uninterrupted, max |diff| {result['resume_diff']:.1e}")
    assert all(rank[stage]["resume_diff"] == 0.0 for rank in ranks)
    folder = os.path.join(result["run_dir"], "step_00000001")
    states = [name for name in os.listdir(folder) if name.endswith("model_states.pt")]
    module = torch.load(os.path.join(folder, states[0]), map_location="cpu", weights_only=False)["module"]
    trainable = {n for n, p in built_model(make_cfg()).named_parameters() if p.requires_grad}
    parameters = {n for n in module if not n.endswith(("running_mean", "running_var", "num_batches_tracked",
                                                       "position_ids", "token_type_ids"))}
    assert parameters == trainable  # no frozen tensor in the checkpoint


@pytest.mark.parametrize("stage", STAGES)
def test_load_run_rebuilds_the_base_and_gives_the_checkpointed_embeddings(ranks, stage):
    from zvl_ds.model.saved_run import load_run

    result = ranks[0][stage]
    cfg, model, tag = load_run(result["run_dir"])
    assert tag == "step_00000001" and model.adapted_modules
    images, input_ids = probe(cfg)
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(input_ids, torch.ones_like(input_ids))
    diff = max(float((image - result["embeddings"][0]).abs().max()), float((text - result["embeddings"][1]).abs().max()))
    print(f"ZeRO-{stage}: load_run vs in-memory embeddings, max |diff| {diff:.1e}")
    assert diff <= 1e-5


def test_verify_exactness_passes_with_adapters(ranks):
    code, report = ranks[0]["verify"]
    print(report)
    assert code == 0, report
    for group in ("image tower", "text tower", "image projection", "text projection", "PASS"):
        assert group in report
