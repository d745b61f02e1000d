#!/usr/bin/env bash
# The GPU check, in one command, on a GPU machine that reaches no package index (docs/gpu.md):
#
#   scripts/gpu_check.sh offline-bundle        # or: make gpu-check BUNDLE=offline-bundle  (a .tar works too)
#
# 1. a virtualenv GPU_VENV (default .venv-gpu) made with `python -m venv --system-site-packages` from PYTHON
#    (default python3), so that it sees the machine's own CUDA build of torch and installs everything else
#    beside it; GPU_VENV= (empty) installs into PYTHON's own environment instead (a conda env, a container);
# 2. scripts/gpu_check.py with that environment's Python: the kit from the bundle (pip --no-index), then
#    the GPU tests, benchmarks/gpu_phases.py and a short `train.py trainer=gpu` run, each with its own
#    timeout, all within 470 s (--total), and ONE JSON of the results.
#
# PYTHON: the interpreter whose environment holds the machine's CUDA torch. More arguments go to
# scripts/gpu_check.py (--out results.json, --require-cuda, --skip-install, --total SECONDS; see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:-${BUNDLE:-}}
[ $# -gt 0 ] && shift
if [ -z "$BUNDLE" ] || [ "$BUNDLE" = "-h" ] || [ "$BUNDLE" = "--help" ]; then
  sed -n '2,15p' "$0"
  exit 2
fi
PYTHON=${PYTHON:-python3}
GPU_VENV=${GPU_VENV-.venv-gpu}
if [ -n "$GPU_VENV" ]; then
  if [ ! -x "$GPU_VENV/bin/python" ]; then
    echo "[gpu-check] creating $GPU_VENV: $PYTHON -m venv --system-site-packages (it sees $PYTHON's torch)"
    "$PYTHON" -m venv --system-site-packages "$GPU_VENV"
  fi
  PY=$GPU_VENV/bin/python
else
  PY=$PYTHON
fi
exec "$PY" scripts/gpu_check.py --bundle "$BUNDLE" "$@"
