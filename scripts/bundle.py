"""The pieces of scripts/offline_bundle.sh that are logic rather than pip calls (standard library only).

    python scripts/bundle.py filter-lock requirements-lock.txt --out constraints.txt --add setuptools==84.2.1
    python scripts/bundle.py host-platform                  # this machine's platform, e.g. manylinux_2_36_x86_64
    python scripts/bundle.py platforms manylinux2014_x86_64 # every platform tag pip may take for it, one a line
    python scripts/bundle.py check-built WHEEL --python-version 3.11 --platform manylinux_2_28_x86_64
    python scripts/bundle.py stub DIR --torch 2.13.0+offlinestub [--sdist pycosat-0.6.6.tar.gz]
    python scripts/bundle.py manifest BUNDLE --constraints BUNDLE/constraints.txt --python-version 3.11 \
        --platform manylinux_2_28_x86_64 [--built NAME ...]

torch is never in a bundle: the GPU machine brings its own CUDA build, and with it the CUDA libraries
(nvidia-*), triton and the other builds of the torch family (torchvision, torchaudio).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import re
import sys
import time
import zipfile
from pathlib import Path

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "triton"}
TORCH_FAMILY_PREFIXES = ("nvidia-", "pytorch-triton", "cuda-")  # cuda-bindings, cuda-pathfinder, ... of CUDA torch
# torch's own requirements when no torch is installed beside this script (torch 2.13's, CUDA libraries aside)
TORCH_REQUIRES = [
    "filelock",
    "typing-extensions>=4.10.0",
    "setuptools>=77.0.3",
    "sympy>=1.13.3",
    "networkx>=2.5.1",
    "jinja2",
    "fsspec>=0.8.5",
]
LEGACY_MANYLINUX = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2", ".tgz")


def canonical(name: str) -> str:
    """PEP 503's normal form: `Pebble`, `typing_extensions` -> `pebble`, `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_torch_family(name: str) -> bool:
    """torch, its CUDA libraries and triton; not the packages built on it (torchmetrics, pytorch-lightning)."""
    name = canonical(name)
    return name in TORCH_FAMILY or name.startswith(TORCH_FAMILY_PREFIXES)


def read_pins(text: str) -> list[tuple[str, str]]:
    """(name, version) of every `name==version` line of a lock; comments and blank lines skipped."""
    pins = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if not match:
            raise ValueError(f"line {number} is not `name==version`: {raw!r}")
        pins.append((match[1], match[2]))
    return pins


def filter_lock(text: str, add: list[str] = ()) -> tuple[list[str], list[str]]:
    """The lock's pins without the torch family, plus `add`; and the names left out."""
    kept, left_out = [], []
    for name, version in read_pins(text) + read_pins("\n".join(add)):
        (left_out if is_torch_family(name) else kept).append(f"{name}=={version}")
    names = [canonical(line.split("==")[0]) for line in kept]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"pinned twice: {', '.join(duplicates)}")
    return kept, [canonical(line.split("==")[0]) for line in left_out]


def host_platform() -> str:
    """This machine's most specific manylinux tag, manylinux_2_<glibc minor>_<arch>."""
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    if sys.platform != "linux" or not libc or not libc.startswith("glibc "):
        raise SystemExit("give PLATFORM= (e.g. manylinux_2_28_x86_64): this machine is not a glibc Linux")
    major, minor = (int(x) for x in libc.split()[1].split(".")[:2])
    return f"manylinux_{major}_{minor}_{platform.machine()}"


def expand_platform(tag: str) -> list[str]:
    """Every platform tag a pip on a machine of `tag` accepts, newest first: `manylinux_2_28_x86_64` also takes
    manylinux_2_27 ... 2_5, their legacy names (manylinux2014 = 2_17, 2010 = 2_12, 1 = 2_5) and linux_x86_64.
    pip only expands the legacy names itself, so a PEP 600 tag given to `pip download --platform` alone
    would miss the many wheels tagged manylinux2014. Other tags (musllinux, macosx, win) pass unchanged."""
    legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", tag)
    modern = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", tag)
    if legacy:
        major, minor, arch = 2, LEGACY_MANYLINUX[legacy[1]], legacy[2]
    elif modern:
        major, minor, arch = int(modern[1]), int(modern[2]), modern[3]
    else:
        return [tag]
    if major != 2:
        raise ValueError(f"{tag}: only glibc 2.x manylinux tags are known")
    tags = []
    for m in range(minor, 4, -1):
        tags.append(f"manylinux_2_{m}_{arch}")
        for name, legacy_minor in LEGACY_MANYLINUX.items():
            legacy_arches = ("x86_64", "i686") if name != "manylinux2014" else (
                "x86_64", "i686", "aarch64", "armv7l", "ppc64", "ppc64le", "s390x")  # fmt: skip
            if m == legacy_minor and arch in legacy_arches:
                tags.append(f"{name}_{arch}")
    return tags + [f"linux_{arch}"]  # wheels built here from sdists (never on PyPI)


def wheel_tags(filename: str) -> tuple[str, str, set[tuple[str, str, str]]]:
    """(name, version, {(python, abi, platform)}) of a wheel file name, compressed tag sets expanded."""
    stem = Path(filename).name
    if not stem.endswith(".whl"):
        raise ValueError(f"{filename}: not a wheel")
    parts = stem[:-4].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name")
    name, version, (pys, abis, plats) = parts[0], parts[1], parts[-3:]
    tags = {(p, a, pl) for p in pys.split(".") for a in abis.split(".") for pl in plats.split(".")}
    return name, version, tags


def is_pure(filename: str) -> bool:
    """A pure-Python wheel (py3-none-any): installs on any platform and Python 3."""
    return all(abi == "none" and plat == "any" for _, abi, plat in wheel_tags(filename)[2])


def glibc_needed(path: Path) -> tuple[int, int] | None:
    """The newest GLIBC_x.y symbol version that the shared objects of a wheel ask for (None: no such object)."""
    newest = None
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if re.search(r"\.so(\.|$)", member):
                for major, minor in re.findall(rb"GLIBC_(\d+)\.(\d+)", archive.read(member)):
                    newest = max(newest or (0, 0), (int(major), int(minor)))
    return newest


def check_built(path: Path, python_version: str, platform_tag: str) -> tuple[bool, str]:
    """Can a wheel built on this machine install on the target? A pure one anywhere; a compiled one only for the
    same CPython and architecture, and a target glibc no older than the one its shared objects ask for."""
    if is_pure(path.name):
        return True, f"{path.name}: pure Python, fits any platform"
    cp = "cp" + python_version.replace(".", "")
    arch = expand_platform(platform_tag)[-1].removeprefix("linux_")
    if not any(py == cp and plat.endswith(f"_{arch}") for py, _, plat in wheel_tags(path.name)[2]):
        return False, f"{path.name}: compiled for this machine's Python and architecture, not {cp} on {arch}"
    needed, target = glibc_needed(path), re.match(r"manylinux_(\d+)_(\d+)_", expand_platform(platform_tag)[0])
    if needed and target and needed > (int(target[1]), int(target[2])):
        return False, f"{path.name}: needs glibc >= {needed[0]}.{needed[1]}, newer than {platform_tag}'s"
    return True, f"{path.name}: compiled here, " + (f"needs glibc >= {needed[0]}.{needed[1]}" if needed else "no glibc")


def torch_requires() -> list[str]:
    """The installed torch's requirements without CUDA libraries, triton and extras; else torch 2.13's."""
    try:
        from importlib.metadata import PackageNotFoundError, requires

        found = requires("torch") or []
    except PackageNotFoundError:
        return list(TORCH_REQUIRES)
    keep = []
    for line in found:
        name = re.match(r"[A-Za-z0-9._-]+", line)[0]
        if "extra ==" not in line and not is_torch_family(name):
            keep.append(line)
    return keep


def stub_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A wheel of metadata only, for checking a bundle's closure offline: torch (the real one is the GPU
    machine's; the stand-in carries torch's own requirements, CUDA libraries aside, which the bundle must hold),
    or a package that the bundle carries as an sdist to be compiled at install time."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)
        ),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: dibs-bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for member, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def sdist_name(filename: str) -> tuple[str, str]:
    """(name, version) of an sdist file name: `pycosat-0.6.6.tar.gz` -> (`pycosat`, `0.6.6`)."""
    stem = Path(filename).name
    for suffix in SDIST_SUFFIXES:
        if stem.endswith(suffix):
            name, _, version = stem[: -len(suffix)].rpartition("-")
            return name, version
    raise ValueError(f"{filename}: not an sdist")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(
    folder: Path, constraints: Path, *, python_version: str, platform_tag: str, built: list[str] = ()
) -> tuple[dict, list[str]]:
    """MANIFEST.json (target, every wheel with its sha256, size and origin) and SHA256SUMS (for `sha256sum -c`)
    in `folder`; and the problems: a pin without its wheel (or sdist), several versions of one, a torch-family one.
    A compiled package that no wheel built here fits travels as its sdist, which pip compiles on the target."""
    pins = {canonical(name): version for name, version in read_pins(constraints.read_text())}
    built = {canonical(name) for name in built}
    wheels, problems, found = [], [], {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        if path.name.endswith(".whl"):
            name, version, _ = wheel_tags(path.name)
        elif path.name.endswith(SDIST_SUFFIXES):
            name, version = sdist_name(path.name)
        else:
            continue
        key = canonical(name)
        if is_torch_family(key):
            problems.append(f"{path.name}: torch and its CUDA libraries are never bundled")
        found.setdefault(key, []).append(version)
        if path.name.endswith(".whl"):
            origin = "built here from its sdist" if key in built else "downloaded wheel"
        else:  # compiled code that no wheel built here fits: pip compiles it on the target at install time
            origin = "sdist, compiled at install time (needs a C compiler and Python's headers there)"
        if key not in pins:
            origin += ", not in the lock"
        entry = dict(file=path.name, name=key, version=version, sha256=sha256(path), bytes=path.stat().st_size)
        wheels.append(dict(entry, pure=path.name.endswith(".whl") and is_pure(path.name), origin=origin))
    for key, version in sorted(pins.items()):
        versions = found.get(key, [])
        if version not in versions:
            found_text = ", ".join(versions) or "none"
            problems.append(f"{key}=={version}: no wheel or sdist of that version (found: {found_text})")
        elif len(versions) > 1:
            problems.append(f"{key}: several versions ({', '.join(versions)})")
    data = dict(
        target=dict(python_version=python_version, platform=platform_tag, platform_tags=expand_platform(platform_tag)),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        constraints="constraints.txt",
        constraints_sha256=sha256(constraints),
        sdists=[w["file"] for w in wheels if not w["file"].endswith(".whl")],  # compiled by pip on the target
        excluded="torch, torchvision, torchaudio, triton, pytorch-triton*, nvidia-*, cuda-* (the GPU machine's own)",
        install="pip install --no-index --find-links <bundle> -c <bundle>/constraints.txt -e '.[dev]'",
        count=len(wheels),
        bytes=sum(w["bytes"] for w in wheels),
        wheels=wheels,
    )
    (folder / "MANIFEST.json").write_text(json.dumps(data, indent=1) + "\n")
    (folder / "SHA256SUMS").write_text("".join(f"{w['sha256']}  {w['file']}\n" for w in wheels))
    return data, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("filter-lock", help="the lock without the torch family (printed: the names left out)")
    p.add_argument("lock", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--add", action="append", default=[], help="another pin, name==version")
    sub.add_parser("host-platform")
    p = sub.add_parser("platforms")
    p.add_argument("platform")
    p = sub.add_parser("check-built")
    p.add_argument("wheel")
    p.add_argument("--python-version", required=True)
    p.add_argument("--platform", required=True)
    p = sub.add_parser("stub", help="a metadata-only wheel: torch (with torch's requirements) or an sdist's")
    p.add_argument("folder", type=Path)
    p.add_argument("--torch", metavar="VERSION", help="a stand-in for torch of this version")
    p.add_argument("--sdist", nargs="*", default=[], help="stand-ins for these sdists' packages")
    p = sub.add_parser("manifest")
    p.add_argument("folder", type=Path)
    p.add_argument("--constraints", type=Path, required=True)
    p.add_argument("--python-version", required=True)
    p.add_argument("--platform", required=True)
    p.add_argument("--built", nargs="*", default=[])
    args = parser.parse_args(argv)

    if args.command == "filter-lock":
        kept, left_out = filter_lock(args.lock.read_text(), args.add)
        args.out.write_text("\n".join(kept) + "\n")
        print(" ".join(left_out))
    elif args.command == "host-platform":
        print(host_platform())
    elif args.command == "platforms":
        print("\n".join(expand_platform(args.platform)))
    elif args.command == "check-built":
        fits, message = check_built(Path(args.wheel), args.python_version, args.platform)
        print(message)
        return 0 if fits else 1
    elif args.command == "stub":
        if args.torch:
            print(stub_wheel(args.folder, "torch", args.torch, torch_requires()))
        for sdist in args.sdist:
            print(stub_wheel(args.folder, *sdist_name(sdist)))
    elif args.command == "manifest":
        data, problems = manifest(
            args.folder, args.constraints, python_version=args.python_version, platform_tag=args.platform,
            built=args.built,
        )  # fmt: skip
        sdists = f" ({len(data['sdists'])} of them sdists)" if data["sdists"] else ""
        print(f"{data['count']} files{sdists}, {data['bytes'] / 2**20:.0f} MiB")
        for problem in problems:
            print(f"  problem: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
