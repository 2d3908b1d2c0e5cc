"""Turn ZeroVL annotation CSVs and image folders into WebDataset shards (output format: zvl_ds/data/writing/shard_writer.py;
input layout: zvl_ds/data/writing/annotations.py).

Examples:
  python -m zvl_ds.make_shards --data-root data --dataset demo_flat demo_sketch demo_val --out shards
  python -m zvl_ds.make_shards --csv data/coco/valid_anno.csv --images data/coco/valid --dataset coco --out shards
  python -m zvl_ds.make_shards --benchmark --bench-images 512
  python -m zvl_ds.make_shards --clip-benchmark --data-root data --dataset demo_val --out clip_benchmark
  python -m zvl_ds.make_shards --clip-benchmark --labelled data/demo_classify --dataset demo_classify --out clip_benchmark
  python -m zvl_ds.make_shards --parquet "hf/data/train-*.parquet" --dataset hf --split train --out shards

--parquet converts Parquet rows (a Hugging Face dataset snapshot, img2dataset's Parquet) to the same shards (see
zvl_ds/data/writing/parquet_shards.py); --image-column and --caption-column choose the columns.

--clip-benchmark writes clip_benchmark's WebDataset layout instead (OUT/<name>/test/N.tar, nshards.txt,
dataset_type.txt, classnames.txt, zeroshot_classification_templates.txt; see zvl_ds/data/writing/clip_benchmark.py):
a retrieval set per ZeroVL CSV, or with --labelled a classification set from a folder by class or an image,label CSV.

Exit codes: 0 done; 1 nothing written, or anything skipped under --strict; 2 bad input (message, no traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from zvl_ds.base.cli import run
from zvl_ds.base.errors import UserError
from zvl_ds.bench import data as bench
from zvl_ds.data.writing import annotations, clip_benchmark, parquet_shards
from zvl_ds.data.writing import shard_writer as shards
from zvl_ds.data.writing.images import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS
from zvl_ds.evaluation import zero_shot
from zvl_ds.observe.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zvl_ds.make_shards",
        description="Write WebDataset shards (OUT/<name>/<split>-NNNNNN.tar, one sample per image with all its "
                    "captions: KEY.jpg, KEY.json, KEY.txt) from DATA_ROOT/<name>/<split>_anno.csv and the image "
                    "folder DATA_ROOT/<name>/<split>/. Also writes <split>-NNNNNN_stats.json per shard, "
                    "<split>_stats.json per split and sizes.json. Same input -> byte-identical tars.",
        epilog="Bad rows are skipped and counted by reason (missing_file, empty_file, not_an_image, corrupt_image, "
               "too_many_pixels, float_image, not_a_regular_file, file_too_large, no_valid_caption, "
               "invalid_utf8, empty_caption, invalid_id, malformed_row, path_outside_images, other_error). Exit codes: 0 done; 1 nothing written or (with --strict) "
               "anything skipped; 2 bad input.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_argument_group("input")
    source.add_argument("--data-root", default="data", help="folder holding one sub-folder per dataset")
    source.add_argument("--dataset", nargs="+", action="extend", default=[], metavar="NAME",
                        help="dataset folder name(s) under --data-root; repeatable")
    source.add_argument("--split", default="all", choices=["train", "valid", "all"],
                        help="which split; 'all' takes train and valid where their CSV exists")
    source.add_argument("--csv", help="one annotation CSV named explicitly (instead of --data-root layout)")
    source.add_argument("--images", help="image folder for --csv (default: <csv folder>/<split>)")
    source.add_argument("--allow-outside-images", action="store_true",
                        help="accept image paths that leave the image folder: absolute or '..' paths in the CSV "
                             "image column, and symbolic links that point outside it (by default such rows are "
                             "skipped as path_outside_images: a CSV is data and should not read other files)")
    source.add_argument("--parquet", metavar="SPEC",
                        help="Parquet files instead of a CSV: a file, a glob or a folder (several joined by ::), "
                             "e.g. a Hugging Face snapshot's 'data/train-*.parquet'; one --dataset names the output "
                             "and --split train or valid the split (needs the parquet extra, pyarrow)")
    source.add_argument("--image-column", default="",
                        help="with --parquet: the image column (binary, or a struct with a binary 'bytes' field); "
                             "default: the first of image, jpg, jpeg, png, webp, img")
    source.add_argument("--caption-column", default="",
                        help="with --parquet: the caption column (a string or a list of strings); default: the "
                             "first of caption, captions, text, sentences")
    source.add_argument("--labelled", metavar="PATH",
                        help="with --clip-benchmark: labelled images (PATH/<class>/<image> or an image,label CSV) "
                             "written as the classification set named by one --dataset")
    source.add_argument("--classes", help="with --labelled: class names for the prompts, one per line in class order "
                                          "(default: the folder names / labels, _ read as a space)")
    source.add_argument("--templates", help="with --labelled: prompt templates, one per line, {} = the class name "
                                            "(default: python -m zvl_ds.classify's photo prompts)")
    output = parser.add_argument_group("output")
    output.add_argument("--clip-benchmark", action="store_true",
                        help="write clip_benchmark's WebDataset layout (clip_benchmark eval --dataset wds/<name> "
                             "--dataset_root OUT/<name>): ZeroVL CSVs become retrieval sets, --labelled a "
                             "classification set")
    output.add_argument("--out", default="shards", help="output root; shards go to OUT/<dataset>/")
    output.add_argument("--samples-per-shard", type=int, default=1000, help="images per tar")
    output.add_argument("--max-size", type=int, default=256,
                        help="resize so the shorter side is at most this (0 = keep size); aspect kept")
    output.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="skip images with more pixels than this (decompression bombs)")
    output.add_argument("--max-file-mb", type=int, default=DEFAULT_MAX_FILE_MB,
                        help="skip image files larger than this many MiB unread (file_too_large); FIFOs, devices "
                             "and other non-regular files are always skipped (not_a_regular_file)")
    output.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs")
    output.add_argument("--resample", default="box", choices=["box", "bilinear", "bicubic", "lanczos"],
                        help="Pillow filter for downscaling; box = area averaging (img2dataset's default)")
    existing = output.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="keep complete shards of an earlier run with the same input, write the rest")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing output of the split")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else (os.cpu_count() or 1), help="worker processes (output does not depend on it)")
    run.add_argument("--strict", action="store_true", help="exit 1 when anything was skipped")
    run.add_argument("--quiet", action="store_true", help="no progress bar; one-line summary")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", action="store_true",
                       help="time converting generated 640x480 JPEGs at 1 and 2 workers, then exit")
    bench.add_argument("--bench-images", type=int, default=512, help="images in the benchmark")
    bench.add_argument("--bench-json", help="also write the benchmark result to this JSON file")
    return parser


def run_benchmark(args: argparse.Namespace) -> int:
    result = bench.benchmark_shards(num_images=args.bench_images, max_size=args.max_size,
                                    resample=args.resample, progress=not args.quiet)
    print(bench.format_benchmark(result))
    if args.bench_json:
        with open(args.bench_json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.benchmark:
        return run_benchmark(args)
    if args.clip_benchmark or args.labelled:
        return write_clip_benchmark_sets(args)
    policy = "resume" if args.resume else "overwrite" if args.overwrite else "refuse"
    try:
        if args.workers < 1:
            raise annotations.InputError(f"--workers must be >= 1, got {args.workers}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise annotations.InputError(f"--out {args.out} is a file; name a folder for the shards")
        settings = shards.ShardSettings(samples_per_shard=args.samples_per_shard, max_size=args.max_size,
                                        max_pixels=args.max_pixels, jpeg_quality=args.jpeg_quality,
                                        resample=args.resample, max_file_mb=args.max_file_mb,
                                        allow_outside_images=args.allow_outside_images)
        if args.parquet:
            notes = []
            reports = [convert_parquet_input(args, settings, policy)]
        else:
            sources, notes = annotations.resolve_sources(args.data_root, args.dataset, args.split, args.csv,
                                                         args.images)
            reports = shards.convert_sources(sources, args.out, settings, workers=args.workers, policy=policy,
                                             progress=not args.quiet)
    except UserError as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 2
    except shards.WorkerDied as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make_shards: interrupted; finished shards are complete, rerun with --resume", file=sys.stderr)
        return 130
    print(shards.format_summary(reports, notes, quiet=args.quiet))
    status = shards.exit_status(reports, args.strict)
    if status:
        reason = "nothing was written" if not sum(r.images_written for r in reports) else "--strict: rows were skipped"
        print(f"make_shards: exit 1 ({reason})", file=sys.stderr)
    return status


def convert_parquet_input(args: argparse.Namespace, settings: shards.ShardSettings,
                          policy: shards.ExistingPolicy) -> shards.SplitReport:
    """``--parquet``: one split of one dataset from Parquet files."""
    if args.csv or args.images or len(args.dataset) != 1:
        raise annotations.InputError("--parquet writes one dataset: name it with one --dataset (no --csv, --images)")
    return parquet_shards.convert_parquet(args.parquet, args.dataset[0], args.split, args.out, settings, args.workers,
                                          policy, not args.quiet, args.image_column, args.caption_column)


def _clip_benchmark_reports(args: argparse.Namespace, settings: shards.ShardSettings
                            ) -> List[clip_benchmark.BenchmarkSetReport]:
    if not args.clip_benchmark:
        raise annotations.InputError("--labelled writes a clip_benchmark set: add --clip-benchmark")
    if args.resume:
        raise annotations.InputError("--resume does not apply to --clip-benchmark (a set is written whole); use "
                                     "--overwrite to replace one")
    if args.labelled:
        if len(args.dataset) != 1 or args.csv:
            raise annotations.InputError("--labelled writes one set: name it with exactly one --dataset (no --csv)")
        samples, classes = zero_shot.labelled_images(args.labelled)
        names = zero_shot.prompt_names(classes, args.classes)
        return [clip_benchmark.write_classification_set(
            os.path.join(args.out, args.dataset[0]), samples, names, zero_shot.read_templates(args.templates),
            args.samples_per_shard, args.overwrite)]
    if args.classes or args.templates:
        raise annotations.InputError("--classes and --templates go with --labelled")
    sources, _ = annotations.resolve_sources(args.data_root, args.dataset, args.split, args.csv, args.images)
    names = [source.dataset for source in sources]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise annotations.InputError(f"{', '.join(twice)}: a clip_benchmark set holds one split; choose it with "
                                     f"--split valid (or train)")
    return [clip_benchmark.write_retrieval_set(os.path.join(args.out, source.dataset), source, settings,
                                               args.overwrite, args.allow_outside_images) for source in sources]


def write_clip_benchmark_sets(args: argparse.Namespace) -> int:
    """``--clip-benchmark``: one set per ZeroVL CSV (retrieval) or the --labelled images (classification)."""
    try:
        settings = shards.ShardSettings(samples_per_shard=args.samples_per_shard, max_size=args.max_size,
                                        max_pixels=args.max_pixels, jpeg_quality=args.jpeg_quality,
                                        resample=args.resample)
        reports = _clip_benchmark_reports(args, settings)
    except (UserError, FileNotFoundError, ValueError) as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 2
    for report in reports:
        print(report.summary())
        for reason, count in sorted(report.failures.counts.items()):
            print(f"  skipped {count} [{reason}], e.g. {report.failures.examples[reason][0]}")
    skipped = sum(report.failures.total for report in reports)
    if skipped and args.strict:
        print("make_shards: exit 1 (--strict: images were skipped)", file=sys.stderr)
        return 1
    return 0


def cli() -> int:
    """``python -m zvl_ds.make_shards`` and the console script ``zvl-make-shards``: errors exit through ``zvl_ds.base.cli.run``."""
    setup_logging()  # here, not in main(): logging is the process's, and main() is also called in-process
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
