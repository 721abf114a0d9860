#!/usr/bin/env bash
# The test command (README quick start; .ci/run calls it). On a fresh machine it installs both
# configurations and lints, then runs:
#   native, the best ISA variant:  the whole suite, with the slow tests (pytest -m slow) and once
#                                   the wheel test (tests/test_wheel.py)
#   native, AVX2 and DEFAULT:      the kernel tests (the per-op files below), which are what an
#                                   ISA variant changes (ATEN_CPU_CAPABILITY selects the variant),
#                                   but the slow and variant_independent ones (opcheck, compile)
#   fallback, the best variant:    the whole suite but the slow tests
# The two environments are set up at once, and the four variants JIT-built at once in the
# background as soon as their environment is there (pip mostly waits on the disk, a build's
# precompiled header on one core: together they keep both cores busy). Each run then loads its
# variant from the cache and runs pytest on two workers.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k roi_align -x`.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log=$(mktemp -d)
passed=0 failed=0 skipped=0 status=0

setup() {  # setup CONFIG: the environment's path in $log/CONFIG.venv, pip's output in $log/CONFIG.setup
  bash scripts/setup_env.sh "$1" >"$log/$1.venv" 2>"$log/$1.setup"
}
setup native & native_setup=$!
setup fallback & fallback_setup=$!

build() {  # build NAME VENV CAPABILITY: loads (JIT-builds if needed) the variant; rc in $log/NAME.rc
  # Unset, not empty, for ATen's own choice: torch warns about an empty value on every import.
  # MAX_JOBS: four builds share two cores; each at two compiler jobs keeps memory bounded.
  env -u ATEN_CPU_CAPABILITY ${3:+ATEN_CPU_CAPABILITY=$3} PYTHONPATH="$root" MAX_JOBS="${MAX_JOBS:-2}" \
    "$2/bin/python" -c "import torchvision_cpu_ext" >"$log/$1.build" 2>&1
  echo $? >"$log/$1.rc"
}
builds=()
if ! wait "$native_setup"; then
  cat "$log/native.setup" >&2
  echo "setting up the native configuration failed" >&2
  wait "$fallback_setup"
  exit 1
fi
native=$(cat "$log/native.venv")
build native-best "$native" "" & builds+=($!)
build native-avx2 "$native" avx2 & builds+=($!)
build native-default "$native" default & builds+=($!)
if ! wait "$fallback_setup"; then
  cat "$log/fallback.setup" >&2
  echo "setting up the fallback configuration failed" >&2
  wait "${builds[@]}"
  exit 1
fi
fallback=$(cat "$log/fallback.venv")
build fallback-best "$fallback" "" & builds+=($!)

if ! "$native/bin/ruff" check . || ! "$native/bin/ruff" format --check . >/dev/null; then
  echo "ruff: lint or format errors (run: $native/bin/ruff format . && $native/bin/ruff check .)"
  status=1
fi

# The per-op test files: one kernel each, so the ones every ISA variant runs; and the bad-input
# table, of which only the NaN/inf row depends on the variant (the rest is variant_independent).
kernel_tests=(tests/test_roi_align.py tests/test_roi_pool.py tests/test_ps_roi_align.py tests/test_ps_roi_pool.py
  tests/test_nms.py tests/test_frozen_batch_norm.py tests/test_detectron2.py tests/test_box_iou_rotated.py
  tests/test_quantized.py tests/test_paths.py tests/test_deform_conv2d.py tests/test_depthwise_conv.py
  tests/test_bad_input.py tests/test_fuzz.py)

run() {  # run NAME VENV CAPABILITY TESTS...  (then "--" and pytest's extra arguments)
  local name=$1 venv=$2 cap=$3 out="$log/$1.txt"
  shift 3
  local tests=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do tests+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  echo "=== $name (ATEN_CPU_CAPABILITY=${cap:-unset}): ${tests[*]}"
  local envs=(env -u ATEN_CPU_CAPABILITY ${cap:+ATEN_CPU_CAPABILITY=$cap} PYTHONPATH="$root")
  tee "$out" <"$log/$name.build"
  if [ "$(cat "$log/$name.rc")" != 0 ]; then
    # Built (or failed) once here, not by both pytest workers at once.
    "${envs[@]}" "$venv/bin/python" -c "import torchvision_cpu_ext" 2>&1 | tee -a "$out"
  fi
  "${envs[@]}" "$venv/bin/python" -m pytest "${tests[@]}" -q -p no:cacheprovider -n 2 --dist worksteal \
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

wait "${builds[@]}"
# Once per CI run, not per configuration: the slow tests, and building a wheel (one variant),
# installing it in a fresh environment and loading its prebuilt kernels without a compiler
# (tests/test_wheel.py).
TORCHVISION_CPU_EXT_WHEEL_TEST=1 run native-best "$native" "" tests -- "$@"
lower=(-m "not slow and not variant_independent")  # what a lower ISA variant can change
run native-avx2 "$native" avx2 "${kernel_tests[@]}" -- "${lower[@]}" "$@"
run native-default "$native" default "${kernel_tests[@]}" -- "${lower[@]}" "$@"
run fallback-best "$fallback" "" tests -- -m "not slow" "$@"

echo
echo "all configurations: $passed passed, $failed failed, $skipped skipped"
exit $status
