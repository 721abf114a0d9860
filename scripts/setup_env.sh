#!/usr/bin/env bash
# Creates (or updates) a virtual environment for one configuration and prints its path.
#   native:   the pinned pair torch==2.14.1 + torchvision==0.29.2 (torchvision's kernels load)
#   fallback: torch==2.13.0 (CPU) + torchvision==0.28.0 without dependencies, whose compiled
#             ops do not load against that torch; the package must supply them.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
config=${1:-native}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
case "$config" in
  native) venv="$root/.venv" ;;
  fallback) venv="$root/.venv-fallback" ;;
  *) echo "usage: $0 [native|fallback]" >&2; exit 2 ;;
esac
common=(ninja numpy pytest pytest-xdist hypothesis expecttest ruff)
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv" >&2
fi
# --no-compile: pip would byte-compile every module it installs (~30 CPU-seconds for torch and its
# dependencies); Python compiles the few hundred a run imports on first import instead.
pip_install() { "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile "$@" >&2; }
if [ "$config" = native ]; then
  # Both pinned: torchvision 0.29.2 alone would accept any torch>=2.14.
  # matplotlib: the benchmark report's plots; tqdm: the demo's progress bar.
  pip_install torch==2.14.1 torchvision==0.29.2 "${common[@]}" matplotlib tqdm
else
  pip_install torch==2.13.0 "${common[@]}" pillow
  pip_install --no-deps torchvision==0.28.0
fi
echo "$venv"
