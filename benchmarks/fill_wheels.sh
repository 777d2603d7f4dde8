#!/usr/bin/env bash
# Fill .whl/ (beside the repository root, git-ignored) with the wheels that gpu_check.sh needs on a
# GPU host with no network: those listed in benchmarks/gpu_wheels.txt, for Python 3.12 on
# manylinux x86_64 (the GPU image's), without their dependencies (the image has them); and doctest,
# the C++ tests' header-only framework, copied from this machine's doctest-dev package into
# .whl/doctest with its CMake package made relocatable (gpu_check.sh points CMake at it).
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
doctest_src=/usr/lib/cmake/doctest
if [ -f "$doctest_src/doctestConfig.cmake" ] && [ -f /usr/include/doctest/doctest.h ]; then
  rm -rf .whl/doctest
  mkdir -p .whl/doctest/include .whl/doctest/lib/cmake
  cp -r /usr/include/doctest .whl/doctest/include/
  cp -r "$doctest_src" .whl/doctest/lib/cmake/
  # The package's targets file names its prefix absolutely (/usr): make it the copy's own.
  sed -i 's|^set(_IMPORT_PREFIX "/usr")$|get_filename_component(_IMPORT_PREFIX "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)|' \
    .whl/doctest/lib/cmake/doctest/doctestTargets.cmake
  grep -q CMAKE_CURRENT_LIST_DIR .whl/doctest/lib/cmake/doctest/doctestTargets.cmake
else
  echo "fill_wheels.sh: no doctest-dev here (apt-get install doctest-dev): the GPU host's C++ tests need it" >&2
fi
ls -l .whl
