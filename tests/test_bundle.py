"""The offline bundle (scripts/offline_bundle.sh, scripts/bundle.py) and the GPU check's plumbing
(scripts/gpu_check.py), without network: the script runs on a fake lock whose wheels pip finds in a local folder."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bundle = load("bundle")
gpu_check = load("gpu_check")


def test_the_torch_family_is_left_out_and_what_is_built_on_it_kept():
    lock = "\n".join(
        ["# a comment", "", "torch==2.13.0", "nvidia-cublas-cu12==12.9.1.4", "triton==3.5.0", "torchvision==0.28.0",
         "pytorch-triton==3.0.0", "cuda-bindings==13.0.1", "torchmetrics==1.9.0", "pytorch-lightning==2.6.6",
         "lightning-utilities==0.15.3", "Pebble==5.2.3  # trailing comment"]
    )  # fmt: skip
    kept, left_out = bundle.filter_lock(lock, add=["setuptools==84.2.1"])
    assert kept == [
        "torchmetrics==1.9.0",
        "pytorch-lightning==2.6.6",
        "lightning-utilities==0.15.3",
        "Pebble==5.2.3",
        "setuptools==84.2.1",
    ]
    assert left_out == ["torch", "nvidia-cublas-cu12", "triton", "torchvision", "pytorch-triton", "cuda-bindings"]
    with pytest.raises(ValueError, match="pinned twice: setuptools"):
        bundle.filter_lock("setuptools==80.0", add=["setuptools==84.2.1"])
    with pytest.raises(ValueError, match="line 1 is not `name==version`"):
        bundle.filter_lock("numpy>=2")


def test_the_lock_has_no_torch_and_every_line_pinned():
    kept, left_out = bundle.filter_lock((ROOT / "requirements-lock.txt").read_text())
    assert left_out == [] and len(kept) > 50
    assert {"pytest", "pycosat", "torchmetrics"} <= {bundle.canonical(k.split("==")[0]) for k in kept}


def test_platform_tags_as_pip_on_the_target_would_take_them():
    tags = bundle.expand_platform("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "linux_x86_64"
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} < set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    arm = bundle.expand_platform("manylinux2014_aarch64")  # a legacy name: glibc 2.17
    assert arm[0] == "manylinux_2_17_aarch64" and "manylinux2014_aarch64" in arm and "manylinux1_aarch64" not in arm
    assert bundle.expand_platform("macosx_11_0_arm64") == ["macosx_11_0_arm64"]
    assert bundle.host_platform().startswith("manylinux_2_") if sys.platform == "linux" else True


def test_built_wheels_fit_the_target_only_when_pure_or_of_its_python_arch_and_glibc(tmp_path):
    assert bundle.is_pure("zss-1.2.0-py3-none-any.whl") and bundle.is_pure("six-1.17.0-py2.py3-none-any.whl")
    assert not bundle.is_pure("ruff-0.17.6-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    _, _, tags = bundle.wheel_tags("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl")
    assert tags == {("cp311", "cp311", "manylinux_2_27_x86_64"), ("cp311", "cp311", "manylinux_2_28_x86_64")}

    def compiled(glibc: bytes) -> Path:
        path = tmp_path / "pycosat-0.6.6-cp311-cp311-linux_x86_64.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("pycosat.cpython-311-x86_64-linux-gnu.so", b"\x7fELF..." + glibc + b"\0GLIBC_2.2.5\0")
        return path

    assert bundle.check_built(compiled(b"GLIBC_2.3"), "3.11", "manylinux_2_17_x86_64")[0]
    fits, why = bundle.check_built(compiled(b"GLIBC_2.34"), "3.11", "manylinux_2_28_x86_64")
    assert not fits and "needs glibc >= 2.34" in why
    assert not bundle.check_built(compiled(b"GLIBC_2.3"), "3.12", "manylinux_2_28_x86_64")[0]  # another Python
    assert not bundle.check_built(compiled(b"GLIBC_2.3"), "3.11", "manylinux_2_28_aarch64")[0]  # another arch
    pure = bundle.stub_wheel(tmp_path, "zss", "1.2.0")
    assert bundle.check_built(pure, "3.13", "manylinux_2_28_aarch64")[0]


def fake_index(folder: Path, requires: dict[str, list[str]]) -> None:
    """Metadata-only wheels, `name==version` -> its requirements, where pip finds them (no index)."""
    for pin, needs in requires.items():
        name, version = pin.split("==")
        bundle.stub_wheel(folder, name, version, needs)


def run_script(tmp_path: Path, lock: list[str], index: Path, out: Path) -> subprocess.CompletedProcess:
    (tmp_path / "lock.txt").write_text("\n".join(lock) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index), PYTHON=sys.executable,
               LOCK=str(tmp_path / "lock.txt"), SETUPTOOLS="setuptools==99.0", OUT=str(out),
               PLATFORM="manylinux_2_17_x86_64")  # fmt: skip
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "offline_bundle.sh"), "--tar"], env=env, capture_output=True, text=True
    )


def test_a_bundle_of_a_fake_lock_offline(tmp_path):
    """torch and its CUDA libraries are never fetched (the index has none: fetching would fail); a dependency the
    lock misses is fetched and marked; the manifest's checksums are the files'; a missing one fails the script."""
    index = tmp_path / "index"
    needs = {bundle.canonical(r.split(">")[0].split("=")[0].split(";")[0]) for r in bundle.torch_requires()}
    torch_needs = {f"{name}==99.0": [] for name in needs - {"setuptools"}}  # pinned by the lock, as the real one
    fake_index(index, {"alpha==1.0": ["beta>=2"], "beta==2.0": [], "torchmetrics==1.9.0": ["torch>=2"],
                       "setuptools==99.0": [], **torch_needs})  # fmt: skip
    lock = ["alpha==1.0", "torch==2.13.0", "nvidia-cublas-cu12==12.9.1.4", "triton==3.5.0", "torchmetrics==1.9.0"]
    out = tmp_path / "offline-bundle"
    result = run_script(tmp_path, lock + sorted(torch_needs), index, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left out: torch nvidia-cublas-cu12 triton" in result.stdout
    manifest = json.loads((out / "MANIFEST.json").read_text())
    files = sorted(p.name for p in out.glob("*.whl"))
    assert [w["file"] for w in manifest["wheels"]] == files and manifest["count"] == len(files)
    names = {w["name"]: w for w in manifest["wheels"]}
    assert set(names) == {"alpha", "beta", "torchmetrics", "setuptools"} | {p.split("==")[0] for p in torch_needs}
    assert names["beta"]["origin"] == "downloaded wheel, not in the lock"  # the fill: not pinned, fetched
    assert names["alpha"]["origin"] == "downloaded wheel"
    for wheel in manifest["wheels"]:
        assert wheel["sha256"] == hashlib.sha256((out / wheel["file"]).read_bytes()).hexdigest()
    assert (out / "SHA256SUMS").read_text().splitlines()[0] == f"{names['alpha']['sha256']}  {names['alpha']['file']}"
    assert "torch" not in (out / "constraints.txt").read_text().replace("torchmetrics", "")
    assert (tmp_path / "offline-bundle.tar").is_file() and not (tmp_path / "offline-bundle.partial").exists()
    assert gpu_check.verify_checksums(out) == []
    (out / files[0]).write_bytes(b"damaged on its way")
    assert gpu_check.verify_checksums(out) == [files[0]]

    fake_index(index, {"gamma==1.0": ["delta"]})  # delta is nowhere: the bundle cannot be complete
    failed = run_script(tmp_path, ["gamma==1.0"] + sorted(torch_needs), index, tmp_path / "incomplete")
    assert failed.returncode != 0 and not (tmp_path / "incomplete").exists()
    assert "delta" in failed.stdout + failed.stderr


def test_the_shell_scripts_parse_and_the_check_needs_a_bundle():
    for script in ("offline_bundle.sh", "gpu_check.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)
    usage = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "make gpu-check BUNDLE=" in usage.stdout


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    result = gpu_check.run([sys.executable, "-c", script], 1, tmp_path / "step.log")
    assert result["timed_out"] and result["seconds"] < 10 and result["rc"] != 0


def test_train_figures_from_a_run_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    sidecar = dict(iterations_done=2, costs=dict(samples=256, tokens=4542, updates=8, wall_s=4.1))
    (tmp_path / "checkpoints" / "iter_002.json").write_text(json.dumps(sidecar))
    (tmp_path / "checkpoints" / "iter_001.json").write_text(json.dumps(dict(sidecar, iterations_done=1)))
    figures = gpu_check.train_figures(tmp_path)
    assert figures["iterations"] == 2 and figures["costs"]["updates"] == 8
    assert "tensorboard" in figures or figures.get("seconds") == {}  # no events in the folder
