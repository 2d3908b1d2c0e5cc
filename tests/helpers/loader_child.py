"""A training loader in a process of its own, to be killed: ``python -m tests.helpers.loader_child CONFIG OUT RANK WORLD
INTERVAL`` yields steps until killed, appends each step's keys to ``OUT/keys.txt`` and, every INTERVAL steps, saves
the loader's state to ``OUT/state.json`` as a checkpoint keeps it (written atomically: whole or absent)."""
import json
import os
import sys

from zvl_ds.config import load_config
from zvl_ds.data import build_train_loader, load_tokenizer


def main(config_path: str, out: str, rank: int, world_size: int, interval: int) -> None:
    cfg = load_config(config_path)
    loader = build_train_loader(cfg, rank, world_size, load_tokenizer(cfg.model.text_encoder))
    with open(os.path.join(out, "keys.txt"), "a", encoding="utf-8") as keys:
        for batch in loader:
            keys.write(" ".join([str(batch.step), *batch.keys]) + "\n")
            keys.flush()
            if (batch.step + 1) % interval == 0:
                partial = os.path.join(out, "state.json.partial")
                with open(partial, "w", encoding="utf-8") as handle:
                    json.dump(loader.state_dict(), handle)
                os.replace(partial, os.path.join(out, "state.json"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
