"""Where a dataset's shards are and how many samples each holds.

A dataset is named in the config. Its shards come from ``data.datasets[name].shards`` (a shard spec) when given,
else from the shard writer's layout ``<folder>/<split>-NNNNNN.tar`` for each requested split, where the folder is
``data.datasets[name].folder`` when given, else ``data.data_path/<name>``.

A shard spec is one or more entries joined by ``::``. Each entry is a brace pattern (``train-{000000..000009}.tar``),
a glob, a folder (every ``*.tar`` in it), a text file listing shards (``.txt``/``.lst``/``.list``, one entry a line,
relative to the file), a tar path, or a URL (``http(s)://``, ``pipe:cmd``, anything with ``://``) read through
webdataset's ``gopen``. ``pipe:cmd`` runs ``cmd`` in a shell, so it is accepted only where the user wrote it (the
config or the command line), never from a list file. Relative local paths are looked up under ``data.data_path``
first, then the working folder.

Sizes (samples per shard): ``data.datasets[name].size`` (a total) wins; else the ``sizes.json`` next to the shards
(shard file name -> count, as the shard writer and OpenCLIP write it); else img2dataset's ``<shard>_stats.json``
(``successes``). Training plans every sample position ahead, so it needs them; validation does not.

A Parquet dataset (``data.datasets[name].parquet``, ``parquet_files.py``) has a row group where a tar dataset has a
shard: its units are the files' row groups, sized by the files' metadata.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from braceexpand import braceexpand

from zvl_ds.base.errors import UserError
from zvl_ds.config import DataConfig, DatasetSource
from zvl_ds.data.parquet_files import ParquetLayout, ParquetSourceError, expand_parquet_spec, read_layout

LOG = logging.getLogger(__name__)

LIST_FILE_SUFFIXES = (".txt", ".lst", ".list")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = set("*?[")
PIPE_PREFIX = "pipe:"  # webdataset runs the rest of the entry as a shell command


class DataSourceError(UserError, ValueError):
    """A dataset that cannot be found or sized; the message names the dataset and the spec."""


@dataclass(frozen=True)
class ResolvedDataset:
    """A dataset's shards in a fixed order, with per-shard sample counts when known. For a Parquet dataset a
    "shard" is a row group: ``shards`` names each one's file and ``parquet`` says which row group it is."""

    name: str
    shards: Tuple[str, ...]
    shard_sizes: Optional[Tuple[int, ...]]  # None: unknown
    spec: str  # where the shards came from, for messages
    parquet: Optional[ParquetLayout] = None

    @property
    def size(self) -> Optional[int]:
        return None if self.shard_sizes is None else sum(self.shard_sizes)


def is_url(entry: str) -> bool:
    return "://" in entry or entry.startswith(PIPE_PREFIX)


def is_seekable_local_tar(shard: str) -> bool:
    """Plain local tars are read by seeking over members; everything else is streamed."""
    return not is_url(shard) and shard.endswith(".tar")


# --------------------------------------------------------------------------------------------------
# Shard specs
# --------------------------------------------------------------------------------------------------


def expand_shard_spec(spec: str, bases: Sequence[str] = ("",)) -> List[str]:
    """All shards named by ``spec``, in order. Raises DataSourceError when the spec matches nothing.

    Local files named explicitly (a brace pattern or a list) but absent are kept: the reader counts them as
    unreadable shards, as it would a shard that disappears mid-run. A spec in which nothing exists is an error.
    """
    if not spec or not spec.strip():
        raise DataSourceError("empty shard spec")
    shards: List[str] = []
    for entry in (part.strip() for part in spec.split("::")):
        if entry:
            shards.extend(_expand_entry(entry, bases, spec))
    if not any(is_url(shard) or os.path.exists(shard) for shard in shards):
        tried = ", ".join(repr(os.path.join(base, spec) if base else spec) for base in bases)
        raise DataSourceError(f"shard spec {spec!r} matches nothing (looked for {tried})")
    return shards


def _expand_entry(entry: str, bases: Sequence[str], spec: str) -> List[str]:
    if is_url(entry):
        return list(braceexpand(entry))
    base = _base_with_matches(entry, bases)
    found: List[str] = []
    for item in braceexpand(entry):
        path = item if os.path.isabs(item) or not base else os.path.join(base, item)
        if _GLOB_CHARS & set(item):
            found.extend(sorted(p for p in glob.glob(path) if os.path.isfile(p)))
        elif os.path.isdir(path):
            tars = sorted(p for p in glob.glob(os.path.join(path, "*")) if p.endswith(SHARD_SUFFIXES))
            if not tars:
                raise DataSourceError(f"shard spec {spec!r}: folder {path!r} holds no .tar shards")
            found.extend(tars)
        elif path.endswith(LIST_FILE_SUFFIXES) and os.path.isfile(path):
            found.extend(_read_shard_list(path, spec))
        else:
            found.append(path)
    return found


def _base_with_matches(entry: str, bases: Sequence[str]) -> str:
    """The first base folder under which any expansion of ``entry`` exists (else the first base)."""
    if os.path.isabs(entry):
        return ""
    for base in bases:
        for item in braceexpand(entry):
            path = os.path.join(base, item) if base else item
            if (_GLOB_CHARS & set(item) and glob.glob(path)) or os.path.exists(path):
                return base
    return bases[0] if bases else ""


def _read_shard_list(path: str, spec: str) -> List[str]:
    """A list file is data, like the shards it names: it may name files and URLs, never a shell command."""
    folder = os.path.dirname(os.path.abspath(path))
    shards: List[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if line.startswith(PIPE_PREFIX):
                raise DataSourceError(f"{path}, line {number}: a list file cannot name a `pipe:` shard (it would "
                                      f"run the shell command {line[len(PIPE_PREFIX):]!r}); write `pipe:` entries "
                                      "in the config's shard spec or on the command line instead")
            if line and not line.startswith("#"):
                shards.extend(_expand_entry(line, (folder,), spec))
    if not shards:
        raise DataSourceError(f"shard spec {spec!r}: list file {path!r} names no shards")
    return shards


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------


def _read_json(path: str) -> Optional[object]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested too deeply
        LOG.warning("ignoring unreadable size file %s: %s", path, error)
        return None


def shard_sizes_from_files(shards: Sequence[str]) -> Tuple[List[Optional[int]], List[str]]:
    """Per-shard counts from ``sizes.json`` (same folder) or ``<stem>_stats.json``; also the shards left unknown."""
    sizes_files: Dict[str, Dict[str, int]] = {}
    sizes: List[Optional[int]] = []
    unknown: List[str] = []
    for shard in shards:
        count: Optional[int] = None
        if not is_url(shard):
            folder, name = os.path.split(shard)
            if folder not in sizes_files:
                table = _read_json(os.path.join(folder, "sizes.json"))
                sizes_files[folder] = table if isinstance(table, dict) else {}
            value = sizes_files[folder].get(name)
            if value is None:
                stem = name[: -len(".tar")] if name.endswith(".tar") else os.path.splitext(name)[0]
                stats = _read_json(os.path.join(folder, f"{stem}_stats.json"))
                value = stats.get("successes") if isinstance(stats, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                count = value
        sizes.append(count)
        if count is None:
            unknown.append(shard)
    return sizes, unknown


def split_evenly(total: int, parts: int) -> List[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _sizes_for(name: str, shards: Sequence[str], configured: Optional[int]) -> Optional[Tuple[int, ...]]:
    from_files, unknown = shard_sizes_from_files(shards)
    if configured is not None:
        if not unknown and sum(from_files) == configured:  # type: ignore[arg-type]
            return tuple(from_files)  # type: ignore[arg-type]
        if not unknown:
            LOG.warning("dataset %r: data.datasets.%s.size=%d but the size files say %d; using the config value "
                        "(spread evenly over %d shards)", name, name, configured, sum(from_files), len(shards))
        return tuple(split_evenly(configured, len(shards)))
    if unknown:
        return None
    return tuple(from_files)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Datasets by name
# --------------------------------------------------------------------------------------------------


def resolve_dataset(data: DataConfig, name: str, splits: Sequence[str]) -> ResolvedDataset:
    """Shards and sizes of dataset ``name`` (explicit ``data.datasets[name]`` or ``data_path/name/<split>-*.tar``)."""
    source = data.datasets.get(name)
    if source is not None and source.size is not None and source.size < 0:
        raise DataSourceError(f"data.datasets.{name}.size must be >= 0, got {source.size}")
    if source is not None and source.parquet:
        return resolve_parquet_dataset(data, name, source)
    if source is not None and source.shards:
        spec = source.shards
        try:
            shards = expand_shard_spec(spec, (data.data_path, ""))
        except DataSourceError as error:
            raise DataSourceError(f"dataset {name!r} (data.datasets.{name}.shards): {error}") from None
    else:
        folder = source.folder if source is not None and source.folder else os.path.join(data.data_path, name)
        patterns = [os.path.join(folder, f"{split}-*.tar") for split in splits]
        spec = " + ".join(patterns)
        if not os.path.isdir(folder) and source is not None and source.folder:
            raise DataSourceError(f"dataset {name!r}: data.datasets.{name}.folder {folder!r} is not a folder")
        if not os.path.isdir(folder):
            raise DataSourceError(f"dataset {name!r}: no folder {folder!r} under data.data_path and no "
                                  f"data.datasets.{name}.shards spec" + _unprefixed_hint(name, data.data_path))
        shards = [path for pattern in patterns for path in sorted(glob.glob(pattern))]
        if not shards:
            raise DataSourceError(f"dataset {name!r}: no shards match {spec} (splits {list(splits)})"
                                  + _present_splits_hint(folder) + _unprefixed_hint(name, folder))
    configured = source.size if source is not None else None
    return ResolvedDataset(name=name, shards=tuple(shards), shard_sizes=_sizes_for(name, shards, configured),
                           spec=spec)


def resolve_parquet_dataset(data: DataConfig, name: str, source: DatasetSource) -> ResolvedDataset:
    """A Parquet dataset's row groups as its units, sized from the files' metadata."""
    where = f"data.datasets.{name}"
    try:
        files = expand_parquet_spec(source.parquet, (data.data_path, ""))
        unit_files, sizes, layout = read_layout(files, source.image_column, source.caption_column,
                                                (f"{where}.image_column", f"{where}.caption_column"))
    except ParquetSourceError as error:
        raise DataSourceError(f"dataset {name!r} ({where}.parquet): {error}") from None
    if source.size is not None and source.size != sum(sizes):
        raise DataSourceError(f"dataset {name!r}: {where}.size={source.size}, but its Parquet files hold "
                              f"{sum(sizes)} rows; the metadata gives the size: drop {where}.size")
    return ResolvedDataset(name=name, shards=tuple(unit_files), shard_sizes=tuple(sizes), spec=source.parquet,
                           parquet=layout)


_SPLIT_SHARD = re.compile(r"(.+)-\d+\.tar")


def _present_splits_hint(folder: str) -> str:
    """Name the splits a shard writer's folder does hold (a LAVIS config asks for ``val``; the writer's is
    ``valid``), and the keys that choose them."""
    present = sorted({match.group(1) for path in glob.glob(os.path.join(glob.escape(folder), "*.tar"))
                      for match in [_SPLIT_SHARD.fullmatch(os.path.basename(path))] if match})
    if not present:
        return ""
    return (f"; the folder holds the splits {present}: choose among them with data.train_splits / "
            "data.valid_splits (LAVIS: run.train_splits / run.valid_splits)")


def _unprefixed_hint(name: str, folder: str) -> str:
    """Shards without a split prefix (img2dataset writes ``00000.tar``, ...) are not guessed to be one split:
    say which key selects them."""
    if not os.path.isdir(folder) or not glob.glob(os.path.join(glob.escape(folder), "*.tar")):
        return ""
    return (f". {folder!r} holds .tar shards without a split prefix (as img2dataset writes them): select them "
            f"with data.datasets.{name}.shards={folder}")


def require_sizes(dataset: ResolvedDataset, purpose: str) -> Tuple[int, ...]:
    """The per-shard sizes, or a clear error naming the shards whose size is unknown."""
    if dataset.shard_sizes is not None:
        return dataset.shard_sizes
    _, unknown = shard_sizes_from_files(dataset.shards)
    listed = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
    raise DataSourceError(
        f"dataset {dataset.name!r} ({dataset.spec}): {purpose} needs its size, but no sizes.json entry or "
        f"*_stats.json gives the sample count of {listed}; set data.datasets.{dataset.name}.size")


def resolve_train_datasets(data: DataConfig) -> List[ResolvedDataset]:
    if not data.train_name:
        raise DataSourceError("data.train_name is empty: name at least one training dataset")
    if len(set(data.train_name)) != len(data.train_name):
        raise DataSourceError(f"data.train_name lists a dataset twice: {data.train_name}")
    return [resolve_dataset(data, name, data.train_splits) for name in data.train_name]
