"""The GPU check, run by scripts/gpu_check.sh with the Python of the environment to check (standard library only
until the install step has run). Steps, each with its own timeout inside one overall deadline (default 470 s):

    install     the bundle's checksums, then this checkout with its dev extra from the bundle, no index
                (`pip install --no-index --find-links BUNDLE -c BUNDLE/constraints.txt -e .[dev]`); skipped
                when this environment already holds this bundle's install
    env         GPU names and memory, driver, torch, CUDA and cuDNN versions, bf16, a bf16 matmul on the GPU
    pytest_gpu  `pytest -m gpu`: the tests marked gpu (they skip themselves without CUDA or vllm)
    gpu_phases  benchmarks/gpu_phases.py on a random model of Qwen2.5-1.5B's shape: sampling and training
                tokens/s and the peak memory of each phase
    train       `train.py experiment=smoke trainer=gpu`: the embedded task end to end (warm start, 2 EM
                iterations, evaluations), about a minute

A failed or timed-out step is recorded and the next one runs. Everything goes to ONE JSON (--out; default
outputs/gpu_check/<time>/gpu_check.json, with each step's log beside it), rewritten after every step.
Without CUDA (a CPU machine) gpu_phases runs the tiny shape on the CPU and train uses trainer=cpu, marked
"stand_in": the check then proves the install, not the GPU; --require-cuda makes that a failure instead.

    python scripts/gpu_check.py --bundle offline-bundle [--out results.json] [--total 470] [--require-cuda]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUTS = {"install": 110, "env": 30, "pytest_gpu": 80, "gpu_phases": 110, "train": 120}  # 450 s in all
# Sized to end in about a minute on one GPU with the HF backend: one chunk of 128 rows x 256 new tokens
PHASES_CUDA = "--prompts 32 --n 4 --new-tokens 256 --token-budget 65536 --updates 3"
PHASES_CPU = "--shape tiny --device cpu --prompts 8 --n 2 --new-tokens 32 --updates 2"
# the install sees the bundle alone: no pip configuration files, no wheel sources from the environment
PIP_SOURCES = ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_CONFIG_FILE")
PIP_ALONE = dict({k: v for k, v in os.environ.items() if k not in PIP_SOURCES}, PIP_CONFIG_FILE=os.devnull)
ENV_PROBE = r"""
import importlib.metadata as md, json, platform, shutil, subprocess, sys
import torch
info = dict(python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
            torch_path=torch.__file__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
            cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count())
if shutil.which("nvidia-smi"):
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    run = subprocess.run(query, capture_output=True, text=True, timeout=20)
    info["nvidia_smi"] = run.stdout.strip().splitlines() if run.returncode == 0 else "failed: " + run.stderr.strip()
if info["cuda_available"]:
    info["gpus"] = [dict(name=torch.cuda.get_device_name(i), capability="%d.%d" % torch.cuda.get_device_capability(i),
                         memory_gib=round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1))
                    for i in range(torch.cuda.device_count())]
    info["bf16"] = torch.cuda.is_bf16_supported()
    x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    err = ((x @ x).float() - x.float() @ x.float()).abs().max().item() / x.float().abs().max().item() ** 2
    info["bf16_matmul_ok"] = bool(err == err and err < 1.0)
versions = {}
for name in ("dibs", "transformers", "lightning", "tokenizers", "numpy", "hydra-core", "pytest", "vllm"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
info["packages"] = versions
print("ENV_JSON " + json.dumps(info))
"""


def run(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> dict:
    """Run a command in its own process group, output to `log`; kill the whole group at the timeout."""
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # fmt: skip
        try:
            rc, timed_out = process.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            rc, timed_out = process.wait(), True
    return dict(rc=rc, timed_out=timed_out, seconds=round(time.perf_counter() - start, 1), log=str(log))


def tail(log: str, lines: int = 15) -> str:
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.start = time.time()
        self.deadline = self.start + args.total
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        self.out = Path(args.out) if args.out else ROOT / "outputs" / "gpu_check" / stamp / "gpu_check.json"
        self.dir = self.out.parent
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.cuda = False
        self.results = dict(
            ok=None,  # every step ok (or skipped)
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            total_seconds=None,
            deadline_s=args.total,
            gpu=None,  # the env step fills these four
            torch=None,
            cuda=None,
            cuda_available=None,
            python=sys.executable,
            bundle=str(args.bundle),
            steps={},
        )

    def write(self) -> None:
        self.results["total_seconds"] = round(time.time() - self.start, 1)
        self.results["ok"] = all(s["status"] in ("ok", "skipped") for s in self.results["steps"].values())
        self.out.write_text(json.dumps(self.results, indent=1) + "\n")

    def step(self, name: str, function) -> None:
        """Run one step within its timeout and what is left of the deadline; record it whatever happens."""
        left = self.deadline - time.time()
        timeout = min(TIMEOUTS[name], left)
        print(f"[gpu-check] {name} (timeout {timeout:.0f} s) ...", flush=True)
        if timeout < 5:
            record = dict(status="timeout", reason=f"not started: the {self.args.total:.0f} s deadline is spent")
        else:
            try:
                record = function(timeout)
            except Exception as error:  # a step's own bug is a failed step, not a lost JSON
                record = dict(status="failed", error=f"{type(error).__name__}: {error}")
        record.setdefault("timeout_s", round(timeout))
        self.results["steps"][name] = record
        self.write()
        print(f"[gpu-check] {name}: {record['status']}" + (f" in {record['seconds']} s" if "seconds" in record else ""))

    def command(self, name: str, cmd: list[str], timeout: float, log: str | None = None, shown: str = "") -> dict:
        env = PIP_ALONE if name == "install" else None
        result = run(cmd, timeout, self.dir / f"{log or name}.log", env)
        status = "timeout" if result["timed_out"] else ("ok" if result["rc"] == 0 else "failed")
        record = dict(status=status, command=shown or shlex.join(cmd), **result)
        if status != "ok":
            record["log_tail"] = tail(result["log"])
        return record

    # ---------------------------------------------------------------- the steps

    def install(self, timeout: float) -> dict:
        bundle = self.bundle_folder()
        start = time.perf_counter()
        bad = verify_checksums(bundle)
        if bad:
            return dict(status="failed", error="bundle checksums do not match: " + ", ".join(bad[:5]))
        manifest = (bundle / "MANIFEST.json").read_bytes()
        key = hashlib.sha256(manifest + (ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
        stamp = Path(sys.prefix) / f".dibs-gpu-check-{key}"
        target = json.loads(manifest)["target"]
        info = dict(bundle_target=f"Python {target['python_version']}, {target['platform']}")
        info["wheels"] = json.loads(manifest)["count"]
        if stamp.exists():
            return dict(status="ok", skipped="this environment already holds this bundle's install", **info)
        if importlib.util.find_spec("torch") is None:  # the machine's own: the bundle has none
            return dict(status="failed", error=f"{sys.executable} sees no torch: give gpu_check.sh the PYTHON "
                        "whose environment has the machine's CUDA torch", **info)  # fmt: skip
        # --no-compile: modules are byte-compiled when first imported, not all of them now (a minute saved)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--no-compile", "--no-index",
               "--find-links", str(bundle)]  # fmt: skip
        record = self.command("install", pip + ["-c", str(bundle / "constraints.txt"), "-e", ".[dev]"], timeout)
        record.update(info, mode="resolved")
        if record["status"] == "failed":  # e.g. the machine's torch is a pre-release or its CUDA libraries
            # carry no pip metadata: every pinned wheel as it is, then pip check says what does not fit
            first = record.pop("log_tail")
            files = [str(bundle / w["file"]) for w in json.loads(manifest)["wheels"]]
            left = timeout - (time.perf_counter() - start)
            record = self.command("install", pip + ["--no-deps", *files], left, log="install_no_deps")
            if record["status"] == "ok":
                left = timeout - (time.perf_counter() - start)
                record = self.command("install", pip + ["--no-deps", "-e", "."], left, log="install_checkout")
            pip_check = [sys.executable, "-m", "pip", "check"]
            check = subprocess.run(pip_check, capture_output=True, text=True, env=PIP_ALONE)
            record.update(info, mode="no-deps (the resolved install failed)", resolved_error=first,
                          pip_check=check.stdout.strip().splitlines())  # fmt: skip
        record["seconds"] = round(time.perf_counter() - start, 1)
        if record["status"] == "ok":
            stamp.touch()
        return record

    def env(self, timeout: float) -> dict:
        shown = f"{sys.executable} -c ENV_PROBE  (in scripts/gpu_check.py)"
        record = self.command("env", [sys.executable, "-c", ENV_PROBE], timeout, shown=shown)
        lines = [x for x in Path(record["log"]).read_text().splitlines() if x.startswith("ENV_JSON ")]
        if lines:
            info = json.loads(lines[-1].removeprefix("ENV_JSON "))
            record.update(info)
            self.cuda = info["cuda_available"]
            self.results.update(
                gpu=", ".join(g["name"] for g in info.get("gpus", [])) or None,
                torch=info["torch"],
                cuda=info["cuda"],
                cuda_available=self.cuda,
            )
            smi = info.get("nvidia_smi")
            if not self.cuda and smi and not str(smi).startswith("failed"):
                record.update(status="failed", error="nvidia-smi sees a GPU but torch.cuda.is_available() is False: "
                              "is this torch a CPU build, or the driver older than its CUDA?")  # fmt: skip
            elif not self.cuda and self.args.require_cuda:
                record.update(status="failed", error="no CUDA GPU visible to torch (--require-cuda)")
            elif self.cuda and not info.get("bf16_matmul_ok"):
                record.update(status="failed", error="a bf16 matmul on the GPU gave a wrong result")
        return record

    def pytest_gpu(self, timeout: float) -> dict:
        junit = self.dir / "pytest_gpu.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests", f"--junitxml={junit}"]
        record = self.command("pytest_gpu", cmd, timeout)
        if junit.exists():
            tests = []
            for case in ET.parse(junit).iter("testcase"):
                outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                reason = next((c.get("message") for c in case if c.tag in ("failure", "error", "skipped")), None)
                tests.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome, reason=reason))
            record["tests"] = tests
            for outcome in ("passed", "skipped", "failure", "error"):
                record[outcome] = sum(t["outcome"] == outcome for t in tests)
        return record

    def gpu_phases(self, timeout: float) -> dict:
        out = self.dir / "gpu_phases.json"
        settings = self.args.phases_args or (PHASES_CUDA if self.cuda else PHASES_CPU)
        cmd = [sys.executable, "benchmarks/gpu_phases.py", *shlex.split(settings), "--json", str(out)]
        record = self.command("gpu_phases", cmd, timeout)
        if not self.cuda:
            record["stand_in"] = "no CUDA: the tiny shape on the CPU (proves the script and install, not the GPU)"
        if out.exists():
            record["figures"] = json.loads(out.read_text())
        return record

    def train(self, timeout: float) -> dict:
        run_dir, cache = self.dir / "train", self.dir / "cache"
        for folder in (run_dir, cache):  # a check's own, from an earlier check into the same --out: a fresh run
            shutil.rmtree(folder, ignore_errors=True)
        overrides = ["experiment=smoke", f"trainer={'gpu' if self.cuda else 'cpu'}"]
        overrides += [f"hydra.run.dir={run_dir}", f"cache_dir={cache}", *shlex.split(self.args.train_args)]
        record = self.command("train", [sys.executable, "train.py", *overrides], timeout)
        if not self.cuda:
            record["stand_in"] = "no CUDA: trainer=cpu (proves the install end to end, not the GPU)"
        record["figures"] = train_figures(run_dir)
        return record

    def bundle_folder(self) -> Path:
        bundle = Path(self.args.bundle)
        if bundle.is_file() and tarfile.is_tarfile(bundle):  # a carried .tar: unpacked beside the results
            with tarfile.open(bundle) as archive:
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                archive.extractall(self.dir / "bundle", **kwargs)
            found = [p.parent for p in (self.dir / "bundle").rglob("MANIFEST.json")]
            if len(found) != 1:
                raise ValueError(f"{bundle}: holds {len(found)} bundles (MANIFEST.json), not one")
            bundle = found[0]
        if not (bundle / "MANIFEST.json").is_file():
            raise ValueError(f"{bundle}: not a bundle of scripts/offline_bundle.sh (no MANIFEST.json)")
        return bundle.resolve()


def verify_checksums(bundle: Path) -> list[str]:
    """The files of SHA256SUMS whose content does not match (a bundle damaged on its way)."""
    bad = []
    for line in (bundle / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = bundle / name.lstrip("*")
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad


def train_figures(run_dir: Path) -> dict:
    """What the run's newest checkpoint sidecar and TensorBoard events say: iterations, costs, the final held-out
    accuracy, the seconds of each phase over the run, the peak memory of each phase (on CUDA)."""
    figures = {}
    sidecars = sorted((run_dir / "checkpoints").glob("iter_*.json"))
    if sidecars:
        sidecar = json.loads(sidecars[-1].read_text())
        figures.update(iterations=sidecar.get("iterations_done"), costs=sidecar.get("costs"))
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    except Exception as error:  # no events yet (an early failure), or no tensorboard: the sidecar's figures only
        figures["tensorboard"] = f"not read: {type(error).__name__}: {error}"
        return figures
    if "val/acc" in scalars:
        figures["val_acc_first"], figures["val_acc_final"] = scalars["val/acc"][0], scalars["val/acc"][-1]
    for prefix, key, reduce in (("time/", "seconds", sum), ("memory/", "memory_gib", max)):  # over the run
        figures[key] = {t[len(prefix) :]: round(reduce(v), 3) for t, v in scalars.items() if t.startswith(prefix)}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="a folder (or .tar) made by scripts/offline_bundle.sh")
    parser.add_argument("--out", help="the JSON (default outputs/gpu_check/<time>/gpu_check.json)")
    parser.add_argument("--total", type=float, default=470, help="overall deadline in seconds (default 470)")
    parser.add_argument("--require-cuda", action="store_true", help="no CUDA GPU is a failure, not a CPU stand-in")
    parser.add_argument("--skip-install", action="store_true", help="check this environment as it is")
    parser.add_argument("--phases-args", default=os.environ.get("PHASES_ARGS", ""), help="gpu_phases.py settings")
    parser.add_argument("--train-args", default=os.environ.get("TRAIN_ARGS", ""), help="more train.py overrides")
    args = parser.parse_args(argv)
    check = Check(args)
    print(f"[gpu-check] {sys.executable}; results: {check.out}")
    if args.skip_install:
        check.results["steps"]["install"] = dict(status="skipped", reason="--skip-install")
    else:
        check.step("install", check.install)
    for name in ("env", "pytest_gpu", "gpu_phases", "train"):
        check.step(name, getattr(check, name))
    check.write()
    results = check.results
    print(f"[gpu-check] gpu: {results.get('gpu')}; torch {results.get('torch')}, CUDA {results.get('cuda')}")
    for name, step in results["steps"].items():
        print(f"  {name:<11} {step['status']:<8} {step.get('seconds', '')}")
    print(f"[gpu-check] {'ok' if results['ok'] else 'FAILED'} in {results['total_seconds']} s; JSON: {check.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
