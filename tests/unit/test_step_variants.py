"""``python -m zvl_ds.bench.step_variants``: variants of one config built as the trainer builds them, timed in turns."""
import pytest
import torch

from zvl_ds.bench.step_variants import fixed_batch, main, one_step, parse_variant, time_variants
from zvl_ds.config import load_config
from zvl_ds.model.build import build_model
from zvl_ds.runtime.optim import build_optimizer

TINY = ["model.arch=tiny", "transforms.input_size=32", "data.batch_size=4"]


def test_variants_are_built_from_their_overrides_and_timed(capsys):
    pytest.importorskip("peft")
    assert parse_variant("lora:model.text_encoder.lora.r=2,model.image_encoder.lora.r=2") == (
        "lora", ["model.text_encoder.lora.r=2", "model.image_encoder.lora.r=2"])
    results = time_variants(None, TINY, [("full", []), ("lora", ["model.text_encoder.lora.r=2"])], rounds=1)
    for name, overrides in (("full", []), ("lora", ["model.text_encoder.lora.r=2"])):
        cfg = load_config(None, TINY + overrides)
        model = build_model(cfg.model, cfg.loss)
        assert results[name]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert results[name]["median_seconds"] > 0
    assert results["lora"]["trainable"] < results["full"]["trainable"]
    assert main(TINY + ["--variant", "full", "--rounds", "1"]) == 0
    assert "| full |" in capsys.readouterr().out


def test_one_step_updates_exactly_the_trainable_parameters():
    cfg = load_config(None, TINY + ["model.image_encoder.unlocked_groups=1"])
    model = build_model(cfg.model, cfg.loss).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    one_step(model, build_optimizer(model, cfg.optim), fixed_batch(cfg, model))
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == {name for name, p in model.named_parameters() if p.requires_grad}
