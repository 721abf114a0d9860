#!/usr/bin/env bash
# The test command (README quick start; .ci/run calls it). On a fresh machine it installs both
# configurations and lints, then runs:
#   native, the best ISA variant:  the whole suite, and once the wheel test (tests/test_wheel.py)
#   native, AVX2 and DEFAULT:      the kernel tests (the per-op files below), which are what an
#                                   ISA variant changes (ATEN_CPU_CAPABILITY selects the variant)
#   fallback, the best variant:    the whole suite
# Each run first loads (JIT-builds if needed) its variant, then runs pytest on two workers.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k roi_align -x`.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log=$(mktemp -d)
passed=0 failed=0 skipped=0 status=0

native=$(bash scripts/setup_env.sh native) || { echo "setting up the native configuration failed" >&2; exit 1; }
fallback=$(bash scripts/setup_env.sh fallback) || { echo "setting up the fallback configuration failed" >&2; exit 1; }

if ! "$native/bin/ruff" check . || ! "$native/bin/ruff" format --check . >/dev/null; then
  echo "ruff: lint or format errors (run: $native/bin/ruff format . && $native/bin/ruff check .)"
  status=1
fi

# The per-op test files: one kernel each, so the ones every ISA variant runs.
kernel_tests=(tests/test_roi_align.py tests/test_roi_pool.py tests/test_ps_roi_align.py tests/test_ps_roi_pool.py
  tests/test_nms.py tests/test_frozen_batch_norm.py tests/test_detectron2.py tests/test_box_iou_rotated.py
  tests/test_quantized.py tests/test_paths.py)

run() {  # run NAME VENV CAPABILITY TESTS...  (then "--" and pytest's extra arguments)
  local name=$1 venv=$2 cap=$3 out="$log/$1.txt"
  shift 3
  local tests=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do tests+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  echo "=== $name (ATEN_CPU_CAPABILITY=${cap:-unset}): ${tests[*]}"
  # Unset, not empty, for ATen's own choice: torch warns about an empty value on every import.
  local envs=(env -u ATEN_CPU_CAPABILITY ${cap:+ATEN_CPU_CAPABILITY=$cap} PYTHONPATH="$root")
  # Built once here, not by both pytest workers at once.
  "${envs[@]}" "$venv/bin/python" -c "import torchvision_cpu_ext" 2>&1 | tee "$out"
  "${envs[@]}" "$venv/bin/python" -m pytest "${tests[@]}" -q -p no:cacheprovider -n 2 \
    "$@" 2>&1 | tee -a "$out" | grep -E "^(FAILED|ERROR)|(passed|failed|error)"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  local last
  last=$(grep -E "(passed|failed|error)" "$out" | tail -n 1)
  count() { grep -oE "[0-9]+ ($1)" <<<"$last" | awk '{s += $1} END {print s + 0}'; }
  passed=$((passed + $(count passed)))
  failed=$((failed + $(count "failed|errors?")))
  skipped=$((skipped + $(count skipped)))
  if [ "$rc" -ne 0 ] && ! grep -qE "[0-9]+ (failed|error)" <<<"$last"; then
    failed=$((failed + 1))  # pytest died or collected nothing: count it
  fi
}

# Once per CI run, not per configuration: build a wheel (one variant), install it in a fresh
# environment and load its prebuilt kernels without a compiler (tests/test_wheel.py).
TORCHVISION_CPU_EXT_WHEEL_TEST=1 run native-best "$native" "" tests -- "$@"
run native-avx2 "$native" avx2 "${kernel_tests[@]}" -- "$@"
run native-default "$native" default "${kernel_tests[@]}" -- "$@"
run fallback-best "$fallback" "" tests -- "$@"

echo
echo "all configurations: $passed passed, $failed failed, $skipped skipped"
exit $status
