"""Filling the DeepSpeed config from ours (the "auto" fields, contradictions) and the device/precision placement."""
import os

import pytest
import torch

from tests.helpers.paths import REPO_ROOT
from zvl_ds.config import ConfigError, load_config
from zvl_ds.runtime.engine import build_ds_config, resolve_placement


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
    import zvl_ds.runtime.engine as engine

    # some CPUs have fp16 (AVX512-FP16/AMX), most do not: simulate one that does not
    monkeypatch.setattr(engine, "_fp16_supported", lambda device: False)
    with pytest.raises(ConfigError, match="fp16 is not supported on this device.*bf16"):
        resolve_placement(load_config(None, ["precision=fp16", "device=cpu"]))
    monkeypatch.setattr(engine, "_fp16_supported", lambda device: True)
    assert resolve_placement(load_config(None, ["precision=fp16", "device=cpu"])).dtype == torch.float16
