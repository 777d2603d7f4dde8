#!/usr/bin/env bash
# One-shot GPU check of resize_normalize on a lent H100/H200 (python3 there has torch, pytest,
# pytest-benchmark, scikit-image, pybind11, scikit-build-core, cmake, nvcc, compute-sanitizer; no
# network). Builds for sm_90, runs the gpu tests (CUDA kernel bit for bit against the CPU twin),
# memcheck + racecheck on a small test, and the GPU benchmarks. Logs and JSON go to $OUT.
#   device run: bash benchmarks/gpu_check_resize_normalize.sh        (about 5 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
status=0
run() {  # run "name" command...: log to $OUT/name.log, remember failures, keep going
  local name=$1
  shift
  echo "=== $name: $*"
  if ! "$@" >"$OUT/$name.log" 2>&1; then
    status=1
    echo "FAILED: $name (tail of $OUT/$name.log below)"
  fi
  tail -n 15 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
run build python3 -m pip install --no-build-isolation --no-deps -Cbuild-dir=build/gpu \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 .
run tests python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_resize_normalize.py
run memcheck compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
  -m gpu tests/test_resize_normalize.py -k "inputs_on_the_device or out_form"
run racecheck compute-sanitizer --tool racecheck --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
  -m gpu tests/test_resize_normalize.py -k "inputs_on_the_device"
run bench python3 -m pytest -q -p no:cacheprovider -m gpu benchmarks/bench_resize_normalize.py \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=mean,stddev,rounds
python3 - "$OUT/bench.json" <<'PY' || status=1
import json, sys
rows = {b["name"]: b["extra_info"] for b in json.load(open(sys.argv[1]))["benchmarks"]}
for name, info in rows.items():
    print(f"{name:40s} {info['images_per_s']:>12,.0f} img/s  {info.get('GB_per_s', '')}")
kernel = rows["test_ours_cuda_device_inputs"]["images_per_s"]
pinned = rows["test_ours_cuda_from_pinned_host"]["images_per_s"]
copy = rows["test_h2d_copy_only"]["images_per_s"]
tv = rows["test_torchvision_tensor_cuda"]["images_per_s"]
print(f"kernel, inputs on device: {kernel:,.0f} img/s (target >= 100,000); vs torchvision on GPU: {kernel / tv:.1f}x")
print(f"from pinned host incl. copies: {pinned / copy:.0%} of the copy-only rate (target >= 80%)")
PY
exit $status
