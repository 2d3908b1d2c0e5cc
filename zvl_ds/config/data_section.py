"""The ``data:`` section: the datasets a run reads (by name, under ``data_path`` or from explicit sources), the
zero-shot sets, the global batch sizes, the loaders and the limit on skipped bad samples; with the checks that
concern this section alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

from zvl_ds.base.errors import ConfigError
from zvl_ds.config.keys import check_seconds


@dataclass
class DatasetSource:
    """Explicit form of a dataset: where its shards are and, optionally, how many samples it has."""

    shards: str = ""
    """Shard spec of dataset `<name>`: a brace pattern, glob, folder, text file listing shards, tar path or URL
    (`http(s)://`, `pipe:`); several joined by `::`. `pipe:CMD` runs CMD in a shell, so it is refused inside list
    files. Empty: use `data_path/<name>/<split>-*.tar`.
    """
    size: Optional[int] = None
    """Total samples of dataset `<name>`; `null`: read from `sizes.json` or `*_stats.json` next to the shards. Training
    needs a size; when given it wins and is spread evenly over the shards unless the size files agree.
    """
    weight: float = 1.0
    """Multiplies dataset `<name>`'s share of the training mixture: with `train_type: shuffle` every batch takes the
    sources in proportion to weight x samples, with `debias` a step draws a source with probability proportional to
    weight x samples. Relative (scaling every weight alike changes nothing); an epoch stays `sum(samples)` samples,
    so a source whose share exceeds its samples repeats them in a fresh order within the epoch and a down-weighted
    one leaves the rest of its pass unread. A finite number > 0; not with `sequential`. `1` everywhere: the stream
    of an unweighted run, sample for sample.
    """
    # a folder in the shard writer's layout (<split>-NNNNNN.tar): the run's splits pick its shards (LAVIS storage)
    folder: str = ""
    """A folder in the shard writer's layout (`<split>-NNNNNN.tar`, as python -m zvl_ds.make_shards writes
    `OUT/<name>/`) holding dataset `<name>`: the run's `train_splits` / `valid_splits` pick its shards, as under
    `data_path`. LAVIS's `datasets.<name>.build_info.images.storage` maps here. Not with `shards`.
    """
    parquet: str = ""
    """Parquet files holding dataset `<name>`, read in place (the `parquet` extra, pyarrow): a file, a glob (a Hugging
    Face dataset snapshot's `data/train-*.parquet`) or a folder (its `*.parquet`); several joined by `::`. Row
    groups are read as shards are; sizes come from the files' metadata. Not with `shards` or `folder`.
    """
    image_column: str = ""
    """With `parquet`: the column of image bytes, a binary column or a struct with a binary `bytes` field (the Hugging
    Face `Image` feature). Empty: the first of `image`, `jpg`, `jpeg`, `png`, `webp`, `img` the files have
    (img2dataset writes `jpg`).
    """
    caption_column: str = ""
    """With `parquet`: the caption column, a string or a list of strings (several captions of one image, as ZeroVL
    keeps them for retrieval). Empty: the first of `caption`, `captions`, `text`, `sentences` the files have.
    """

    def check(self, where: str) -> None:
        """``where``: this entry's key, ``data.datasets.<name>``."""
        if self.shards and self.folder:
            raise ConfigError(f"{where}: give its shards one way, `shards` (a shard spec) or "
                              "`folder` (a shard writer's folder read by split), not both")
        if self.parquet and (self.shards or self.folder):
            raise ConfigError(f"{where}: `parquet` names the dataset's files; drop `shards` / `folder`")
        columns = [key for key in ("image_column", "caption_column") if getattr(self, key)]
        if columns and not self.parquet:
            raise ConfigError(f"{where}.{columns[0]}: columns are chosen in Parquet files; set {where}.parquet")


@dataclass
class ZeroShotSetConfig:
    """A zero-shot classification set evaluated at the validation interval (logged as eval/<name>/top1, top5)."""

    path: str = ""
    """A folder laid out by class (`PATH/<class>/<image>`, class c = the c-th sorted sub-folder), a `.csv` of
    `image,label` rows (paths relative to the CSV), or a clip_benchmark classification folder (`make_shards
    --clip-benchmark`: `test/*.tar`, `classnames.txt`, `zeroshot_classification_templates.txt`).
    """
    classes: Optional[str] = None
    """File of the class names the prompts use, one per line in class order; `null`: the folder names or labels with
    `_` as a space (a clip_benchmark folder: its `classnames.txt`).
    """
    templates: Optional[str] = None
    """File of prompt templates, one per line, `{}` for the class name; `null`: ten built-in photo prompts (a
    clip_benchmark folder: its own templates).
    """

    def check(self, where: str) -> None:
        """``where``: this set's key, ``data.zeroshot.<name>``."""
        if not self.path:
            raise ConfigError(f"{where}.path: give a class folder, an image,label CSV or a clip_benchmark "
                              "classification folder")


@dataclass
class DataConfig:
    exp_name: str = "your_exp_name"
    """Name of the run folder `ckpt.dir/exp_name` (checkpoints, config.yaml, TensorBoard, eval_metrics.jsonl); a folder
    name without `/`.
    """
    train_type: Literal["shuffle", "sequential", "debias"] = "shuffle"
    """How steps draw from the training datasets. `shuffle`: every batch is a random mix, each dataset in proportion to
    its size (times its `data.datasets.<name>.weight`); `sequential`: an epoch runs one dataset after the other;
    `debias`: each step takes its whole batch from one dataset drawn with probability proportional to its size (times
    its weight; ZeroVL's debiased sampling).
    """
    train_steps: int = -1
    """ZeroVL's run length: > 0 fixes the number of optimizer steps (`runner.train_steps` wins when both are > 0)."""
    train_name: List[str] = field(default_factory=lambda: ["sbu", "cc3m"])
    """Names of the training datasets (each found via `data.datasets.<name>` or `data_path/<name>/`); no name twice."""
    valid_name: List[str] = field(default_factory=lambda: ["f30k", "coco"])
    """Names of the validation datasets evaluated during training and by python -m zvl_ds.eval_retrieval."""
    # ZeroVL reads CSVs under ./data/; zvl_ds streams shards, made by python -m zvl_ds.make_shards --out shards.
    data_path: str = "./shards/"
    """Root of the shard writer's layout `data_path/<name>/<split>-NNNNNN.tar`; relative paths in
    `data.datasets.<name>.shards` are looked up here first, then in the working folder.
    """
    datasets: Dict[str, DatasetSource] = field(default_factory=dict)
    """Explicit sources by dataset name (a mapping `name -> {shards, size}`); a dataset not listed here is read from
    `data_path/<name>/`.
    """
    manifest: str = ""
    """A mixture file (YAML, its path relative to the working folder): a mapping `name -> {shards, size, weight, ...}`
    whose keys are those of `data.datasets.<name>`, with paths relative to the file. Its sources become
    `data.datasets` (keys the config gives win, key by key) and `data.train_name`, in the file's order (a
    `train_name` from the config is replaced). Empty: none.
    """
    zeroshot: Dict[str, ZeroShotSetConfig] = field(default_factory=dict)
    """Zero-shot classification sets by name, evaluated at the validation interval with the validation transforms;
    logged as `eval/<name>/top1` and `top5`, every image counted once over the ranks.
    """
    train_splits: List[str] = field(default_factory=lambda: ["train"])
    """Split prefixes read for training datasets found under `data_path/<name>/` (`<split>-*.tar`); ignored for
    datasets with an explicit `shards` spec.
    """
    valid_splits: List[str] = field(default_factory=lambda: ["valid"])
    """Split prefixes read for validation datasets found under `data_path/<name>/`; ignored for datasets with an
    explicit `shards` spec.
    """
    test_splits: List[str] = field(default_factory=list)
    """Accepted for LAVIS configs (`run.test_splits`); unused."""
    batch_size: int = 1024
    """GLOBAL contrastive batch per optimizer step, summed over all ranks (as in ZeroVL); must be divisible by the
    world size. Each rank loads `batch_size / world_size` samples a step.
    """
    batch_size_train: Optional[int] = None
    """GLOBAL chunk of the `clip_bsgs` runner (samples per forward, summed over ranks); must divide `data.batch_size`
    and be divisible by the world size. `null`: `batch_size` (one chunk). The `clip` runner ignores it.
    """
    batch_size_val: int = 1024
    """GLOBAL evaluation batch, summed over ranks; must be divisible by the world size."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the main process). Also the number of loader roles (`max(1,
    n)`) of the data plan, so it changes the sample order and a saved loader position cannot be resumed with another
    value.
    """
    shuffle_buffer: int = 1000
    """Samples in the seeded shuffle buffer each loader role passes its stretch of shards through (larger: better
    mixing, more memory). Part of the resumable data plan.
    """
    enable_valid: bool = True
    """Evaluate the `data.valid_name` sets during training (see `runner.val_interval*`); false turns evaluation during
    training off.
    """
    max_bad_sample_warnings: int = 20
    """Warnings printed per reason for skipped bad samples before they go quiet; every skip is still counted
    (TensorBoard `data/skipped_<reason>`).
    """
    loader_timeout: float = 600.0
    """Seconds a loader worker may take for one batch before the run fails instead of hanging (applies when
    `num_workers` > 0).
    """
    max_skip_fraction: float = 0.01
    """Largest fraction of the training samples read within `data.skip_window` that may be skipped for any one
    reason (unreadable or missing shard, corrupt image, missing caption ...; summed over ranks, checked every
    `log.interval_train` steps). Above it every rank stops with exit code 2, naming the datasets, shards and reason,
    after saving a checkpoint of the last good step. `1.0` never stops.
    """
    skip_window: int = 100000
    """Samples read (good and skipped, all ranks) over which `data.max_skip_fraction` is measured; until that many
    were read, `max_skip_fraction * skip_window` skips of one reason are allowed.
    """

    def check(self) -> None:
        for key in ("batch_size", "batch_size_val", "num_workers", "shuffle_buffer"):
            minimum = 0 if key == "num_workers" else 1
            if getattr(self, key) < minimum:
                raise ConfigError(f"data.{key}: must be >= {minimum}, got {getattr(self, key)}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError("data.max_skip_fraction: must be in [0, 1] (1: never stop), "
                              f"got {self.max_skip_fraction}")
        if self.skip_window < 1:
            raise ConfigError(f"data.skip_window: must be >= 1 sample, got {self.skip_window}")
        if self.batch_size_train is not None:
            if self.batch_size_train < 1 or self.batch_size % self.batch_size_train:
                raise ConfigError(f"data.batch_size_train={self.batch_size_train} must divide "
                                  f"data.batch_size={self.batch_size}")
        for name, zeroshot in self.zeroshot.items():
            zeroshot.check(f"data.zeroshot.{name}")
            if name in self.valid_name:
                raise ConfigError(f"data.zeroshot.{name}: the name is also a data.valid_name set; their metrics "
                                  "would share eval/<name>/; rename one")
        for name, source in self.datasets.items():
            source.check(f"data.datasets.{name}")
        self._check_weights()
        check_seconds("data.loader_timeout", self.loader_timeout)
        if not self.exp_name or "/" in self.exp_name:
            raise ConfigError(f"data.exp_name: must be a non-empty folder name, got {self.exp_name!r}")

    def _check_weights(self) -> None:
        for name, source in self.datasets.items():
            if not (math.isfinite(source.weight) and source.weight > 0):
                raise ConfigError(f"data.datasets.{name}.weight: must be a finite number > 0, got {source.weight}")
        weighted = [name for name in self.train_name if name in self.datasets and self.datasets[name].weight != 1]
        if weighted and self.train_type == "sequential":
            raise ConfigError(f"data.datasets.{weighted[0]}.weight={self.datasets[weighted[0]].weight}: weights apply "
                              "to data.train_type shuffle and debias; a sequential epoch reads each dataset once")
