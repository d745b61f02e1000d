#!/usr/bin/env bash
# Refresh requirements-lock.txt: resolve this package's dependencies (and its dev extra) afresh in a throw-away
# virtualenv, on top of the CPU build of torch, and pin every version pip chose. `make lock` runs it; commit the
# result. torch itself is not pinned here (GPU users keep their own CUDA build; setup.sh installs TORCH_VERSION).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip() { "$tmp/venv/bin/python" -m pip "$@"; }
pip install -q "torch==$TORCH_VERSION" --extra-index-url https://download.pytorch.org/whl/cpu
pip install -q ".[dev,bench]"  # bench pinned too: `pip install -c requirements-lock.txt -e ".[bench]"`
{
  echo "# Exact versions of every dependency of dibs and its dev extra, resolved by scripts/lock.sh ($(date -u +%Y-%m-%d),"
  echo "# $("$tmp/venv/bin/python" -c 'import sys; print(f"Python {sys.version_info[0]}.{sys.version_info[1]}")'), $(uname -m))."
  echo "# make train / make test install with these as pip constraints; refresh with \`make lock\` and commit."
  echo "# torch is installed by scripts/setup.sh (TORCH_VERSION) and deliberately not pinned here."
  pip freeze --exclude-editable --all | grep -v -i -E '^(dibs|torch|nvidia-|triton|pip|setuptools|wheel)([=@ ]|$)' | sort -f
} > requirements-lock.txt
echo "requirements-lock.txt: $(grep -c '==' requirements-lock.txt) packages pinned"
