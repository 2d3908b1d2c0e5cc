"""The DeepSpeed side: device and precision choice, the DeepSpeed config filled from the YAML, the engine."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from zvl_ds.config import Config, ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # the engine's compute dtype; inputs are cast to it


def resolve_placement(cfg: Config, local_rank: int = 0) -> Placement:
    """Pick the device from ``cfg.device`` and refuse precisions the device cannot run."""
    want = cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is visible (use device=cpu or auto)")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    precision = cfg.precision or "fp32"
    if precision == "fp16" and not _fp16_supported(device):
        raise ConfigError(f"precision: fp16 is not supported on this device ({_device_name(device)}); "
                          "use precision=bf16 or precision=fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision: bf16 is not supported on {_device_name(device)}; use fp16 or fp32")
    return Placement(device=device, dtype=DTYPES[precision])


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _fp16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    try:
        from deepspeed.accelerator import get_accelerator

        return bool(get_accelerator().is_fp16_supported())
    except Exception:  # an accelerator probe that fails means: not supported
        return False


def _fill(ds: Dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``key`` to ``value`` where the DeepSpeed config says "auto" or nothing; a contradiction is an error."""
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(f"DeepSpeed config {where}{key}={current!r} contradicts the YAML, which implies "
                          f"{value!r}; set it to \"auto\" (the YAML is the one source of truth)")


def build_ds_config(ds_config: Union[str, Dict[str, Any], None], cfg: Config, world_size: int) -> Dict[str, Any]:
    """Fill a DeepSpeed config's "auto" fields from the YAML.

    DeepSpeed sees one micro-batch per optimizer step (gradient_accumulation_steps 1): zvl_ds runs its own
    chunked accumulation inside the step and controls the gradient reduction itself (see objective/step.py).
    """
    if ds_config is None:
        ds: Dict[str, Any] = {"zero_optimization": {"stage": 0}}
    elif isinstance(ds_config, str):
        try:
            with open(ds_config, encoding="utf-8") as handle:
                ds = json.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"DeepSpeed config not found: {ds_config}") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"DeepSpeed config {ds_config} is not valid JSON: {error}") from None
        except RecursionError:
            raise ConfigError(f"DeepSpeed config {ds_config}: JSON nested too deeply") from None
    else:
        ds = copy.deepcopy(ds_config)
    _fill(ds, "train_batch_size", cfg.data.batch_size, "")
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.data.batch_size // world_size, "")
    _fill(ds, "gradient_accumulation_steps", 1, "")
    # DeepSpeed clips at 1.0 unless told otherwise; make the YAML's choice explicit (0.0 = off).
    _fill(ds, "gradient_clipping", float(cfg.optim.grad_clip), "")
    precision = cfg.precision or "fp32"
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        _fill(section, "enabled", precision == name, f"{name}.")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError("DeepSpeed config: remove \"optimizer\"/\"scheduler\"; zvl_ds builds them from "
                          "optim.* in the YAML")
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def initialize_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: Dict[str, Any]):
    """``deepspeed.initialize`` with our optimizer instance; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def set_learning_rate(engine, lr: float, scales: Optional[Sequence[float]] = None) -> None:
    """Give optimizer group i the schedule's ``lr`` times ``scales[i]`` (per-part LRs, layer decay).

    The scales come from the groups as built (``zvl_ds.runtime.optim.optimizer_groups``), not from the groups' dicts,
    which a checkpoint load replaces with what an older run saved."""
    groups = engine.optimizer.param_groups
    if scales is not None and len(scales) != len(groups):
        raise RuntimeError(f"{len(scales)} learning-rate scales for {len(groups)} optimizer groups")
    for index, group in enumerate(groups):
        group["lr"] = lr * (scales[index] if scales is not None else 1.0)

