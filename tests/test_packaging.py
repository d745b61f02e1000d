"""The package as users install it: a wheel built from pyproject.toml holds every module, the Hydra configs and
the grids, and its console scripts run a job and evaluate its export from a fresh venv, far from any checkout.

The fresh venv borrows the third-party packages of the running environment through a .pth line (installing
torch and the rest from an index would take minutes and need the network); dibs itself comes only from the wheel:
the test checks where it is imported from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    (found,) = out.glob("dibs-*.whl")
    return found


def test_the_wheel_holds_every_module_the_configs_the_grids_and_the_console_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "dibs").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set()
    configs = {f"dibs/configs/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    grids = {f"dibs/experiments/{p.relative_to(ROOT / 'experiments')}" for p in (ROOT / "experiments").rglob("*.yaml")}
    assert configs - names == set() and grids - names == set()
    assert "dibs/configs/config.yaml" in names and "dibs/experiments/grid/smoke.yaml" in names
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for line in ("dibs-train = dibs.train:cli", "dibs-eval = dibs.evaluate:cli", "dibs-report = "):
        assert line in scripts


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new venv with the wheel installed and this environment's third-party packages on its path."""
    where = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the running environment's packages, listed after the venv's own: its editable dibs is never activated
    # (a .pth line adds a plain path; the .pth files inside it are not read)
    (Path(purelib) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True, timeout=300)
    return where


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_the_console_scripts_of_an_installed_wheel_train_and_evaluate(venv, tmp_path):
    bin_dir = venv / "bin"
    origin = run([str(bin_dir / "python"), "-c", "import dibs, dibs.configs; print(dibs.__file__)"], tmp_path)
    assert Path(origin.stdout.strip()).is_relative_to(venv), origin.stdout  # not the checkout's package
    assert "algo" in run([str(bin_dir / "dibs-train"), "--help"], tmp_path).stdout  # the configs are found

    job = tmp_path / "job"
    cache = tmp_path / "cache"
    run(
        [str(bin_dir / "dibs-train"), "experiment=smoke", "iterations=1", f"cache_dir={cache}", f"hydra.run.dir={job}"],
        tmp_path,
    )
    export = job / "hf" / "iter_001"
    assert (export / "config.json").is_file() and (job / "tb").is_dir()
    evaluation = tmp_path / "eval"
    run(
        [
            str(bin_dir / "dibs-eval"),
            f"evaluate.checkpoint={export}",
            "experiment=smoke",
            f"cache_dir={cache}",
            f"evaluate.out_dir={evaluation}",
            f"hydra.run.dir={evaluation}",
        ],
        tmp_path,
    )
    report = json.loads((evaluation / "eval.json").read_text())
    assert report["checkpoint"] == str(export) and report["benchmarks"]
