"""A record of what the sampler plans and the training loader yields, in plain JSON values, so the stream of a
later version can be compared with the stream recorded from an earlier one (tests/unit/stream_before_weights.json
was recorded on branch house at 1260f3f, before source weights existed: ``python -m tests.helpers.stream_record``).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from typing import Dict, List

from tests.helpers.data_fixtures import make_config, write_dataset

from zvl_ds.data import build_train_loader, load_tokenizer
from zvl_ds.data.sampling import DatasetLayout, build_plan

RECORD_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unit",
                           "stream_before_weights.json")

# (mode, shard sizes per dataset, world size, roles, per-rank batch)
PLAN_CASES = [("shuffle", [[7, 5, 9], [4, 4], [13]], 2, 3, 3), ("shuffle", [[30, 2], [3]], 3, 2, 4),
              ("shuffle", [[11, 6]], 2, 2, 2), ("debias", [[5, 4], [3], [20, 1]], 2, 2, 2),
              ("sequential", [[10, 10], [9], [3]], 1, 2, 4)]
# (mode, datasets with shard sizes, rank, world size, workers, global batch, steps)
LOADER_CASES = [("shuffle", {"aa": [7, 6, 9], "bb": [11], "cc": [5, 5]}, 1, 2, 2, 8, 14),
                ("debias", {"aa": [7, 6, 9], "bb": [11], "cc": [5, 5]}, 0, 2, 2, 8, 14),
                ("sequential", {"aa": [7, 6, 9], "bb": [11]}, 0, 1, 0, 4, 12),
                ("shuffle", {"aa": [7, 6, 9]}, 0, 1, 0, 4, 8)]


def plan_record(mode: str, sizes: List[List[int]], world_size: int, roles: int, batch: int) -> Dict[str, object]:
    """Every rank's steps per epoch, step sources and pieces of the first three epochs/passes."""
    layouts = [DatasetLayout(f"d{i}", tuple(s)) for i, s in enumerate(sizes)]
    ranks = []
    for rank in range(world_size):
        plan = build_plan(mode, layouts, 11, rank, world_size, roles, batch)
        pieces = []
        for source in range(len(plan.source_names)):
            for role in range(roles):
                for index in range(3):
                    piece = plan.piece(source, role, index)
                    pieces.append({"parts": [[p.dataset, p.pass_index, [[s.shard, s.start, s.stop] for s in p.segments]]
                                             for p in piece.parts],
                                   "pattern": None if piece.pattern is None else piece.pattern.tolist(),
                                   "seed": piece.shuffle_seed})
        ranks.append({"steps": plan.steps_per_epoch, "sources": [plan.source_of_step(g) for g in range(60)],
                      "pieces": pieces})
    return {"case": [mode, sizes, world_size, roles, batch], "ranks": ranks}


def loader_record(root: str, mode: str, datasets: Dict[str, List[int]], rank: int, world_size: int, workers: int,
                  batch: int, steps: int, weights: Dict[str, float] = None) -> Dict[str, object]:
    """The batches a loader yields (step, dataset, keys, a digest of the token ids) and its state after them.
    ``weights``: ``data.datasets.<name>.weight`` to set (none: the key is left out)."""
    for name, shard_sizes in datasets.items():
        if not os.path.isdir(os.path.join(root, name)):
            write_dataset(root, name, "train", shard_sizes)
    extra = {f"data.datasets.{name}.weight": weight for name, weight in (weights or {}).items()}
    cfg = make_config(root, train=tuple(datasets), batch_size=batch, num_workers=workers, train_type=mode,
                      extra=extra)
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    loader = build_train_loader(cfg, rank, world_size, tokenizer)
    iterator = iter(loader)
    batches = []
    for _ in range(steps):
        batch_ = next(iterator)
        batches.append([batch_.step, batch_.dataset, list(batch_.keys),
                        hashlib.sha256(batch_.input_ids.numpy().tobytes()).hexdigest()[:16]])
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    return {"case": [mode, datasets, rank, world_size, workers, batch, steps], "batches": batches, "state": state}


def record() -> Dict[str, object]:
    with tempfile.TemporaryDirectory() as root:
        return {"plans": [plan_record(*case) for case in PLAN_CASES],
                "loaders": [loader_record(os.path.join(root, str(i)), *case) for i, case in enumerate(LOADER_CASES)]}


if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else RECORD_FILE, "w") as handle:
        json.dump(record(), handle, separators=(",", ":"))
        handle.write("\n")
