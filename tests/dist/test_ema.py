"""Model EMA on a real DeepSpeed engine (real processes, gloo): the average after k steps equals the formula applied
to the recorded weights, at ZeRO-0 (whole copies) and ZeRO-3 (partitions); its checkpoint files restore it; evaluation
swaps it in and the trained weights back bit for bit."""
import pytest
import torch

from tests.helpers.dist_utils import run_distributed

DECAY, WARMUP, STEPS = 0.8, 2, 3
GLOBAL_BATCH = 8


def _gathered(engine, stage):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {name: p.detach().double().clone() for name, p in engine.module.named_parameters()}


def _worker(rank, world_size, stage, folder):
    from zvl_ds.config import load_config
    from zvl_ds.model.build import build_model
    from zvl_ds.objective.build import build_step
    from zvl_ds.objective.step import StepBatch
    from zvl_ds.runtime import dist
    from zvl_ds.runtime.ema import build_ema
    from zvl_ds.runtime.engine import build_ds_config, initialize_engine
    from zvl_ds.runtime.optim import build_optimizer

    cfg = load_config(None, ["model.arch=tiny", "seed=5", f"data.batch_size={GLOBAL_BATCH}", "data.batch_size_train=4",
                             "runner.name=clip_bsgs", "optim.lr.init=0.05", f"model.ema.decay={DECAY}",
                             f"model.ema.warmup_steps={WARMUP}", "model.image_encoder.unlocked_groups=2"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.loss)
    ds_config = build_ds_config({"zero_optimization": {"stage": stage}, "zero_force_ds_cpu_optimizer": False}, cfg,
                                world_size)
    engine = initialize_engine(model, build_optimizer(model, cfg.optim), ds_config)
    ema = build_ema(cfg.model.ema, engine, stage)
    step = build_step(cfg, world_size, rank)
    generator = torch.Generator().manual_seed(rank)
    per_rank = GLOBAL_BATCH // world_size
    batch = StepBatch(torch.randint(0, 256, (per_rank, 3, 32, 32), dtype=torch.uint8, generator=generator),
                      torch.randint(5, 200, (per_rank, cfg.model.max_length), generator=generator),
                      torch.ones(per_rank, cfg.model.max_length, dtype=torch.long))
    recorded = [_gathered(engine, stage)]
    engine.train()
    for index in range(STEPS):
        assert step(engine, batch, index).applied
        ema.update()
        recorded.append(_gathered(engine, stage))
    for name, contents in ema.checkpoint_files().items():
        torch.save(contents, f"{folder}/{name}")
    dist.barrier()

    # evaluation's swap: the module holds the average inside, its trained weights again after, bit for bit
    from zvl_ds.runtime.ema import merge_ema_files

    _, average = merge_ema_files(folder)
    engine.eval()
    with ema.swapped_in(engine):
        inside = _gathered(engine, stage)
        with torch.no_grad():  # a forward works on the swapped weights (ZeRO-3 gathers the swapped partitions)
            embeds = engine(images=batch.images.float() / 255.0, input_ids=batch.input_ids,
                            attention_mask=batch.attention_mask)["image_embeds"]
    after = _gathered(engine, stage)
    assert torch.isfinite(embeds).all()
    for name, value in after.items():
        assert torch.equal(value, recorded[-1][name]), name
        expected = average[name].double() if name in average else recorded[-1][name]
        assert torch.equal(inside[name], expected), name

    # a fresh average restored from the files equals the saved one, partition for partition
    restored = build_ema(cfg.model.ema, engine, stage)
    assert restored.restore(folder) and restored.updates == STEPS
    for name, value in ema.average.items():
        assert torch.equal(restored.average[name], value), name
    trainable = sorted(name for name, p in engine.module.named_parameters() if p.requires_grad)
    return {"recorded": recorded if rank == 0 else None, "average": average if rank == 0 else None,
            "trainable": trainable}


def formula(recorded, names):
    """e_0 = w_0; e_t = d_t e_(t-1) + (1 - d_t) w_t with d_t = decay * min(1, t / warmup), in float64."""
    average = {name: recorded[0][name].clone() for name in names}
    for t in range(1, len(recorded)):
        d = DECAY * min(1.0, t / WARMUP)
        average = {name: d * average[name] + (1 - d) * recorded[t][name] for name in names}
    return average


@pytest.mark.parametrize("world_size,stage", [(1, 0), (2, 3)])
def test_ema_after_k_steps_equals_the_formula_on_the_recorded_weights(tmp_path, world_size, stage):
    results = run_distributed(_worker, world_size, (stage, str(tmp_path)), timeout=300)
    recorded, average, trainable = results[0]["recorded"], results[0]["average"], results[0]["trainable"]
    assert sorted(average) == trainable  # the trainable parameters, no frozen ones
    assert not any(name.startswith("image_tower.patch_embed") for name in average)  # locked stem: not averaged
    expected = formula(recorded, trainable)
    worst = max(float((average[n].double() - expected[n]).abs().max() / expected[n].abs().max().clamp(min=1e-6))
                for n in trainable)
    print(f"EMA vs formula, {world_size} rank(s) ZeRO-{stage}: worst relative difference {worst:.1e}")
    assert worst < 1e-6
    moved = max(float((recorded[-1][n] - recorded[0][n]).abs().max()) for n in trainable)
    assert moved > 1e-3  # the weights moved, so the average is not trivially the start
    assert any(not torch.allclose(average[n].double(), recorded[-1][n]) for n in trainable)
