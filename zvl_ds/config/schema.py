"""The config schema's root: ``Config``, which holds one section per key of a config file (each section's dataclass,
with the checks that concern it alone, lives in its own module below), the top-level keys, and the rules that span
sections.

Sections: ``data_section`` (``data:``), ``transforms_section`` (``transforms:``), ``model_section`` (``model:``),
``loss_section`` (``loss:``), ``optim_section`` (``optim:``), ``run_sections`` (``runner:``, ``ckpt:``, ``log:``,
``wandb:``, ``dist:``), ``distill_section`` (``distill:``). Each holds the keys that act, and what each key means
as the docstring under its field: the generated reference (``python -m zvl_ds.config --reference``,
docs/configuration.md) reads them, and a test checks that every key has one, so the documentation cannot drift
from the code. Keys under a mapping of sections are written with a ``<name>`` placeholder
(``data.datasets.<name>.shards``).

Key names follow ZeroVL (``zerovl/tasks/clip/config.py`` and its yaml files) so that ZeroVL configs load as
written. Defaults follow ZeroVL's code defaults; where we deviate, a comment says why. ZeroVL keys that change
nothing here are not in these classes but in ``zvl_ds.config.compat`` (accepted, checked, reported). A few such keys
stay, each marked "no effect" or "unused" in its docstring: ``data.test_splits``, ``dist.url`` and
``dist.distributed``, because LAVIS's ``run:`` options map onto them, and the ``model.*`` ones (tower names,
``embedding_dim``, ``pool``, ``syncbn``, ...), because an exported model's config records the whole ``model``
section and must stay readable as written.

Checks run after the whole config is typed (``Config.check``, called by the loader), not when a section is
constructed: a config with an unknown key and a bad value is told about the unknown key first, as the loader reads
it, and code may build a section and fill it in before checking.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional

import yaml

from zvl_ds.base.errors import ConfigError
from zvl_ds.config.data_section import DataConfig
from zvl_ds.config.distill_section import DistillConfig
from zvl_ds.config.loss_section import LossConfig
from zvl_ds.config.model_section import ModelConfig
from zvl_ds.config.optim_section import OptimConfig
from zvl_ds.config.run_sections import CkptConfig, DistConfig, LogConfig, RunnerConfig, WandbConfig
from zvl_ds.config.transforms_section import TransformsConfig


@dataclass
class Config:
    seed: int = 2021
    """Seed of everything random: the initial weights (same on every rank), the data plan, shuffle buffers, per-sample
    augmentation, the `debias` dataset draws, mixup draws and the per-step dropout seeds.
    """
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when visible, else CPU; `cpu`; `cuda` (an error when no GPU is visible)."""
    # None: fp16 if dist.fp16 (ZeroVL's flag) else fp32. bf16 is the better choice on recent GPUs.
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = None
    """Compute precision of the DeepSpeed engine: `fp32`, `bf16` or `fp16` (fills the DeepSpeed config's `bf16`/`fp16`
    sections). `null`: `fp16` if `dist.fp16` is true, else `fp32`.
    """
    evaluate: bool = False
    """Evaluate only: resume as for training (`resume_ckpt_path` / `ckpt.auto_resume`), or load `model.finetuned` when
    `model.load_finetuned` is true, run the validation sets once and exit. The training datasets must still resolve.
    """
    resume_ckpt_path: Optional[str] = None
    """Checkpoint to resume from: a run folder holding a `latest` file, or one of its `step_NNNNNNNN` folders. Wins
    over `ckpt.auto_resume`.
    """
    epoch: int = 20
    """Run length in epochs (an epoch = the data plan's steps per epoch) unless `runner.train_steps` or
    `data.train_steps` is > 0.
    """
    data: DataConfig = field(default_factory=DataConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def run_dir(self) -> str:
        """A run's folder: ``ckpt.dir/data.exp_name``, as in ZeroVL."""
        return os.path.join(self.ckpt.dir, self.data.exp_name)

    @property
    def chunk_size(self) -> int:
        """Global DGA chunk (samples per forward summed over ranks)."""
        return self.data.batch_size_train or self.data.batch_size

    def per_rank_chunk(self, world_size: int) -> int:
        """Samples per forward on one rank: the DGA chunk for ``clip_bsgs``, the whole per-rank batch for ``clip``."""
        batch = self.chunk_size if self.runner.name == "clip_bsgs" else self.data.batch_size
        return batch // world_size

    def check(self) -> None:
        """Refuse values that would only fail (or hang, or divide by zero, or be silently ignored) later in a run: each
        section's own checks, then the rules that span sections. The order decides which problem a config with
        several is told about first."""
        self.data.check()
        self.transforms.check()
        self.loss.check()
        self.optim.check()
        self.model.check()
        self._check_weights_to_evaluate()
        self.ckpt.check()
        self.log.check()
        self.runner.check()
        self._check_run_length()
        self.distill.check()
        self._check_distillation()

    def _check_weights_to_evaluate(self) -> None:
        """``evaluate`` with ``model.load_finetuned``: the weights evaluated come from one place."""
        model = self.model
        if self.evaluate and model.load_finetuned and self.resume_ckpt_path:
            raise ConfigError(f"evaluate=true with both model.load_finetuned (model.finetuned={model.finetuned!r}) "
                              f"and resume_ckpt_path={self.resume_ckpt_path!r}: give the weights to evaluate one way")

    def _check_run_length(self) -> None:
        """``runner.train_steps``, ``data.train_steps`` and ``epoch``: a run that would train no step is refused."""
        runner_steps, data_steps = self.runner.train_steps, self.data.train_steps
        if runner_steps < -1 or data_steps < -1:
            raise ConfigError(f"runner.train_steps={runner_steps}, data.train_steps={data_steps}: "
                              "> 0 fixes the number of steps; -1 (or 0) leaves it to the other key or to `epoch`")
        steps_fixed = runner_steps > 0 or data_steps > 0
        if not self.evaluate and not steps_fixed and self.epoch < 1:
            raise ConfigError(f"epoch: must be >= 1 when neither runner.train_steps nor data.train_steps is > 0 (the "
                              f"run would train no step), got {self.epoch}")

    def _check_distillation(self) -> None:
        """The distillation term follows the student's loss: softmax for NCE, sigmoid for SigLIP; not MixUpNCE."""
        if not self.distill.enabled:
            return
        if self.loss.name == "MixUpNCE":
            raise ConfigError("distill.teacher with loss.name=MixUpNCE: distillation is defined for NCE (softmax) and "
                              "SigLIP (sigmoid) students only; use loss.name=NCE")
        if self.runner.name == "clip" and not self.loss.nce_loss.gather_backward:
            raise ConfigError("distill.teacher with loss.nce_loss.gather_backward=false: the distillation term needs "
                              "the gathered embeddings' gradient; use true, or the clip_bsgs runner")
        if self.distill.bias is not None and self.loss.name != "SigLIP":
            raise ConfigError(f"distill.bias={self.distill.bias} with loss.name={self.loss.name}: a bias shifts every "
                              "logit of a softmax alike and changes nothing; it is for SigLIP students only")
        if self.distill.sigmoid_target != "bce" and self.loss.name != "SigLIP":
            raise ConfigError(f"distill.sigmoid_target={self.distill.sigmoid_target} with loss.name={self.loss.name}: "
                              "the target of sigmoid distillation; a softmax student distils the teacher's softmax")

    def to_dict(self) -> Dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def check_world_size(cfg: Config, world_size: int) -> None:
    """Batch sizes are global; they must split evenly over the ranks the launcher started (known only at launch, so
    checked then, not when the config loads)."""
    if cfg.runner.world_size > 0 and cfg.runner.world_size != world_size:
        raise ConfigError(f"runner.world_size={cfg.runner.world_size} but the launcher started {world_size} ranks")
    for key in ("batch_size", "batch_size_val"):
        if getattr(cfg.data, key) % world_size:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)} is not divisible by the world size {world_size}")
    if cfg.chunk_size % world_size:
        raise ConfigError(f"data.batch_size_train={cfg.chunk_size} is not divisible by the world size {world_size}")


def to_plain(value: Any) -> Any:
    """Tuples as lists, recursively: what YAML and JSON write."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


