#!/usr/bin/env bash
# On a GPU machine without internet: install the wheels of tools/gpu_report_bundle.sh and measure every GPU figure.
#   bash gpu_report.sh [OUT]                 # in the bundle folder (wheels/, zvl_ds-src.tar.gz); default OUT: gpu_report
#   bash tools/gpu_report.sh [OUT]           # or in a checkout, with WHEELS=/path/to/wheels
# Packages already installed (torch, torchvision, numpy, ...) are kept when they fit; only missing ones come from
# the wheels. The report takes at most 9 minutes; extra arguments after OUT go to gpu-report (e.g. --stages dga).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-gpu_report}
shift || true
mkdir -p "$out" && out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
if [ -f "$here/zvl_ds-src.tar.gz" ]; then          # the bundle: unpack the source next to it
  wheels=${WHEELS:-$here/wheels}
  [ -d "$here/zvl_ds" ] || tar -xzf "$here/zvl_ds-src.tar.gz" -C "$here"
  src="$here/zvl_ds"
else                                               # a checkout: tools/ is in it
  wheels=${WHEELS:-$here/../wheels}
  src=$(cd "$here/.." && pwd)
fi
if ! "$py" -c "import torch" 2>/dev/null || ! "$py" -c "import torchvision" 2>/dev/null; then
  echo "torch or torchvision is missing: installing them from $wheels (TORCH_PACKAGES in the bundle)"
  "$py" -m pip install --no-index --find-links "$wheels" torch torchvision
fi
"$py" -m pip install --no-index --find-links "$wheels" deepspeed webdataset timm transformers open_clip_torch \
    safetensors pandas pillow pyyaml tensorboard tqdm numpy
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('GPU:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$src"
PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" "$py" -m zvl_ds.bench gpu-report --out "$out" "$@" \
    || echo "some stages did not end ok: see $out/report.json"
echo "report: $out (bring back $out/report.json; in a checkout: python -m zvl_ds.bench gpu-table $out --write)"
