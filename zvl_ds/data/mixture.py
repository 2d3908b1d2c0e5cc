"""The training mixture: each training source's shards, samples and weight, as the sampling plan takes them, and the
summary ``python -m zvl_ds.config`` prints (each source's samples, weight and expected share).
"""
from __future__ import annotations

from typing import List, Tuple

from zvl_ds.config import Config, DataConfig
from zvl_ds.data.sampling import DEBIAS, SEQUENTIAL, DatasetLayout, mixture_shares
from zvl_ds.data.sources import DataSourceError, ResolvedDataset, require_sizes, resolve_dataset, resolve_train_datasets


def source_weight(data: DataConfig, name: str) -> float:
    """``data.datasets.<name>.weight`` (1 for a dataset found by name under ``data_path``)."""
    source = data.datasets.get(name)
    return 1.0 if source is None else float(source.weight)


def train_layouts(data: DataConfig) -> Tuple[List[ResolvedDataset], List[DatasetLayout]]:
    """The training datasets, and the layouts (per-shard sizes and weights) the sampling plan reads them by."""
    datasets = resolve_train_datasets(data)
    layouts = [DatasetLayout(d.name, require_sizes(d, f"training (data.train_type={data.train_type})"),
                             source_weight(data, d.name)) for d in datasets]
    return datasets, layouts


_SHARE_MEANING = {
    DEBIAS: "the fraction of steps that draw the source",
    SEQUENTIAL: "the source's fraction of an epoch's steps",
}
_MIXED_MEANING = "the source's fraction of every batch"


def describe_mixture(cfg: Config) -> str:
    """YAML comment lines: per training source its samples, weight, expected share and passes per epoch (how often
    an epoch, ``sum(samples)`` samples, reads each sample on average: above 1 repeats, below 1 leaves some unread)."""
    data = cfg.data
    if not data.train_name:
        return "# training mixture: none (data.train_name is empty)\n"
    lines = [f"training mixture (data.train_type: {data.train_type}): share = "
             f"{_SHARE_MEANING.get(data.train_type, _MIXED_MEANING)}"]
    sizes: List[int] = []
    for name in data.train_name:
        try:
            sizes.append(sum(require_sizes(resolve_dataset(data, name, data.train_splits), "the mixture summary")))
        except DataSourceError as error:
            lines.append("  " + str(error).replace("\n", " "))
    if len(sizes) < len(data.train_name):
        lines.append("  (the shares need every source's samples)")
        return "".join(f"# {line}\n" for line in lines)
    weights = [source_weight(data, name) for name in data.train_name]
    total = sum(sizes)
    shares = mixture_shares(sizes, weights) if total else [0.0] * len(sizes)
    width = max([len("source")] + [len(name) for name in data.train_name])
    lines.append(f"  {'source':<{width}} {'samples':>12} {'weight':>8} {'share':>8} {'passes/epoch':>13}")
    for name, size, weight, share in zip(data.train_name, sizes, weights, shares):
        passes = share * total / size if size else 0.0
        lines.append(f"  {name:<{width}} {size:>12} {weight:>8g} {100 * share:>7.2f}% {passes:>13.3f}")
    lines.append(f"  {'total':<{width}} {total:>12}")
    return "".join(f"# {line}\n" for line in lines)
