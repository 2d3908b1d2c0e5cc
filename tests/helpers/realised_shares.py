"""Realised against requested source shares, printed: ``python -m tests.helpers.realised_shares`` (from the repository
root). Three synthetic sources (480, 200 and 60 samples, weights 0.25, 1 and 4): the training loader's batches in
shuffle mode (2 ranks x 3 epochs, every sample's source) and in debias mode (3000 steps), and the plan's debias
draws over 1,000,000 steps. tests/unit/test_mixture.py holds the same shares to stated bounds."""
import tempfile
from collections import Counter
from typing import Dict

from tests.helpers.data_fixtures import make_config, write_dataset

from zvl_ds.data import build_train_loader, load_tokenizer
from zvl_ds.data.sampling import DEBIAS, DatasetLayout, build_plan

SOURCES = {"web": [120] * 4, "cc": [100] * 2, "coco": [60]}  # 480, 200 and 60 samples
WEIGHTS = {"web": 0.25, "cc": 1.0, "coco": 4.0}  # weight x samples: 120, 200, 240


def report(title: str, counts: Counter, requested: Dict[str, float]) -> None:
    draws = sum(counts.values())
    print(f"{title}: {draws} draws")
    for name in SOURCES:
        print(f"  {name:5s} requested {requested[name]:.4f}  realised {counts[name] / draws:.4f}  ({counts[name]})")


def main() -> None:
    total = sum(WEIGHTS[name] * sum(sizes) for name, sizes in SOURCES.items())
    requested = {name: WEIGHTS[name] * sum(sizes) / total for name, sizes in SOURCES.items()}
    root = tempfile.mkdtemp(prefix="realised_shares_")
    for name, sizes in SOURCES.items():
        write_dataset(root, name, "train", sizes)  # keys start with the source's name
    weights = {f"data.datasets.{name}.weight": weight for name, weight in WEIGHTS.items()}
    tokenizer = load_tokenizer(make_config(root).model.text_encoder)

    cfg = make_config(root, train=tuple(SOURCES), batch_size=8, num_workers=2, extra=weights)
    samples: Counter = Counter()
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2, tokenizer)
        batches = iter(loader)
        for _ in range(3 * loader.steps_per_epoch):
            samples.update(key.split("_")[0] for key in next(batches).keys)
        loader.close()
    report("shuffle, loader, 2 ranks x 3 epochs, samples", samples, requested)

    cfg = make_config(root, train=tuple(SOURCES), batch_size=2, num_workers=2, train_type="debias", extra=weights)
    loader = build_train_loader(cfg, 0, 1, tokenizer)
    batches = iter(loader)
    report("debias, loader, 3000 steps", Counter(next(batches).dataset for _ in range(3000)), requested)
    loader.close()

    plan = build_plan(DEBIAS, [DatasetLayout(name, tuple(sizes), WEIGHTS[name]) for name, sizes in SOURCES.items()],
                      7, 0, 1, 1, 2)
    names = list(SOURCES)
    report("debias, plan, 1,000,000 steps", Counter(names[plan.source_of_step(g)] for g in range(1_000_000)),
           requested)


if __name__ == "__main__":
    main()
