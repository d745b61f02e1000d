#!/usr/bin/env bash
# One-time set-up, run by `make train` / `make test`: a virtualenv in .venv with the CPU build of torch
# when no CUDA GPU is present, then this package with its dev extra, every dependency at the version
# requirements-lock.txt pins (so two installs months apart train the same numbers). Re-runs are a no-op unless
# pyproject.toml or the lock changed. Override: VENV=path, PYTHON=python3.11, TORCH_VERSION=2.13.0,
# LOCK= (empty: resolve afresh, unpinned).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LOCK=${LOCK-requirements-lock.txt}
stamp="$VENV/.dibs-$(cat pyproject.toml ${LOCK:+"$LOCK"} | sha256sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA GPU found: installing torch==$TORCH_VERSION from PyPI (CUDA build)"
    pip install "torch==$TORCH_VERSION"
  else
    # The +cpu local version outranks PyPI's CUDA build of the same release, so pip takes the CPU wheel.
    echo "[setup] no CUDA GPU: installing the CPU build of torch==$TORCH_VERSION"
    pip install "torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip install ${LOCK:+-c "$LOCK"} -e ".[dev]"
rm -f "$VENV"/.dibs-*
touch "$stamp"
