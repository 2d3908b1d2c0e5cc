"""Zero-shot classification of labelled images with a trained dual encoder.

Examples:
  python -m zvl_ds.classify --model exported/demo --images demo_data/classify
  python -m zvl_ds.classify --model output/demo --csv labels.csv --templates my_prompts.txt --out top1.json

--model is an exported model folder (python -m zvl_ds.export) or a training run folder (its latest checkpoint, or
--tag). The images are either a folder laid out by class (FOLDER/<class>/<image>; class c = the c-th sorted
sub-folder) or a CSV of image,label rows (paths relative to the CSV). --classes gives the names used in the
prompts, one per line in class order (default: the folder names / labels, with _ read as a space). --templates
gives the prompts, one per line, {} marking the class name (default: a built-in set of photo prompts). Prints
top-1/top-5 next to chance and writes them as JSON. Exit codes: 0 done; 2 bad input (message, no traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import zvl_ds  # noqa: F401  (torchvision shim before timm/transformers)
from zvl_ds.base.atomic_write import write_text_atomic
from zvl_ds.base.cli import run
from zvl_ds.base.errors import USER_ERROR_EXIT_CODE, UserError
from zvl_ds.data import load_tokenizer
from zvl_ds.evaluation.zero_shot import (ClassifyInputError, build_zero_shot_classifier, chance_accuracy,
                                         classify_samples, list_class_folder_images, prompt_names, read_labelled_csv,
                                         read_templates)
from zvl_ds.model.inference import Preprocessing, ZvlModel, is_model_folder, load_model
from zvl_ds.model.init_weights import initialise_from_config
from zvl_ds.model.saved_run import load_run
from zvl_ds.observe.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zvl_ds.classify", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", required=True, help="exported model folder or training run folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder laid out by class: FOLDER/<class>/<image>")
    source.add_argument("--csv", help="CSV of image,label rows (image paths relative to the CSV)")
    parser.add_argument("--classes", help="file of class names for the prompts, one per line in class order")
    parser.add_argument("--templates", help="file of prompt templates, one per line, {} = the class name")
    parser.add_argument("--out", default="classify.json", help="JSON file for the result (default: %(default)s)")
    parser.add_argument("--tag", help="checkpoint of a run folder (default: the one 'latest' names)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: %(default)s)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="skip the weights-only check of DeepSpeed's checkpoint files (your own runs only)")
    parser.add_argument("--allow-outside-model-files", action="store_true",
                        help="read an exported model folder's files that are links leading out of it (by default "
                             "such a link is refused: the folder should hold what it is read for)")
    return parser


def load_labelled_images(args) -> Tuple[List[Tuple[str, int]], List[str]]:
    if args.images is not None:
        return list_class_folder_images(args.images)
    return read_labelled_csv(args.csv)


def load_classifier_model(model_path: str, tag: Optional[str], trust_checkpoint: bool,
                          allow_outside_files: bool = False):
    """A ``ZvlModel`` (its preprocessing and tokenizer) from an exported folder or a run folder."""
    if is_model_folder(model_path):
        return load_model(model_path, allow_outside_files=allow_outside_files)
    cfg, model, _ = load_run(model_path, tag, trust_checkpoint, initialise=initialise_from_config)
    return ZvlModel(model, load_tokenizer(cfg.model.text_encoder), Preprocessing.from_config(cfg), cfg)


def format_result(result: Dict[str, float], chance: Dict[str, float]) -> str:
    k = int(result["topk"])
    return (f"top-1 {result['top1']:6.2f}%  top-{k} {result['top5']:6.2f}%   "
            f"(chance {chance['top1']:.2f}% / {chance['top5']:.2f}%; {int(result['num_images'])} images, "
            f"{int(result['num_classes'])} classes, {int(result['num_skipped'])} unreadable skipped)")


def classify(args) -> Dict:
    if args.batch_size < 1:
        raise ClassifyInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    templates = read_templates(args.templates)
    samples, classes = load_labelled_images(args)
    names = prompt_names(classes, args.classes)
    zvl = load_classifier_model(args.model, args.tag, args.trust_checkpoint, args.allow_outside_model_files)
    classifier = build_zero_shot_classifier(zvl.model, zvl.tokenizer, names, templates,
                                            zvl.preprocessing.max_length, zvl.device,
                                            prepare_text=zvl.prepare_text)
    result = classify_samples(zvl.model, classifier, samples, zvl.preprocess, args.batch_size, zvl.device)
    return {**result, "chance_top1": chance_accuracy(len(classes))["top1"],
            "chance_top5": chance_accuracy(len(classes))["top5"], "classes": list(classes),
            "prompt_names": names, "templates": templates}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = classify(args)
    except (UserError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print(format_result(result, {"top1": result["chance_top1"], "top5": result["chance_top5"]}))
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def cli() -> int:
    """``python -m zvl_ds.classify`` and the console script ``zvl-classify``: errors exit through ``zvl_ds.base.cli.run``."""
    setup_logging()  # here, not in main(): logging is the process's, and main() is also called in-process
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
