"""Weights & Biases logging (``wandb.enable``): what TensorBoard gets, in one W&B run per run folder.

Rank 0 only (the ``Monitor`` calls it only there). The run id is kept in ``RUN/wandb_run.json`` with the last step
logged, so a resumed run continues the same W&B run, and the steps it replays (those after its checkpoint that
had already been logged before the stop) are not logged a second time: W&B's history keeps one row per step. A
run that starts from scratch in the folder starts a new W&B run.
"""
from __future__ import annotations

import json
import os
import secrets
import string
from typing import Any, Dict, List, Optional

from zvl_ds.config import Config, ConfigError

RUN_RECORD = "wandb_run.json"


def require_wandb(cfg: Config) -> None:
    """With ``wandb.enable``, fail now (exit 2), before any process group or model, when wandb cannot be imported."""
    if not cfg.wandb.enable:
        return
    try:
        import wandb  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"wandb.enable=true but the wandb package cannot be imported ({error}): install the "
                          "optional extra (pip install -e .[wandb], or bash tools/install.sh --test), or set "
                          "wandb.enable=false") from None


def read_run_record(run_dir: str) -> Optional[Dict[str, Any]]:
    """``RUN/wandb_run.json`` (``{"id": ..., "last_step": ...}``), or None before the first W&B run of the folder."""
    path = os.path.join(run_dir, RUN_RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        return {"id": str(record["id"]), "last_step": int(record.get("last_step", 0))}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a W&B run record ({error}); remove it to start a new W&B run") from None


def new_run_id() -> str:
    """A fresh W&B run id, in W&B's own form (8 lower-case letters and digits)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _write_run_record(run_dir: str, record: Dict[str, Any]) -> None:
    """Replace the record in one rename. Not synced to disk: it is rewritten at every step, and what it must
    survive is a killed process (the page cache keeps the file), not a machine crash."""
    path = os.path.join(run_dir, RUN_RECORD)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    os.replace(path + ".tmp", path)


class WandbSink:
    """Scalars and images to a W&B run, at the training step they belong to."""

    def __init__(self, run: Any, run_dir: str, record: Dict[str, Any], logged_through: int):
        self.run = run
        self.run_dir = run_dir
        self.record = record
        # steps up to here were logged by an earlier process of this run folder: a resume replays them
        self.logged_through = logged_through

    @classmethod
    def open(cls, cfg: Config, run_dir: str, resuming: bool) -> "WandbSink":
        """``resuming``: the run continues a checkpoint of ``run_dir``, so it continues its W&B run; a run that
        starts from scratch there (``ckpt.overwrite``, or no checkpoint yet) starts a new W&B run."""
        require_wandb(cfg)
        import wandb

        os.makedirs(run_dir, exist_ok=True)
        record = (read_run_record(run_dir) if resuming else None) or {"id": new_run_id(), "last_step": 0}
        _write_run_record(run_dir, record)  # before init: a run stopped during init still resumes this id
        options = cfg.wandb
        run = wandb.init(project=options.project, entity=options.entity, name=options.name or cfg.data.exp_name,
                         tags=list(options.tags) or None, mode=options.mode, id=record["id"], resume="allow",
                         dir=None if os.environ.get("WANDB_DIR") else run_dir, config=cfg.to_dict())
        # an evaluation-only run logs at the step it evaluates, even one that training logged already
        logged_through = 0 if cfg.evaluate else record["last_step"]
        return cls(run, run_dir, record, logged_through)

    def _log(self, step: int, values: Dict[str, Any]) -> None:
        if step <= self.logged_through or not values:
            return
        self.run.log(values, step=step)
        if step > self.record["last_step"]:
            self.record["last_step"] = step
            _write_run_record(self.run_dir, self.record)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        self._log(step, {name: float(value) for name, value in values.items() if value is not None})

    def image(self, name: str, image_hwc_uint8, step: int) -> None:
        import wandb

        self._log(step, {name: wandb.Image(image_hwc_uint8)})

    def close(self) -> None:
        self.run.finish()


def sinks_for(cfg: Config, run_dir: str, resuming: bool) -> List[WandbSink]:
    """The metric sinks a config asks for besides TensorBoard, opened (call it on rank 0 only)."""
    return [WandbSink.open(cfg, run_dir, resuming)] if cfg.wandb.enable else []
