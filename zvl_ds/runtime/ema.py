"""Model EMA: an exponential moving average of the trainable weights, kept next to a DeepSpeed engine.

After every applied optimizer step, ``ema = d * ema + (1 - d) * weights`` with ``d = model.ema.decay`` (ramped up
linearly over ``model.ema.warmup_steps`` updates when given). The average starts from the weights the run starts
with, is accumulated in fp32 from the weights the forward uses (the engine's precision), and covers the trainable
parameters only (frozen ones never change, buffers are the model's own).

Where it lives: at ZeRO 0-2 every rank holds the whole average (the weights are replicated). At ZeRO-3 each rank
holds the average of its own partition of every parameter (``param.ds_tensor``: rank r holds elements
``[r * size, (r + 1) * size)`` of the flattened parameter, zero-padded at the end), so the average is partitioned
like the weights and costs no gathering.

Checkpoints: ``RUN/TAG/zvl_ema_rank_NNNNN.pt`` (weights-only), written by rank 0 at ZeRO 0-2 (the whole average)
and by every rank at ZeRO-3 (its partitions). ``merge_ema_files`` joins them into whole tensors without DeepSpeed,
for a resume at any world size or stage and for ``python -m zvl_ds.export --ema``.

Evaluation swaps the average into the weights (``swapped_in``) and back, bit for bit.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from zvl_ds.config import EmaConfig
from zvl_ds.runtime import dist

LOG = logging.getLogger(__name__)

_FILE_PATTERN = re.compile(r"^zvl_ema_rank_(\d{5})\.pt$")


def ema_file(rank: int) -> str:
    return f"zvl_ema_rank_{rank:05d}.pt"


def ema_decay(cfg: EmaConfig, update: int) -> float:
    """The decay used by update ``update`` (1 for the first update after the start)."""
    if cfg.warmup_steps > 0:
        return cfg.decay * min(1.0, update / cfg.warmup_steps)
    return cfg.decay


class EmaFileError(ValueError):
    """The EMA files of a checkpoint are missing, incomplete or do not fit the model."""


def merge_ema_files(folder: str) -> Optional[Tuple[int, Dict[str, torch.Tensor]]]:
    """(updates, whole fp32 tensors by parameter name) from a checkpoint folder's EMA files; None when it has none."""
    found = {int(m.group(1)): name for name in os.listdir(folder) if (m := _FILE_PATTERN.match(name))}
    if not found:
        return None
    first = torch.load(os.path.join(folder, found[min(found)]), map_location="cpu", weights_only=True)
    if not first["partitioned"]:
        return int(first["updates"]), {name: tensor.float() for name, tensor in first["tensors"].items()}
    world_size = int(first["world_size"])
    missing = sorted(set(range(world_size)) - set(found))
    if missing:
        raise EmaFileError(f"{folder}: the EMA partitions of ranks {missing} are missing "
                           f"({ema_file(missing[0])}; written by {world_size} ranks)")
    parts = [first] + [torch.load(os.path.join(folder, found[rank]), map_location="cpu", weights_only=True)
                       for rank in range(1, world_size)]
    merged = {}
    for name, shape in first["shapes"].items():
        flat = torch.cat([part["tensors"][name].float().reshape(-1) for part in parts])
        numel = int(torch.Size(shape).numel())
        merged[name] = flat[:numel].reshape(shape).clone()
    return int(first["updates"]), merged


def _partition_of(whole: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 partition of ``whole``: ``size`` elements of the flattened tensor, zero-padded."""
    flat = whole.reshape(-1)
    part = torch.zeros(size, dtype=flat.dtype)
    piece = flat[rank * size:(rank + 1) * size]
    part[:piece.numel()] = piece
    return part


class ModelEma:
    """The average of an engine's module's trainable parameters (see the module's docstring)."""

    def __init__(self, cfg: EmaConfig, module: nn.Module, partitioned: bool) -> None:
        self.cfg = cfg
        self.partitioned = partitioned
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.updates = 0
        self.average = {name: self._local(p).detach().float().clone() for name, p in self.params.items()}

    def _local(self, param: nn.Parameter) -> torch.Tensor:
        """The part of ``param`` this rank holds: its ZeRO-3 partition, or the whole tensor."""
        return param.ds_tensor if self.partitioned else param

    @torch.no_grad()
    def update(self) -> None:
        """One update, after an applied optimizer step."""
        self.updates += 1
        decay = ema_decay(self.cfg, self.updates)
        for name, average in self.average.items():
            average.mul_(decay).add_(self._local(self.params[name]).detach().float(), alpha=1.0 - decay)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_files(self) -> Dict[str, dict]:
        """``{file name: contents}`` this rank writes into a checkpoint folder."""
        if not self.partitioned and dist.get_rank() != 0:
            return {}
        return {ema_file(dist.get_rank()): {
            "updates": self.updates, "partitioned": self.partitioned, "world_size": dist.get_world_size(),
            "tensors": {name: average.cpu() for name, average in self.average.items()},
            "shapes": {name: list(p.ds_shape if self.partitioned else p.shape) for name, p in self.params.items()}}}

    @torch.no_grad()
    def restore(self, folder: str) -> bool:
        """Take the average saved in checkpoint ``folder`` (written at any world size and stage); False, with the
        average left at the restored weights, when the checkpoint has none (a run that enables the EMA later)."""
        merged = merge_ema_files(folder)
        if merged is None:
            self.average = {name: self._local(p).detach().float().clone() for name, p in self.params.items()}
            LOG.warning(f"{folder} holds no model EMA: the average starts from the restored weights")
            return False
        updates, whole = merged
        missing = sorted(set(self.params) - set(whole))
        if missing:
            raise EmaFileError(f"{folder}: the saved model EMA has no average of {len(missing)} trainable "
                               f"parameters, e.g. {missing[0]} (were other parameters trainable when it was saved?)")
        for name, param in self.params.items():
            value = whole[name]
            if self.partitioned:
                value = _partition_of(value, dist.get_rank(), param.ds_tensor.numel())
            elif value.shape != param.shape:
                raise EmaFileError(f"{folder}: the saved EMA of {name} has shape {tuple(value.shape)}, the model's "
                                   f"parameter {tuple(param.shape)}")
            self.average[name] = value.to(self.average[name].device)
        self.updates = updates
        return True

    # ------------------------------------------------------------------ evaluation

    @contextlib.contextmanager
    def swapped_in(self, engine) -> Iterator[None]:
        """The engine's module holds the average inside the block, its own weights again after it (bit for bit)."""
        saved = {}
        with self._repartitioned(engine), torch.no_grad():
            for name, param in self.params.items():
                local = self._local(param)
                saved[name] = local.detach().clone()
                local.data.copy_(self.average[name].to(local.dtype))
        try:
            yield
        finally:
            with self._repartitioned(engine), torch.no_grad():
                for name, param in self.params.items():
                    self._local(param).data.copy_(saved[name])

    @contextlib.contextmanager
    def _repartitioned(self, engine) -> Iterator[None]:
        """At ZeRO-3, every parameter is released to its partition while the partitions change, and the ones
        DeepSpeed keeps gathered (small "persistent" parameters) are gathered again afterwards: the steps DeepSpeed
        takes around loading a checkpoint."""
        if not self.partitioned:
            yield
            return
        engine.optimizer.checkpoint_event_prologue()
        try:
            yield
        finally:
            engine.optimizer.checkpoint_event_epilogue()


def build_ema(cfg: EmaConfig, engine, zero_stage: int) -> Optional[ModelEma]:
    """The model EMA of a run (None when ``model.ema.decay`` is null), started from the engine's weights."""
    if cfg.decay is None:
        return None
    return ModelEma(cfg, engine.module, partitioned=zero_stage == 3)
