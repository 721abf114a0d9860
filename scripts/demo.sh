#!/usr/bin/env bash
# The main job (README quick start): sets up the pinned environment on a fresh machine, then
# runs the benchmark of our kernels against torchvision's. Extra arguments go to the benchmark
# (e.g. --quick).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/setup_env.sh" native)
cd "$root"
PYTHONPATH="$root" exec "$venv/bin/python" benchmarks/bench_ops.py "$@"
