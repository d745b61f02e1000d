#!/usr/bin/env bash
# An offline bundle for a GPU machine that reaches no package index: a folder (and optionally a .tar) of every
# wheel the kit needs, at the versions requirements-lock.txt pins (dev and bench extras included, pytest among
# them), for a TARGET Python and platform, EXCEPT torch and its CUDA libraries (nvidia-*, triton): the GPU
# machine brings its own CUDA build of torch. Then, there: `make gpu-check BUNDLE=<folder>` (docs/gpu.md).
#
#   scripts/offline_bundle.sh                                          # this machine's Python and platform
#   PYTHON_VERSION=3.11 PLATFORM=manylinux_2_28_x86_64 scripts/offline_bundle.sh --tar
#   scripts/offline_bundle.sh --python-version 3.12 --platform manylinux2014_aarch64 --out bundle-arm
#
# Settings (flag or variable): PYTHON_VERSION (--python-version; default: that of PYTHON), PLATFORM (--platform;
# default: this machine's manylinux_2_<glibc>_<arch>: give the GPU machine's, `ldd --version` there), OUT (--out;
# default offline-bundle), TAR=1 (--tar: also OUT.tar). PYTHON: the interpreter that runs pip and builds the
# sdists (default .venv/bin/python, else python3); pip evaluates environment markers (`; python_version < ...`)
# for it, not for the target, so use one of the target's Python version when it differs from the lock's (3.11).
#
# How: `pip download --no-deps` over every pin of the lock (the lock already pins the whole dependency closure,
# so no resolution is needed, and torch, which the lock leaves out, is never pulled), setuptools added (torch and
# the editable install of this checkout need it). A pin without a wheel for the target comes as its sdist and is
# built into a wheel here: a pure-Python one (py3-none-any) installs anywhere; a compiled one only on the same
# Python, architecture and a glibc as new, else the sdist stays in the bundle and pip compiles it on the target.
# Then an offline check that the bundle alone resolves every pin and its dependencies (a metadata-only stand-in
# for torch carries torch's own requirements), and MANIFEST.json + SHA256SUMS.
set -euo pipefail
cd "$(dirname "$0")/.."

while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYTHON_VERSION=$2; shift 2 ;;
    --platform) PLATFORM=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --tar) TAR=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "offline_bundle.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LOCK=${LOCK:-requirements-lock.txt}
SETUPTOOLS=${SETUPTOOLS:-setuptools==84.2.1}  # >=77.0.3 for torch 2.13; >=68 for pyproject.toml's build
TORCH_VERSION=${TORCH_VERSION:-2.13.0}         # only the version of the stand-in of the closure check
OUT=${OUT:-offline-bundle}
OUT=${OUT%/}
TAR=${TAR:-0}
host_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYTHON_VERSION=${PYTHON_VERSION:-$host_version}
PLATFORM=${PLATFORM:-$("$PYTHON" scripts/bundle.py host-platform)}
helper() { "$PYTHON" scripts/bundle.py "$@"; }
pip() { "$PYTHON" -m pip --disable-pip-version-check "$@"; }
# the offline check sees the bundle alone: no pip configuration (find-links, indexes, constraints) of this machine
offline_pip() { env $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/-u \1/p') PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip "$@"; }

if [ -e "$OUT" ] && [ ! -f "$OUT/MANIFEST.json" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "offline_bundle.sh: $OUT exists and is not a bundle; give another OUT" >&2
  exit 2
fi
echo "[bundle] target Python $PYTHON_VERSION, $PLATFORM; pip of $PYTHON (Python $host_version); into $OUT/"
if [ "$PYTHON_VERSION" != "$host_version" ]; then
  echo "[bundle] note: pip reads environment markers for Python $host_version, not $PYTHON_VERSION;" \
    "for a bundle that is exact for $PYTHON_VERSION run with PYTHON=python$PYTHON_VERSION"
fi
stage="$OUT.partial"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$stage"
mkdir -p "$stage"

# 1. the pins: the lock without the torch family, plus setuptools
excluded=$(helper filter-lock "$LOCK" --out "$stage/constraints.txt" --add "$SETUPTOOLS")
echo "[bundle] $(grep -c '==' "$stage/constraints.txt") pins from $LOCK${excluded:+; left out: $excluded}"
platform_args=()
while read -r tag; do platform_args+=(--platform "$tag"); done < <(helper platforms "$PLATFORM")
target=(--python-version "$PYTHON_VERSION" --implementation cp "${platform_args[@]}")

# 2. every pin, without resolving (the lock is the closure): a wheel for the target, else the sdist
if ! pip download -q --no-deps "${target[@]}" -d "$stage" -r "$stage/constraints.txt"; then
  echo "offline_bundle.sh: a pin of $LOCK has no distribution for Python $PYTHON_VERSION on $PLATFORM (above)." \
    "The lock is resolved for the Python its header names; for another, re-lock with it (PYTHON=python$PYTHON_VERSION" \
    "make lock) or give the GPU machine that Python." >&2
  exit 1
fi

# 3. sdists (no wheel for the target) into wheels, with this machine's Python. A compiled one whose wheel does not
#    fit the target (another Python, architecture or an older glibc) stays an sdist: pip compiles it there.
built=()
kept=()
shopt -s nullglob
for sdist in "$stage"/*.tar.gz "$stage"/*.zip "$stage"/*.tar.bz2 "$stage"/*.tgz; do
  rm -rf "$tmp/built" && mkdir -p "$tmp/built"
  echo "[bundle] no wheel of $(basename "$sdist") for the target: building one"
  pip wheel -q --no-deps -w "$tmp/built" "$sdist"
  wheel=$(ls "$tmp/built"/*.whl)
  if fits=$(helper check-built "$wheel" --python-version "$PYTHON_VERSION" --platform "$PLATFORM"); then
    echo "[bundle]   $fits"
    mv "$wheel" "$stage/"
    built+=("$(basename "$wheel" | cut -d- -f1)")
    rm -f "$sdist"
  else
    echo "[bundle]   warning: $fits; the bundle keeps $(basename "$sdist"), which pip compiles on the target" \
      "at install time (a C compiler and Python's headers needed there). To avoid it, build the bundle with" \
      "PYTHON=python$PYTHON_VERSION on a machine of the target's architecture and glibc."
    kept+=("$(basename "$sdist")")
  fi
done

# 4. the bundle alone must resolve every pin and its dependencies, offline (torch: a metadata-only stand-in;
#    so are the packages kept as sdists, since the check may not build them for another platform)
stub="$TORCH_VERSION+offlinestub"
helper stub "$tmp/stub" --torch "$stub" --sdist "${kept[@]}" >/dev/null
check=(install --dry-run --ignore-installed --target "$tmp/target" --only-binary=:all: "${target[@]}"
       --find-links "$stage" --find-links "$tmp/stub" -c "$stage/constraints.txt" -r "$stage/constraints.txt"
       "torch==$stub")
if ! offline_pip "${check[@]}" --no-index -q >"$tmp/check.log" 2>&1; then
  # a dependency the lock does not pin for this target (markers of another Python): fetch it, then check again
  echo "[bundle] the lock's pins miss a dependency for this target:"
  grep -E "ERROR|No matching" "$tmp/check.log" | head -5 | sed 's/^/  /'
  echo "[bundle] fetching the missing ones from the index (they are listed as 'not in the lock' in MANIFEST.json)"
  pip download -q --only-binary=:all: "${target[@]}" -d "$tmp/fill" --find-links "$stage" --find-links "$tmp/stub" \
    -c "$stage/constraints.txt" -r "$stage/constraints.txt" "torch==$stub"
  for wheel in "$tmp/fill"/*.whl; do
    [ -e "$stage/$(basename "$wheel")" ] || [ -e "$tmp/stub/$(basename "$wheel")" ] || mv "$wheel" "$stage/"
  done
  offline_pip "${check[@]}" --no-index -q
fi
echo "[bundle] offline check: the bundle resolves every pin and its dependencies with no index"

# 5. manifest and checksums, then the folder in place (and the .tar)
helper manifest "$stage" --constraints "$stage/constraints.txt" --python-version "$PYTHON_VERSION" \
  --platform "$PLATFORM" --built "${built[@]}" | sed 's/^/[bundle] /'
rm -rf "$OUT"
mv "$stage" "$OUT"
echo "[bundle] $OUT/: $(du -sh "$OUT" | cut -f1); wheels listed in $OUT/MANIFEST.json, checksums in $OUT/SHA256SUMS"
if [ "$TAR" = 1 ]; then
  tar -cf "$OUT.tar" -C "$(dirname "$OUT")" "$(basename "$OUT")"
  echo "[bundle] $OUT.tar: $(du -sh "$OUT.tar" | cut -f1)"
fi
echo "[bundle] on the GPU machine, in this checkout: make gpu-check BUNDLE=$OUT   (docs/gpu.md)"
