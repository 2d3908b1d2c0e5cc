"""``python -m zvl_ds.config CFG.yaml [key=value ...]`` prints the resolved config a run would use (config errors exit
with code 2), then, as YAML comments, its training mixture: each source's samples, weight and expected share;
``--reference``, ``--accepted``, ``--lavis-mapping``, ``--lavis-model``, ``--presets`` and
``--lavis-datasets`` print the generated tables of docs/configuration.md and docs/lavis-zerovl.md."""
from __future__ import annotations

import sys
from typing import List, Optional

from zvl_ds.base.cli import run
from zvl_ds.config.load import load_config
from zvl_ds.config.reference import README_TABLE_FLAGS, README_TABLES, write_docs_tables
from zvl_ds.config.schema import ConfigError


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m zvl_ds.config CFG.yaml [key.sub=value ...]\n"
              "Prints the fully resolved config as YAML (what a run would use), then as comments the training "
              "mixture: each source's samples, weight and expected share.\n"
              "       python -m zvl_ds.config --reference | --accepted | --lavis-mapping | --lavis-model | --presets | "
              "--lavis-datasets\n"
              "Prints the Markdown table (as in docs/configuration.md and docs/lavis-zerovl.md) of every config "
              "key / of the ZeroVL keys accepted without effect / of LAVIS run: keys / of LAVIS model: options / "
              "of model.arch presets and their model.model_type variants / of LAVIS datasets: options.\n"
              "       python -m zvl_ds.config --write-docs [REPO]\n"
              "Regenerates those tables in place in REPO's docs/ pages (default: the current folder).")
        return 0 if argv else 2
    if argv[0] == "--write-docs":  # a developer's command: regenerate the tables in the checkout's docs/ pages
        import os

        root = argv[1] if len(argv) > 1 else os.getcwd()
        print("\n".join(f"rewrote {page}" for page in write_docs_tables(root)) or "docs tables are current")
        return 0
    if argv[0] in README_TABLE_FLAGS:
        sys.stdout.write(README_TABLES[README_TABLE_FLAGS[argv[0]]]())
        return 0
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(cfg.to_yaml())
    from zvl_ds.data.mixture import describe_mixture  # the data room (torch): only where a config is printed

    sys.stdout.write(describe_mixture(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
