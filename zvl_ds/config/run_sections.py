"""The sections that say how a run goes and what it writes: ``runner:`` (single pass or DGA, evaluation intervals,
run length, timeouts), ``ckpt:`` (checkpoints, resume), ``log:`` (console, TensorBoard), ``wandb:`` (Weights &
Biases) and ``dist:`` (ZeroVL's launcher keys); with the checks that concern each section alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from zvl_ds.base.errors import ConfigError
from zvl_ds.config.keys import check_seconds


@dataclass
class RunnerConfig:
    name: Literal["clip", "clip_bsgs"] = "clip"
    """`clip`: one forward and backward per rank over its share of the batch; `clip_bsgs`: ZeroVL's decoupled gradient
    accumulation: embed in chunks of `data.batch_size_train`, one loss over the whole batch, recompute each chunk
    with its cached gradient (same gradient, one chunk's memory).
    """
    val_interval: int = 1
    """Evaluate every this many epochs (and after the last step) when `val_interval_steps` is not > 0."""
    val_interval_steps: int = -1
    """> 0: evaluate every this many optimizer steps (and after the last step) instead of by epochs."""
    stable_random: Literal["step", "none"] = "step"
    """`step`: reseed torch's RNG at every step from `(seed, step, rank)`, so dropout is the same after a resume and
    independent across ranks; `none`: do not reseed.
    """
    train_steps: int = -1
    """> 0 fixes the number of optimizer steps (wins over `data.train_steps` and `epoch`); -1 (or 0): not set, the run
    length comes from `data.train_steps` or `epoch`.
    """
    offload_inputs: bool = False
    """On CUDA: keep the step's images in pinned host memory and move them one chunk at a time (saves device memory for
    large `clip_bsgs` batches). No effect on CPU.
    """
    max_skipped_steps: int = 10
    """Consecutive skipped steps (non-finite loss, fp16 overflow) after which the run stops with an error naming the
    last good checkpoint.
    """
    collective_timeout: float = 600.0
    """Seconds a rank may wait in one collective (all-reduce, barrier, broadcast) before the job fails, e.g. when
    another rank hangs. A rank that raises ends the job at once regardless; raise this only for collectives that
    legitimately wait long (a universal checkpoint conversion of a large model on rank 0).
    """
    preempt_timeout: float = 300.0
    """Seconds a rank may take, after SIGTERM or SIGUSR1 (preemption, `scancel`, SLURM's `--signal`), to finish its
    step and save the preemption checkpoint; past it the job ends at once without one (`latest` keeps the previous
    complete checkpoint). Set it a little under the scheduler's grace period.
    """
    world_size: int = -1
    """LAVIS `run.world_size`: > 0 must equal the number of ranks the launcher started; -1: not checked."""
    task: Literal["retrieval"] = "retrieval"
    """What the run trains for: `retrieval` (LAVIS `run.task`); any other value is refused."""

    def check(self) -> None:
        check_seconds("runner.collective_timeout", self.collective_timeout)
        check_seconds("runner.preempt_timeout", self.preempt_timeout)


@dataclass
class CkptConfig:
    dir: str = "./output"
    """Output root; the run folder is `ckpt.dir/data.exp_name`."""
    step_interval: int = 2000
    """Save a checkpoint every this many optimizer steps (and after the last step)."""
    keep_last: int = 2
    """Checkpoints kept in the run folder; older ones are deleted (never the one `latest` names)."""
    auto_resume: bool = True
    """Resume from the run folder's `latest` checkpoint when there is one."""
    overwrite: bool = False
    """With `ckpt.auto_resume: false` (and no `resume_ckpt_path`): start from scratch in a run folder that already
    holds checkpoints (replacing them as new ones are saved). Without it such a run is refused (exit 2), so old
    checkpoints are not lost by mistake.
    """
    trust_checkpoint: bool = False
    """Open the resumed checkpoint's files without first checking that they hold only weights (tensors, plain values):
    set it only for checkpoints you wrote yourself, since DeepSpeed's loader unpickles them and a crafted file runs
    code.
    """

    def check(self) -> None:
        for key in ("keep_last", "step_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"ckpt.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class LogConfig:
    interval_train: int = 10
    """Print a console line every this many steps (TensorBoard gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard events to `RUN/tensorboard` (rank 0)."""
    num_image_samples: int = 8
    """Validation images shown in TensorBoard with their top-3 retrieved captions at each evaluation (0: none)."""
    record_sample_keys: bool = False
    """Append each step's sample keys to `RUN/sample_keys/rank_N.txt` (data audit)."""

    def check(self) -> None:
        if self.interval_train < 1:
            raise ConfigError(f"log.interval_train: must be >= 1, got {self.interval_train}")


@dataclass
class WandbConfig:
    """Weights & Biases logging, ZeroVL's ``wandb:`` section, next to TensorBoard (which stays on, see
    ``log.tensorboard``). Needs the optional ``wandb`` package (``pip install -e .[wandb]``)."""

    enable: bool = False
    """Log to Weights & Biases from rank 0: every scalar TensorBoard gets (training, evaluation, data counters,
    memory), the resolved config and the retrieval example grids. The W&B run id is kept in `RUN/wandb_run.json`, so a
    resumed run continues the same W&B run, without logging a replayed step twice (a run started from scratch starts
    a new one). Without the `wandb` package the
    run stops before building the model (exit 2). `WANDB_MODE=offline` and `WANDB_DIR` work as in W&B; the local
    files go to `RUN/` unless `WANDB_DIR` is set.
    """
    project: str = "zvl_ds"
    """W&B project (ZeroVL's configs write the placeholder `your_proj`: set your own)."""
    entity: Optional[str] = None
    """W&B entity (user or team); `null`: your default entity (ZeroVL's configs write the placeholder `your_entity`:
    set your own or `null`).
    """
    name: Optional[str] = None
    """Display name of the W&B run; `null`: `data.exp_name`."""
    tags: List[str] = field(default_factory=list)
    """Tags of the W&B run."""
    mode: Optional[Literal["online", "offline", "disabled"]] = None
    """`online`, `offline` (local files only, `wandb sync` uploads them later) or `disabled`; `null`: W&B's own
    choice (`WANDB_MODE`, `wandb offline`, else `online`).
    """


@dataclass
class DistConfig:
    """ZeroVL's launcher section: ``fp16: true`` selects precision fp16. ``url`` and ``distributed`` have no effect
    (the launcher decides both); they stay here because LAVIS's ``run.dist_url`` / ``run.distributed`` map onto them."""

    fp16: bool = False
    """ZeroVL's mixed-precision flag: when `precision` is null, `true` selects `fp16`, `false` `fp32`."""
    url: str = "env://"
    """Accepted for ZeroVL and LAVIS (`run.dist_url`) configs; unused (rendezvous comes from the launcher's
    environment).
    """
    distributed: bool = True
    """Accepted for ZeroVL and LAVIS (`run.distributed`) configs; unused (the launcher decides)."""
