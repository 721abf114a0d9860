#!/usr/bin/env bash
# The tests on the sanitizer build (issue 20): the kernels compiled with AddressSanitizer and
# UndefinedBehaviorSanitizer (TORCHVISION_CPU_EXT_SANITIZE=1, a library of its own name in the
# kernel cache), Python started with their runtimes preloaded; the first report aborts.
#   bash scripts/sanitize.sh                      # the suite but the slow tests, native environment
#   VENV=.venv-fallback bash scripts/sanitize.sh tests/test_fuzz.py
# Extra arguments replace the test selection (pytest arguments).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${VENV:-.venv}
cxx=${CXX:-c++}
export TORCHVISION_CPU_EXT_SANITIZE=1
export LD_PRELOAD="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libubsan.so)"
# Python and torch keep memory to the end: leak reports would be theirs. protect_shadow_gap=0:
# torch's CUDA libraries map memory where ASan's shadow gap would be.
export ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$root"
"$venv/bin/python" -c "import torchvision_cpu_ext"  # build once, not per pytest worker
if [ $# -eq 0 ]; then
  set -- tests -m "not slow"
fi
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2 "$@"
