#!/usr/bin/env bash
# One-shot GPU check for a CUDA host with no network and a preinstalled PyTorch/CUDA stack (python3
# with torch, pytest, pytest-benchmark, scikit-image, onnx, onnxruntime, pybind11 >= 3,
# scikit-build-core, cmake, ninja; nvcc, nvidia-smi, compute-sanitizer on PATH). In order, each step
# under `timeout` and within one overall budget, carrying on after a failure:
#   env        GPU, driver, clocks, versions
#   wheels     pip install --no-index .whl/*.whl --target $SITE (packages the host lacks, see
#              benchmarks/gpu_wheels.txt; fill .whl/ with benchmarks/fill_wheels.sh where pip works)
#   build      the extension for this GPU's architecture and the C++ tests (no build isolation, no
#              index: nothing is downloaded), installed into $SITE
#   tests      pytest -m "gpu or tensorrt" tests        (TensorRT tests skip where it is absent)
#   replicas   pytest -m gpu tests/test_replicas.py: two CUDA replicas behind one Encoder (on one
#              device where there is only one), and Encoder(device="cuda:all") against cuda:0 (skips,
#              saying so, with fewer than 2 devices)
#   bench      pytest -m "gpu or tensorrt" benchmarks --benchmark-only (not the slow TensorRT
#              exports unless --with-slow); besides images/s it measures the kernel's two compiled
#              occupancy variants side by side (__launch_bounds__(256, 1) and (256, 3)), the overlap
#              of copies and kernels fed from pinned memory (copies alone, kernels alone, both
#              pipelined) and the histogram of the batch sizes the queue formed under load
#   ctest      the C++ unit tests, test_batch_queue_cuda included
#   memcheck_queue  compute-sanitizer memcheck on test_batch_queue_cuda (queue + kernel, no torch)
#   memcheck   compute-sanitizer memcheck on the resize_normalize kernel tests (pytest), both
#              variants, batches over several launches included
#   racecheck  compute-sanitizer racecheck on the same (fewer of them)
# Writes to $OUT (default ./gpu-results): gpu_check.md and gpu_check.json (steps, GPU, benchmark rows,
# ratios, targets), bench.json (pytest-benchmark's own) and gpu_check.log (every step's output).
#
#   bash benchmarks/gpu_check.sh              on the GPU host (under 8 minutes on an H100)
#   bash benchmarks/gpu_check.sh --dry-run    anywhere: checks prerequisites, builds and runs nothing
#                                             on a GPU, prints what it would run
# Exit status: 0 when every step passed; 1 when one failed, timed out or ran out of budget; 2 for a
# failed --dry-run check. Missed performance targets are reported, not counted as failures.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
WITH_SLOW=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    --with-slow) WITH_SLOW=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run, --with-slow)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu-results}
SITE=${GPU_CHECK_SITE:-/tmp/nvclip-gpu-check-site}
BUILD_DIR=build/gpu-check
WHEELS=$REPO/.whl
# doctest (the C++ tests' framework) as fill_wheels.sh copies it beside the wheels, for a GPU image
# without the doctest-dev package.
DOCTEST_CMAKE_DIR=$WHEELS/doctest/lib/cmake/doctest
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}   # all steps together: under 8 minutes with the report
MIN_STEP_S=15                         # a step with less time left than this is skipped
# Per-step limits (seconds), the expected H100 time in the comment; the overall budget caps them.
declare -A LIMIT=(
  [env]=20        # ~3 s
  [wheels]=40     # ~5 s
  [build]=180     # ~60 s: one CUDA architecture, 16 cores
  [tests]=90      # ~30 s: imports, a tiny export, the kernel bit-exactness sweep
  [replicas]=40   # ~10 s: a tiny export, two tiny models per device
  [bench]=180     # ~90 s: preprocess kernel, ViT-L-14 and ViT-H-14 @336 (model built on the GPU)
  [ctest]=45      # ~10 s
  [memcheck_queue]=45  # ~10 s
  [memcheck]=60   # ~30 s
  [racecheck]=60  # ~30 s
)
STEPS=(env wheels build tests replicas bench ctest memcheck_queue memcheck racecheck)
MARK_BENCH="(gpu or tensorrt) and not slow"
[ "$WITH_SLOW" = 1 ] && MARK_BENCH="gpu or tensorrt"
SANITIZED_TESTS=(tests/test_resize_normalize.py tests/test_resize_normalize_launch.py -m gpu)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)

gpu_arch() {  # "90" for compute capability 9.0; GPU_CHECK_CUDA_ARCH overrides; "native" as a fallback
  if [ -n "${GPU_CHECK_CUDA_ARCH:-}" ]; then echo "$GPU_CHECK_CUDA_ARCH"; return; fi
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  if [[ $cap =~ ^[0-9]+$ ]]; then echo "$cap"; else echo native; fi
}

# The command of each step, as an array named CMD_<step>.
set_commands() {
  local arch=$1
  CMD_env=(bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm --format=csv; \
$PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'; \
$PY -m pip list 2>/dev/null | grep -iE '^(numpy|pillow|onnx|onnxruntime|pybind11|scikit.build.core|pytest|pytest.benchmark|open.clip.torch|ftfy|cuda.bindings|torchvision) '; \
nvcc --version | tail -n 2; cmake --version | head -n 1")
  CMD_wheels=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
  CMD_build=("$PY" -m pip install --no-index --no-build-isolation --no-deps --upgrade --target "$SITE"
    "-Cbuild-dir=$BUILD_DIR" "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$arch" -Ccmake.define.NVCLIP_CUDA=ON
    -Ccmake.define.NVCLIP_BUILD_TESTS=ON .)
  if [ -f "$DOCTEST_CMAKE_DIR/doctestConfig.cmake" ]; then
    CMD_build=("${CMD_build[@]:0:${#CMD_build[@]}-1}" "-Ccmake.define.doctest_DIR=$DOCTEST_CMAKE_DIR" .)
  fi
  CMD_tests=("${PYTEST[@]}" -m "gpu or tensorrt" tests --ignore=tests/test_replicas.py)
  CMD_replicas=("${PYTEST[@]}" -m gpu tests/test_replicas.py)
  CMD_bench=("${PYTEST[@]}" -m "$MARK_BENCH" benchmarks --benchmark-only "--benchmark-json=$OUT/bench.json"
    --benchmark-columns=median,rounds)
  CMD_ctest=(ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 40)
  CMD_memcheck_queue=(compute-sanitizer --tool memcheck --error-exitcode 3 "$BUILD_DIR/tests/cpp/test_batch_queue_cuda")
  CMD_memcheck=(compute-sanitizer --tool memcheck --error-exitcode 3 "${PYTEST[@]}" "${SANITIZED_TESTS[@]}"
    -k "inputs_on_the_device or out_form or several_launches")
  CMD_racecheck=(compute-sanitizer --tool racecheck --error-exitcode 3 "${PYTEST[@]}" "${SANITIZED_TESTS[@]}"
    -k "inputs_on_the_device or (several_launches and float16)")
}

PLAIN_ARG='^[][A-Za-z0-9_./=:,+*@%<>-]+$'
show() {  # a command line as one would type it: arguments with spaces or specials in single quotes
  local a out=""
  for a in "$@"; do
    if [[ $a =~ $PLAIN_ARG ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}

wheel_files() { compgen -G "$WHEELS/*.whl" || true; }

# --- prerequisites (both modes) -----------------------------------------------------------------------
# What the dry run itself needs (it collects the tests): missing is an error everywhere.
TOOLS=(timeout)
MODULES=(torch:torch numpy:numpy PIL:pillow pytest:pytest pytest_benchmark:pytest-benchmark
  skimage:scikit-image open_clip:open_clip_torch ftfy:ftfy wcwidth:wcwidth regex:regex)
# What only the real run needs (build, GPU, sanitizers): missing is an error on the GPU host, a note
# in a dry run (a CPU machine or CI may build with build isolation and have no GPU tools).
HOST_TOOLS=(nvidia-smi nvcc cmake ctest compute-sanitizer)
HOST_MODULES=(torchvision:torchvision onnx:onnx onnxscript:onnxscript onnxruntime:onnxruntime
  pybind11:pybind11 scikit_build_core:scikit-build-core cuda.bindings:cuda-bindings)

check_prerequisites() {  # prints findings; returns the number of errors
  local errors=0 tool entry module dist wheel missing
  missing() {  # missing WHAT WHY: an error, or only a note in a dry run for what the real run needs
    if [ "$2" = host ] && [ "$DRY_RUN" = 1 ]; then echo "  absent   $1 (the real run needs it on the GPU host)"
    else echo "  MISSING  $1"; errors=$((errors + 1)); fi
  }
  for tool in "$PY" "${TOOLS[@]}"; do
    if command -v "$tool" >/dev/null; then echo "  ok       $tool"; else missing "$tool" run; fi
  done
  for tool in "${HOST_TOOLS[@]}"; do
    if command -v "$tool" >/dev/null; then echo "  ok       $tool"; else missing "$tool" host; fi
  done
  for entry in "${MODULES[@]/%/:run}" "${HOST_MODULES[@]/%/:host}"; do
    IFS=: read -r module dist need <<<"$entry"
    wheel=$(wheel_files | grep -i "/$(echo "$dist" | tr '-' '_')-[0-9]" | head -n 1)
    if [ -n "$wheel" ]; then echo "  wheel    $module <- .whl/$(basename "$wheel")"
    elif "$PY" -c "import $module" 2>/dev/null; then echo "  ok       python: $module"
    else missing "python: $module (no wheel for $dist in .whl/; see benchmarks/gpu_wheels.txt)" "$need"; fi
  done
  # The C++ tests' framework: the system's doctest-dev, or the copy fill_wheels.sh puts in .whl/.
  if [ -f "$DOCTEST_CMAKE_DIR/doctestConfig.cmake" ]; then echo "  ok       doctest <- .whl/doctest"
  elif compgen -G "/usr/lib/cmake/doctest/doctestConfig.cmake" >/dev/null \
    || compgen -G "/usr/local/lib/cmake/doctest/doctestConfig.cmake" >/dev/null; then echo "  ok       doctest (system)"
  else missing "doctest (apt-get install doctest-dev, or bash benchmarks/fill_wheels.sh on a machine that has it)" host; fi
  # Versions the build needs (pyproject.toml): pybind11 >= 3.0 (py::smart_holder), cmake >= 3.25.
  if "$PY" -c "import pybind11" 2>/dev/null && [ -z "$(wheel_files | grep -i /pybind11-)" ]; then
    if "$PY" -c "import pybind11, sys; sys.exit(int(pybind11.__version__.split('.')[0]) < 3)"; then
      echo "  ok       pybind11 >= 3.0"
    else missing "pybind11 >= 3.0 (have $("$PY" -c 'import pybind11; print(pybind11.__version__)'))" host; fi
  fi
  if command -v cmake >/dev/null; then
    local v
    v=$(cmake --version | head -n 1 | grep -oE '[0-9]+\.[0-9]+' | head -n 1)
    if printf '3.25\n%s\n' "$v" | sort -V -C; then echo "  ok       cmake $v >= 3.25"
    else missing "cmake >= 3.25 (have $v)" host; fi
  fi
  return "$errors"
}

check_wheels() {  # .whl/: one version per package, tags this Python (3.12, x86_64 Linux) can install
  local errors=0 f base dist seen=" " req name
  for f in $(wheel_files); do
    base=$(basename "$f")
    dist=$(echo "${base%%-*}" | tr 'A-Z-' 'a-z_')
    if [[ $seen == *" $dist "* ]]; then echo "  DUPLICATE wheel for $dist: $base (keep one version)"; errors=$((errors + 1)); fi
    seen+="$dist "
    if [[ $base =~ -(py3-none-any|cp312-cp312-manylinux[^-]*x86_64[^-]*|cp312-abi3-manylinux[^-]*x86_64[^-]*)\.whl$ ]]; then
      echo "  ok       .whl/$base"
    else echo "  BAD TAG  .whl/$base (need py3-none-any or cp312 manylinux x86_64)"; errors=$((errors + 1)); fi
  done
  while read -r req; do
    name=$(echo "${req%%==*}" | tr 'A-Z-' 'a-z_')
    if [[ $seen == *" $name "* ]]; then continue; fi
    echo "  note     .whl/ has no $req: the GPU image lacks it (fill with: bash benchmarks/fill_wheels.sh)"
  done < <(grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$')
  return "$errors"
}

# --- dry run ------------------------------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  errors=0
  echo "gpu_check.sh --dry-run: nothing is built, nothing runs on a GPU"
  echo "prerequisites:"
  check_prerequisites || errors=$((errors + $?))
  echo "wheels in .whl/:"
  check_wheels || errors=$((errors + $?))
  echo "test selections (collected here, not run):"
  if "$PY" -c "import nvclip_fast" 2>/dev/null; then
    for target in "tests:gpu or tensorrt" "benchmarks:$MARK_BENCH"; do
      log=$(mktemp)
      if "${PYTEST[@]}" --collect-only -m "${target#*:}" "${target%%:*}" >"$log" 2>&1; then
        echo "  ok       ${target%%:*} -m \"${target#*:}\": $(grep -cE '::' "$log" || true) items ($(tail -n 1 "$log"))"
      else
        echo "  FAILED   ${target%%:*} -m \"${target#*:}\" (collection):"; tail -n 20 "$log" | sed 's/^/           /'
        errors=$((errors + 1))
      fi
      rm -f "$log"
    done
  else
    echo "  skipped  nvclip_fast is not installed here (the real run builds it first)"
  fi
  set_commands "<detected by nvidia-smi: compute capability, e.g. 90>"
  CMD_wheels+=("$WHEELS/*.whl")
  echo "would run (OUT=$OUT, SITE=$SITE, overall budget ${BUDGET_S}s; each step under timeout):"
  total=0
  for s in "${STEPS[@]}"; do
    declare -n cmd="CMD_$s"
    printf '  %-15s %4ss  %s\n' "$s" "${LIMIT[$s]}" "$(show "${cmd[@]}")"
    total=$((total + LIMIT[$s]))
    unset -n cmd
  done
  echo "  (step limits add up to ${total}s; the budget cuts them to ${BUDGET_S}s in all)"
  echo "then: $PY benchmarks/throughput.py gpu-check-report $OUT ... -> $OUT/gpu_check.md, $OUT/gpu_check.json"
  # The report writer runs here too, on these steps marked dry-run, so that its code is known to work.
  tmp=$(mktemp -d)
  for s in "${STEPS[@]}"; do printf '%s\tdry-run\t0\t\n' "$s" >>"$tmp/steps.tsv"; done
  "$PY" benchmarks/throughput.py gpu-check-report "$tmp" --steps "$tmp/steps.tsv" --gpu "dry run" >/dev/null
  if [ -s "$tmp/gpu_check.json" ] && [ -s "$tmp/gpu_check.md" ]; then echo "  ok       report writer (gpu_check.json, gpu_check.md)"
  else echo "  FAILED   report writer"; errors=$((errors + 1)); fi
  rm -rf "$tmp"
  if [ "$errors" -gt 0 ]; then echo "dry run: $errors problem(s)"; exit 2; fi
  echo "dry run: ok"
  exit 0
fi

# --- the real run -------------------------------------------------------------------------------------
mkdir -p "$OUT" "$SITE"
LOG=$OUT/gpu_check.log
RESULTS=$OUT/.steps.tsv
: >"$LOG"
: >"$RESULTS"
rm -f "$OUT/bench.json"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS
BUILD_OK=0
ARCH=$(gpu_arch)
set_commands "$ARCH"
mapfile -t wheel_list < <(wheel_files)
CMD_wheels+=("${wheel_list[@]}")

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }

run_step() {  # run_step NAME: run CMD_NAME under its limit (capped by the budget left), log, record
  local name=$1 left limit rc t0
  declare -n cmd="CMD_$name"
  left=$((BUDGET_S - (SECONDS - START)))
  limit=${LIMIT[$name]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "$MIN_STEP_S" ]; then
    echo "=== $name: SKIPPED (${left}s of the ${BUDGET_S}s budget left)"
    record "$name" skipped 0 "out of budget"
    return 1
  fi
  echo "=== $name (limit ${limit}s): $(show "${cmd[@]}")"
  printf '\n===== %s: %s\n' "$name" "$(show "${cmd[@]}")" >>"$LOG"
  t0=$SECONDS
  timeout -k 10 "$limit" "${cmd[@]}" >"$OUT/.step.log" 2>&1
  rc=$?
  cat "$OUT/.step.log" >>"$LOG"
  # On a GPU host a gpu test that skips is a failure (no device seen, a CUDA-less build): pytest -rs
  # lists each skip with its reason, ctest marks skipped tests "(Skipped)". TensorRT skips are only
  # noted (TensorRT is optional).
  local gpu_skips trt_skips why="" note
  gpu_skips=$(grep -E '^SKIPPED .* gpu: |\(Skipped\)$' "$OUT/.step.log" | head -n 1 | sed -E 's/.* gpu: //; s/^\s+//')
  trt_skips=$(grep -E '^SKIPPED .* tensorrt: ' "$OUT/.step.log" | head -n 1 | sed -E 's/.* tensorrt: /tensorrt tests skipped: /')
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    why="timed out after ${limit}s"
  elif [ "$rc" -eq 127 ]; then
    why="command not found (exit 127)"
  elif [ "$rc" -ne 0 ]; then
    why="exit $rc"
  elif [ -n "$gpu_skips" ]; then
    rc=1
    why="gpu tests skipped: $gpu_skips"
  fi
  note="$why${trt_skips:+${why:+; }$trt_skips}"
  if [ "$rc" -eq 0 ]; then
    record "$name" ok $((SECONDS - t0)) "$note"
    tail -n 6 "$OUT/.step.log"
  else
    record "$name" failed $((SECONDS - t0)) "$note"
    echo "FAILED: $name ($note); its last lines:"
    tail -n 25 "$OUT/.step.log"
  fi
  rm -f "$OUT/.step.log"
  return "$rc"
}

echo "gpu_check.sh: arch $ARCH, budget ${BUDGET_S}s, OUT=$OUT"
echo "prerequisites:"
check_prerequisites >>"$LOG" 2>&1 || echo "  (some prerequisites missing: see $LOG; carrying on)"
check_wheels >>"$LOG" 2>&1 || echo "  (.whl/ problems: see $LOG)"
run_step env
if [ "${#wheel_list[@]}" -gt 0 ]; then run_step wheels; else record wheels skipped 0 "no .whl/*.whl"; fi
run_step build && BUILD_OK=1
for s in tests replicas bench ctest memcheck_queue memcheck racecheck; do
  if [ "$BUILD_OK" = 1 ]; then run_step "$s"; else record "$s" skipped 0 "needs the build, which did not pass"; fi
done

# --- the report ---------------------------------------------------------------------------------------
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | head -n 1)
"$PY" benchmarks/throughput.py gpu-check-report "$OUT" --steps "$RESULTS" --gpu "${GPU_NAME:-unknown GPU}" \
  --arch "$ARCH" --seconds $((SECONDS - START))
status=$?
rm -f "$RESULTS"
echo "gpu_check.sh: exit $status (0: every step ok); results in $OUT"
exit "$status"
