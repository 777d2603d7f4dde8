#!/usr/bin/env bash
# Fill .whl/ (beside the repository root, git-ignored) with the wheels that gpu_check.sh needs on a
# GPU host with no network: those listed in benchmarks/gpu_wheels.txt, for Python 3.12 on
# manylinux x86_64 (the GPU image's), without their dependencies (the image has them).
#   bash benchmarks/fill_wheels.sh [PYTHON_VERSION]     (default 3.12; needs network and pip)
set -euo pipefail
cd "$(dirname "$0")/.."
py_version=${1:-3.12}
mapfile -t wheels < <(grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$')
mkdir -p .whl
# One version of each package: an older wheel left beside a newer one stops the whole install.
for req in "${wheels[@]}"; do
  name=${req%%==*}
  find .whl -maxdepth 1 -iname "$(echo "$name" | tr '-' '_')-*.whl" ! -iname "$(echo "$req" | tr '-' '_' | sed 's/==/-/')-*" -print -delete
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"
ls -l .whl
