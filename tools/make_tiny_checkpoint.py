"""Write a tiny random checkpoint in a form users hold, to try the fine-tuning path on a CPU in a minute.

  python tools/make_tiny_checkpoint.py --kind hf_clip --out tiny_clip      # a Hugging Face CLIPModel folder
  python tools/make_tiny_checkpoint.py --kind hf_siglip --out tiny_siglip  # a Hugging Face SiglipModel folder
  python tools/make_tiny_checkpoint.py --kind open_clip --out tiny_oc      # an OpenCLIP local-dir folder

Nothing is downloaded: the models are built from configs (tools/tiny_checkpoints.py, which the tests use too).
zvl_ds must be installed (bash tools/install.sh).
"""
import argparse
import sys

from tiny_checkpoints import KINDS, write_tiny_checkpoint  # beside this script, which Python puts first on sys.path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--kind", choices=KINDS, required=True, help="the form of the checkpoint")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--no-weights", action="store_true", help="config, tokenizer and preprocessing only")
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.kind, args.out, weights=not args.no_weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
