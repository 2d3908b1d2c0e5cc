"""Write the procedural demo datasets (demo_flat, demo_sketch, demo_val) in the ZeroVL layout, and
demo_classify (class folders by shape) for zero-shot classification.

  python -m zvl_ds.make_demo_data --out data [--seed 0] [--train-size 2000] [--valid-size 200]
then
  python -m zvl_ds.make_shards --data-root data --dataset demo_flat demo_sketch demo_val --out shards
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from zvl_ds.base.cli import run
from zvl_ds.data.writing.demo import TEMPLATES, make_demo_data
from zvl_ds.observe.logs import setup_logging


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zvl_ds.make_demo_data",
        description="Procedurally drawn image-caption data (64x64 JPEG shapes; same concepts in a flat and a "
                    "sketch style, plus a validation set with several captions per image). Same seed -> "
                    "byte-identical files; existing files are overwritten.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="data", help="data root to write demo_flat/, demo_sketch/, demo_val/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=2000, help="images in each training dataset")
    parser.add_argument("--valid-size", type=int, default=200, help="images in demo_val")
    parser.add_argument("--captions-per-image", type=int, default=5,
                        help=f"captions per validation image (1..{len(TEMPLATES)})")
    parser.add_argument("--classify-size", type=int, default=100,
                        help="images in demo_classify (zero-shot classification by shape, one folder per shape); 0: none")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        written = make_demo_data(args.out, seed=args.seed, train_size=args.train_size, valid_size=args.valid_size,
                                 captions_per_image=args.captions_per_image, classify_size=args.classify_size)
    except ValueError as error:
        print(f"make_demo_data: error: {error}", file=sys.stderr)
        return 2
    for dataset in written:
        if dataset.split == "classify":
            print(f"{dataset.csv_path}/<shape>/: {dataset.images} images ({dataset.split})")
        else:
            print(f"{dataset.csv_path}: {dataset.images} images, {dataset.captions} captions ({dataset.split})")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def cli() -> int:
    """``python -m zvl_ds.make_demo_data`` and the console script ``zvl-make-demo-data``: errors exit through ``zvl_ds.base.cli.run``."""
    setup_logging()  # here, not in main(): logging is the process's, and main() is also called in-process
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
