#!/usr/bin/env bash
# The op benchmark report: runs benchmarks/bench_ops.py (every op, shapes from real models, ours
# vs torchvision, 1 and 2 threads) and the machine's limits, then writes benchmarks/report/
# (report.md, PNG plots, report.html). Extra arguments go to benchmarks/report.py
# (e.g. --quick, --from benchmarks/out/ops.json, --ops roi_align nms).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/setup_env.sh" native)
cd "$root"
PYTHONPATH="$root" exec "$venv/bin/python" benchmarks/report.py "$@"
