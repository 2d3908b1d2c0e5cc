"""Speed options that must not change results, checked in this process: profiler ranges, the profile's split of a
step, SDPA, optimizer kernels. The checks that run a DeepSpeed engine are in tests/dist/test_speed.py."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from zvl_ds.config import load_config


def test_profile_range_is_free_when_no_profiler_records():
    from zvl_ds.observe.profile_ranges import profile_range

    off = profile_range("zvl.x")
    assert off is profile_range("zvl.y")  # one shared no-op, no dispatcher call
    with torch.profiler.profile() as profiler:
        with profile_range("zvl.inside"):
            torch.ones(2).sum()
    assert any(event.name == "zvl.inside" for event in profiler.events())


def _event(name, total_us, parent=None):
    return SimpleNamespace(name=name, cpu_time_total=total_us, cpu_parent=parent, device_type="DeviceType.CPU",
                           device_time_total=0)


def test_split_events_hand_computed():
    from zvl_ds.bench.step_profile import split_events

    pass1, pass2 = _event("zvl.pass1", 4000), _event("zvl.pass2", 9000)
    forward1 = _event("zvl.forward", 3000, pass1)
    forward2 = _event("zvl.forward", 3500, pass2)
    backward = _event("zvl.backward", 5000, pass2)
    autograd = _event("autograd::engine::evaluate_function: MmBackward0", 4200, backward)
    nested = _event("autograd::engine::evaluate_function: AddBackward0", 1000, autograd)  # inside the one above
    optimizer = _event("zvl.optimizer", 2000)
    engine_step = _event("zvl.optimizer_step", 1900, optimizer)
    torch_step = _event("Optimizer.step#AdamW.step", 1500, engine_step)
    events = [pass1, pass2, forward1, forward2, _event("zvl.model_forward", 2500, forward1),
              _event("zvl.model_forward", 3000, forward2), backward, autograd, nested, _event("zvl.loss", 1000),
              optimizer, engine_step, torch_step, _event("zvl.host_to_device", 300, pass1),
              _event("zvl.host_to_device", 200, pass2)]
    split = split_events(events, steps=2, wall_seconds=0.040)
    assert split["pass1"] == pytest.approx(2.0) and split["pass2"] == pytest.approx(4.5)
    assert split["loss"] == pytest.approx(0.5) and split["optimizer"] == pytest.approx(1.0)
    assert split["host_to_device"] == pytest.approx(0.25)
    # engine forward - model forward (500 + 500) + backward - autograd (800) + engine step - torch step (400)
    assert split["deepspeed"] == pytest.approx((1000 + 800 + 400) / 2 / 1000)
    assert split["step_wall"] == pytest.approx(20.0)
    assert split["host_other"] == pytest.approx(20.0 - 8.0)


def _sdpa_calls(model, **inputs):
    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        out = model(**inputs)
    return Count.calls, out


def test_sdpa_runs_in_both_towers_and_matches_eager_attention():
    from zvl_ds.model.build import build_model

    outputs, calls = {}, {}
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    input_ids = torch.randint(5, 200, (3, 25), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[0, 10:] = 0  # padding goes through SDPA's attention mask
    for attention in ("sdpa", "eager"):
        cfg = load_config(None, ["model.arch=tiny", f"model.attention={attention}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.loss).eval()
        calls[attention], outputs[attention] = _sdpa_calls(model, images=images, input_ids=input_ids,
                                                            attention_mask=mask)
        assert model.text_tower.config._attn_implementation == attention
    assert calls["eager"] == 0
    assert calls["sdpa"] == 4  # two blocks per tower, both towers
    for key in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(outputs["sdpa"][key], outputs["eager"][key], rtol=1e-5, atol=1e-6)


def test_optimizer_kernels_give_the_plain_update():
    from zvl_ds.model.build import build_model
    from zvl_ds.runtime.optim import build_optimizer, kernel_options

    assert kernel_options("auto", torch.device("cpu")) == {"foreach": False}
    assert kernel_options("auto", torch.device("cuda")) == {"fused": True}
    results = {}
    for name in ("torch.optim.AdamW", "SGD"):
        for implementation in ("plain", "foreach", "fused"):
            cfg = load_config(None, ["model.arch=tiny", f"optim.name={name}", f"optim.implementation={implementation}",
                                     "optim.lr.init=0.01", "optim.param.weight_decay=0.1"])
            torch.manual_seed(0)
            model = build_model(cfg.model, cfg.loss)
            initial = {n: p.detach().clone() for n, p in model.named_parameters()}
            optimizer = build_optimizer(model, cfg.optim)
            generator = torch.Generator().manual_seed(1)
            for _ in range(3):
                for param in model.parameters():
                    param.grad = torch.randn(param.shape, generator=generator)
                optimizer.step()
            results[name, implementation] = {n: p.detach().clone() for n, p in model.named_parameters()}
        plain = results[name, "plain"]
        moved = max(float((plain[n] - initial[n]).abs().max()) for n in plain)
        assert moved > 1e-3  # the steps really changed the weights
        for implementation in ("foreach", "fused"):
            for key, value in results[name, implementation].items():
                torch.testing.assert_close(value, plain[key], rtol=1e-6, atol=1e-7,
                                           msg=f"{name} {implementation} {key}")
