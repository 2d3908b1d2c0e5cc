"""Zero-shot image-text retrieval of a trained model on the validation sets of a config.

Examples:
  python -m zvl_ds.eval_retrieval --model output/demo --cfg configs/demo.yaml
  python -m zvl_ds.eval_retrieval --model exported/demo --cfg configs/demo.yaml --valid-name demo_val --out m.json
  torchrun --nproc_per_node 2 -m zvl_ds.eval_retrieval --model output/demo --cfg configs/demo.yaml

--model is a training run folder (its latest checkpoint, or --tag) or a folder written by zvl_ds.export. The
model, its validation preprocessing and caption length come from the model; the data (data.data_path,
data.valid_name, batch size, workers) from --cfg and the key=value overrides. Prints a table and writes
{"<dataset>": {"i2t_r1": ..., "rsum": ...}} as JSON. Exit codes: 0 done; 2 bad input (message, no traceback).
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
from zvl_ds.config import Config, ConfigError, load_config
from zvl_ds.data import DataSourceError, load_tokenizer
from zvl_ds.evaluation.metrics import chance_metrics
from zvl_ds.evaluation.retrieval import evaluate_with_examples
from zvl_ds.model.inference import ExportError, Preprocessing, is_model_folder, load_model
from zvl_ds.model.init_weights import initialise_from_config
from zvl_ds.model.saved_run import load_run
from zvl_ds.observe.logs import setup_logging
from zvl_ds.runtime import dist
from zvl_ds.runtime.engine import resolve_placement

TABLE_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zvl_ds.eval_retrieval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", required=True, help="run folder (ckpt.dir/exp_name) or exported model folder")
    parser.add_argument("--cfg", help="config for the data (default: the run folder's config.yaml)")
    parser.add_argument("--tag", help="checkpoint of a run folder (default: the one 'latest' names)")
    parser.add_argument("--valid-name", nargs="+", help="validation sets (default: data.valid_name)")
    parser.add_argument("--out", default="metrics.json", help="JSON file for the metrics (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="skip the weights-only check of DeepSpeed's checkpoint files (your own runs only)")
    parser.add_argument("--allow-outside-model-files", action="store_true",
                        help="read an exported model folder's files that are links leading out of it (by default "
                             "such a link is refused: the folder should hold what it is read for)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    return parser


def load_for_evaluation(args) -> Tuple[Config, object, object]:
    """(config for the data with the model's own sections, DualEncoder in fp32 on CPU, tokenizer)."""
    if is_model_folder(args.model):
        if not args.cfg:
            raise ConfigError("--cfg is needed with an exported model folder (it says where the data is)")
        exported = load_model(args.model, allow_outside_files=args.allow_outside_model_files)
        cfg = load_config(args.cfg, args.overrides)
        cfg.model = exported.config.model
        cfg.loss.temperature = exported.config.loss.temperature
        exported.preprocessing.apply_to(cfg)
        return cfg, exported.model, exported.tokenizer
    run_cfg, model, _ = load_run(args.model, args.tag, args.trust_checkpoint,
                                   initialise=initialise_from_config)
    cfg_path = args.cfg or os.path.join(args.model, "config.yaml")
    cfg = load_config(cfg_path, args.overrides)
    cfg.model = run_cfg.model
    cfg.loss.temperature = run_cfg.loss.temperature
    Preprocessing.from_config(run_cfg).apply_to(cfg)
    return cfg, model, load_tokenizer(run_cfg.model.text_encoder)


def format_table(metrics: Dict[str, Dict[str, float]]) -> str:
    width = max([len("dataset")] + [len(name) for name in metrics])
    lines = [f"{'dataset':<{width}}  " + "  ".join(f"{key:>8}" for key in TABLE_KEYS) + "  images  captions"]
    for name, values in metrics.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{values[key]:8.2f}" for key in TABLE_KEYS)
                     + f"  {int(values['num_images']):6d}  {int(values['num_texts']):8d}")
        chance = chance_metrics(int(values["num_images"]), int(values["num_texts"]))
        lines.append(f"{'  chance':<{width}}  " + "  ".join(f"{chance[key]:8.2f}" for key in TABLE_KEYS))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: join the group (no DeepSpeed needed here)
        dist.init_distributed(use_deepspeed=False)
    setup_logging(dist.get_rank(), dist.get_world_size())
    try:
        cfg, model, tokenizer = load_for_evaluation(args)
        placement = resolve_placement(cfg, int(os.environ.get("LOCAL_RANK", "0")))
        model.to(placement.device, placement.dtype)
        metrics, _ = evaluate_with_examples(cfg, model, tokenizer, placement.device, placement.dtype,
                                            names=args.valid_name, num_examples=0,
                                            progress=not args.no_progress)
    except (ConfigError, ExportError, DataSourceError, FileNotFoundError, OSError, ValueError) as error:
        if dist.get_world_size() > 1:
            raise  # zvl_ds.base.cli.run ends this rank at once; a barrier here would wait for the others forever
        print(f"error: {error}", file=sys.stderr)
        return 2
    if dist.is_main_process():
        print(format_table(metrics))
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        write_text_atomic(args.out, json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.out}")
    dist.cleanup()
    return 0


def cli() -> int:
    """``python -m zvl_ds.eval_retrieval`` and the console script ``zvl-eval-retrieval``: errors exit through ``zvl_ds.base.cli.run``."""
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
