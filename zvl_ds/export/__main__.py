"""Export a training run to a model folder that loads without DeepSpeed (``zvl_ds.load_model``).

Examples:
  python -m zvl_ds.export output/demo --out exported/demo
  python -m zvl_ds.export output/demo --tag step_00000100 --out exported/demo_step100
  python -m zvl_ds.export output/demo --format open_clip --out exported/demo_open_clip
  python -m zvl_ds.export output/demo --ema --out exported/demo_ema
  python -m zvl_ds.export output/demo_lora --adapters-only --out exported/demo_lora_adapters

Writes MODEL_DIR/model.safetensors (fp32, consolidated from any ZeRO stage), model_config.json,
preprocess.json and tokenizer/. --format open_clip writes a folder open_clip loads as local-dir:MODEL_DIR
(open_clip_config.json, open_clip_model.safetensors, the tokenizer, image_tower/ and text_tower/ configs); a model
open_clip cannot describe is refused. A run with LoRA adapters (model.*.lora) is written merged in every format;
--adapters-only writes the adapters alone in peft's layout (adapter_config.json, adapter_model.safetensors).
Exit codes: 0 done; 2 bad input (message, no traceback).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import zvl_ds  # noqa: F401  (torchvision shim before timm/transformers)
from zvl_ds.base.cli import run
from zvl_ds.export.formats import DEFAULT_FORMAT, FORMATS, export_model
from zvl_ds.model.inference import ExportError
from zvl_ds.observe.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zvl_ds.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run_dir", help="training run folder (ckpt.dir/data.exp_name)")
    parser.add_argument("--tag", help="checkpoint to export, e.g. step_00000100 (default: the one 'latest' names)")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--format", dest="folder_format", default=DEFAULT_FORMAT, choices=sorted(FORMATS),
                        help=f"the folder to write (default {DEFAULT_FORMAT}: the folder zvl_ds.load_model reads)")
    parser.add_argument("--ema", action="store_true",
                        help="export the model EMA (model.ema.decay) of the checkpoint instead of its trained weights")
    parser.add_argument("--adapters-only", action="store_true",
                        help="a run with LoRA adapters: write the adapters alone in peft's layout "
                             "(adapter_config.json, adapter_model.safetensors) instead of the merged model")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="skip the weights-only check of DeepSpeed's checkpoint files (your own runs only)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.adapters_only and args.folder_format != DEFAULT_FORMAT:
        print(f"error: --adapters-only writes peft's adapter layout; it takes no --format {args.folder_format}",
              file=sys.stderr)
        return 2
    try:
        out = export_model(args.run_dir, args.out, args.tag, args.trust_checkpoint, args.folder_format,
                           args.ema, args.adapters_only)
    except (ExportError, FileNotFoundError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} to {out}")
    return 0


def cli() -> int:
    """``python -m zvl_ds.export`` and the console script ``zvl-export``: errors exit through ``zvl_ds.base.cli.run``."""
    setup_logging()  # here, not in main(): logging is the process's, and main() is also called in-process
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
