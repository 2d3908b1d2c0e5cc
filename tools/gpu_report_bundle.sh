#!/usr/bin/env bash
# Pack what `python -m zvl_ds.bench gpu-report` needs for a GPU machine without internet, on a machine with it:
#   bash tools/gpu_report_bundle.sh [DEST]          # default DEST: gpu_bundle
# DEST/zvl_ds-src.tar.gz   this checkout's committed tree (git archive) with a COMMIT file naming the commit
# DEST/wheels/             every package of tools/gpu_report_requirements.txt as wheels, for each Python version
#                          in PYTHON_VERSIONS (default "3.10 3.11 3.12"; the GPU machine's `python3 --version`),
#                          manylinux x86_64; the tested version where it exists for that Python, else the newest
#                          that does; packages published as source only (deepspeed) built here as pure-Python wheels
# DEST/gpu_report.sh       the script to run there (tools/gpu_report.sh)
# torch and torchvision are not included: GPU machines usually have them. Where one is missing, name the builds that
# match the machine's CUDA, e.g. TORCH_PACKAGES="torchvision==0.28.0" (torch there, torchvision not) or
# TORCH_PACKAGES="torch==2.13.0 torchvision==0.28.0" (neither), from TORCH_INDEX (default: PyTorch's CUDA 12.8 wheels).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-gpu_bundle}
pythons=${PYTHON_VERSIONS:-"3.10 3.11 3.12"}
torch_index=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
py=${PYTHON:-python3}
wheels="$dest/wheels"
mkdir -p "$wheels"
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
           --platform manylinux_2_34_x86_64)
fetch() {  # fetch PYTHON_VERSION REQUIREMENT: the binary wheel for that Python, or a pure-Python wheel built here
  local version=$1 requirement=$2 name=${2%%==*}
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: "${platforms[@]}" \
      --implementation cp --python-version "$version" -d "$wheels" "$requirement" 2>/dev/null && return 0
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: "${platforms[@]}" \
      --implementation cp --python-version "$version" -d "$wheels" "$name" 2>/dev/null && return 0
  "$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$wheels" "$requirement" && return 0
  echo "error: no wheel of $requirement for Python $version" >&2
  return 1
}
for version in $pythons; do
  echo "== wheels for Python $version"
  grep -v '^\s*#' "$root/tools/gpu_report_requirements.txt" | grep -v '^\s*$' | while read -r requirement; do
    fetch "$version" "$requirement"
  done
  if [ -n "${TORCH_PACKAGES:-}" ]; then
    # shellcheck disable=SC2086  # TORCH_PACKAGES is a list of requirements
    "$py" -m pip download -q --disable-pip-version-check --only-binary=:all: "${platforms[@]}" --implementation cp \
        --python-version "$version" -d "$wheels" --index-url "$torch_index" $TORCH_PACKAGES
  fi
done
git -C "$root" archive --format=tar --prefix=zvl_ds/ HEAD > "$dest/zvl_ds-src.tar"
commit_dir=$(mktemp -d)
trap 'rm -rf "$commit_dir"' EXIT
mkdir -p "$commit_dir/zvl_ds"
git -C "$root" rev-parse --short=12 HEAD > "$commit_dir/zvl_ds/COMMIT"
tar -rf "$dest/zvl_ds-src.tar" -C "$commit_dir" zvl_ds/COMMIT
gzip -f "$dest/zvl_ds-src.tar"
cp "$root/tools/gpu_report.sh" "$dest/gpu_report.sh"
echo "bundle: $dest ($(du -sh "$dest" | cut -f1)); copy it to the GPU machine and run: bash gpu_report.sh"
