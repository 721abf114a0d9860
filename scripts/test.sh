#!/usr/bin/env bash
# The test command (README quick start; .ci/run calls it). On a fresh machine it installs both
# configurations, then runs the whole suite in each, once per ISA variant of the kernels
# (ATEN_CPU_CAPABILITY selects the variant the package loads), and lints.
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

run() {  # run NAME VENV CAPABILITY
  local name=$1 venv=$2 cap=$3 out="$log/$1.txt"
  echo "=== $name (ATEN_CPU_CAPABILITY=${cap:-unset})"
  # Unset, not empty, for ATen's own choice: torch warns about an empty value on every import.
  env -u ATEN_CPU_CAPABILITY ${cap:+ATEN_CPU_CAPABILITY=$cap} PYTHONPATH="$root" \
    "$venv/bin/python" -m pytest tests -q -p no:cacheprovider \
    "${@:4}" 2>&1 | tee "$out" | grep -E "^(FAILED|ERROR)|^torchvision_cpu_ext: JIT|(passed|failed|error)"
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
TORCHVISION_CPU_EXT_WHEEL_TEST=1 run native-best "$native" "" "$@"
run native-avx2 "$native" avx2 "$@"
run native-default "$native" default "$@"
run fallback-best "$fallback" "" "$@"
run fallback-default "$fallback" default "$@"

echo
echo "all configurations: $passed passed, $failed failed, $skipped skipped"
exit $status
