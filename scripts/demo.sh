#!/usr/bin/env bash
# The main job (README quick start): sets up the pinned environment on a fresh machine, then
# runs the end-to-end detection benchmark (detectron_demo): stock torchvision against
# torchvision_cpu_ext, NCHW/channels_last, fp32/bf16 autocast, all threads and 1 thread.
# Extra arguments go to the demo (e.g. --quick, --model mask_rcnn, --iters 9).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/setup_env.sh" native)
cd "$root"
PYTHONPATH="$root" exec "$venv/bin/python" -m detectron_demo "$@"
