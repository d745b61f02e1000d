"""Sweeps through Hydra's launchers: joblib's local parallel runs with a share of the cores each, submitit's local
executor, the SLURM preset's batch script, and a grid resumed with ``ckpt_path=last`` under joblib.

The runs are tiny (no warm start, 1 iteration of 8 prompts) and share one cache; every run of train.py is a
subprocess, as a user launches it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dibs.launch import available_cpus, launcher_share, resolve_threads

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "iterations=1",
    "prompts_per_iteration=8",
    "batch_size=4",
    "updates_per_iteration=1",
    "eval.samples=1",
    "eval.pass_k=[1]",
    "data.source.n_train=100",
    "data.source.n_test=8",
    "model.tiny.hidden_size=32",
    "rollout.sampling.max_new_tokens=8",
    "eval.sampling.max_new_tokens=8",
    "rollout.generator.show_progress=false",
    "+trainer.enable_progress_bar=false",
    "allocation.n_per_prompt=2",
    "warmstart=none",
]
JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", re.M)
THREADS = re.compile(r"torch threads: (\d+) \((.*)\)")
ITER = re.compile(r"iter_(\d+)(-update_\d+)?\.ckpt$")

JOBLIB_2 = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}
SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."


@pytest.mark.parametrize(
    ("setting", "launcher", "cpus", "default", "expected"),
    [
        ("auto", None, 16, 16, 16),  # a single run or the basic launcher: torch's default
        ("auto", {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 16, 16, 16),
        ("auto", JOBLIB_2, 2, 2, 1),  # two runs on two cores: one thread each
        ("auto", JOBLIB_2, 16, 16, 8),
        ("auto", {**JOBLIB_2, "n_jobs": 3}, 2, 2, 1),  # never below one
        ("auto", {**JOBLIB_2, "n_jobs": -1}, 16, 16, 1),  # joblib's -1: a run per core
        ("auto", {**JOBLIB_2, "n_jobs": -2}, 16, 16, 1),  # all cores but one: 15 runs
        ("auto", {**JOBLIB_2, "n_jobs": 1}, 16, 16, 16),  # one at a time
        ("auto", JOBLIB_2, 16, 2, 2),  # OMP_NUM_THREADS=2 by hand: never raised
        ("auto", {"_target_": SUBMITIT + "SlurmLauncher", "cpus_per_task": 8}, 64, 64, 8),
        ("auto", {"_target_": SUBMITIT + "LocalLauncher", "cpus_per_task": 1}, 2, 2, 1),
        ("auto", {"_target_": SUBMITIT + "SlurmLauncher", "cpus_per_task": None}, 64, 64, 64),
        (3, JOBLIB_2, 2, 2, 3),  # a number is taken as it is
        (1, None, 16, 16, 1),
    ],
)
def test_threads_resolve_to_a_share_of_the_cores(setting, launcher, cpus, default, expected):
    assert resolve_threads(setting, launcher=launcher, cpus=cpus, default=default)[0] == expected


def test_threads_say_why_and_refuse_nonsense():
    assert resolve_threads("auto", launcher=JOBLIB_2, cpus=2, default=2) == (
        1,
        "threads=auto: joblib launcher, n_jobs=2 on 2 CPUs",
    )
    assert launcher_share(None, 8) is None
    for bad in (0, -1, "four", True):
        with pytest.raises(ValueError, match="auto or a number"):
            resolve_threads(bad, launcher=None, cpus=2, default=2)


@pytest.mark.parametrize(("value", "error"), [("auto", None), (2, None), (0, "threads: 0 is neither"), ("x", "'x'")])
def test_the_schema_checks_threads(value, error):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dibs.conf import ROOT, register_resolvers
    from dibs.schema import ConfigError, validate_config

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(
            compose("config", overrides=["run_dir=/tmp/run", f"threads={value}"]), resolve=True
        )
    if error is None:
        validate_config(cfg)
    else:
        with pytest.raises(ConfigError, match=re.escape(error)):
            validate_config(cfg)


def test_the_verifier_scores_in_a_joblib_worker():
    """loky makes its own start method the default in its workers; the verifier's forkserver workers, told to use
    it, die at start and math-verify never answers. set_up_process's reset_start_method puts the default back."""
    from joblib import Parallel, delayed

    def score() -> tuple[str | None, tuple[str, ...]]:
        from dibs.core.verifier import MathVerifier
        from dibs.launch import reset_start_method

        replaced = reset_start_method()
        with MathVerifier(num_workers=1, timeout_s=2, hard_timeout_s=5.0, max_answer_chars=256) as verifier:
            return replaced, verifier.score(["so \\boxed{\\frac{1}{2}}"], ["0.5"]).status  # not an exact match

    results = Parallel(n_jobs=2, timeout=120)(delayed(score)() for _ in range(2))
    assert [status for _, status in results] == [("verified",)] * 2
    assert "loky" in {replaced for replaced, _ in results}  # a worker reused by the second job was already reset


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def threads_logged(log: str) -> list[tuple[int, str]]:
    return [(int(n), why) for n, why in THREADS.findall(log)]


def span(log: str) -> tuple[datetime, datetime]:
    stamps = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in STAMP.findall(log)]
    return stamps[0], stamps[-1]


def test_submitit_local_runs_a_sweep_and_writes_its_outputs(tmp_path, cache):
    """One run through submitit's local executor (first: it builds the shared cache alone)."""
    sweep = tmp_path / "sweep"
    cpus = available_cpus()
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
    train(*args, f"hydra.sweep.dir={sweep}", f"cache_dir={cache}", "seed=0", *TINY, env={"OMP_NUM_THREADS": str(cpus)})
    runs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1
    run = runs[0]  # under submitit every override names the run (the job does not see the launching command)
    assert "- seed=0" in (run / ".hydra" / "overrides.yaml").read_text()
    for path in ("resolved_config.yaml", "checkpoints/last.ckpt", "checkpoints/iter_001.ckpt", ".hydra/config.yaml"):
        assert (run / path).exists(), path
    assert list((run / "tb").glob("events.out.tfevents.*")) and (run / "hf" / "iter_001").is_dir()
    log = (run / "train.log").read_text()
    assert threads_logged(log) == [(1, "threads=auto: submitit launcher, cpus_per_task=1")]
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in log
    job_logs = list((sweep / ".submitit").glob("*/*_0_log.out"))  # submitit's own log of the job
    assert len(job_logs) == 1 and list((sweep / ".submitit").glob("*/*_0_result.pkl"))


@pytest.fixture(scope="module")
def joblib_grid(tmp_path_factory, cache):
    """Two tiny runs side by side under joblib, OMP_NUM_THREADS set to every core as if nothing limited torch:
    each run must bring itself down to its share."""
    sweep = tmp_path_factory.mktemp("joblib") / "sweep"
    cpus = available_cpus()
    train(
        "-m",
        *JOBLIB,
        f"hydra.sweep.dir={sweep}",
        f"cache_dir={cache}",
        "seed=0,1",
        *TINY,
        env={"OMP_NUM_THREADS": str(cpus)},
    )
    return sweep, cpus


def run_folders(sweep: Path) -> dict[str, str]:
    """seed=<n> -> the name of the run folder that ran it (named by all its overrides: Hydra's override_dirname)."""
    found = {}
    for run in sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (run / ".hydra" / "overrides.yaml").is_file():  # a job starting: its folder comes first
            continue
        seed = next(o for o in OmegaConf.load(run / ".hydra" / "overrides.yaml") if o.startswith("seed="))
        found[seed] = run.name
    return found


def seed_dir(sweep: Path, seed: int) -> Path:
    """The folder of the run with seed=<seed> (a path that does not exist yet while its job has not started)."""
    return sweep / run_folders(sweep).get(f"seed={seed}", f"not-started-seed={seed}") if sweep.is_dir() else sweep


def test_a_joblib_grid_runs_side_by_side_with_a_share_of_the_cores_each(joblib_grid):
    sweep, cpus = joblib_grid
    folders = run_folders(sweep)
    assert sorted(folders) == ["seed=0", "seed=1"] and len(set(folders.values())) == 2
    runs = [folders["seed=0"], folders["seed=1"]]
    share = max(1, cpus // 2)  # 1 on two cores
    logs = [(sweep / run / "train.log").read_text() for run in runs]
    for run, log in zip(runs, logs):
        assert threads_logged(log) == [(share, f"threads=auto: joblib launcher, n_jobs=2 on {cpus} CPUs")], log
        assert "`Trainer.fit` stopped: `max_epochs=1` reached." in log
        assert (sweep / run / "checkpoints" / "last.ckpt").exists()
    (a0, a1), (b0, b1) = span(logs[0]), span(logs[1])
    assert a0 < b1 and b0 < a1, "the two runs did not overlap in time"  # side by side, not one after the other


def test_a_finished_joblib_grid_relaunched_with_ckpt_path_last_is_left_as_it_is(joblib_grid, cache):
    """The resume command under joblib finds every run in its own folder (the same names as at the first launch)
    and, all of them finished, trains nothing; the slow test below kills a grid and resumes it."""
    sweep, _ = joblib_grid
    files = [p for p in sweep.glob("*/**/*") if p.is_file() and ".hydra" not in p.parts]  # Hydra's own aside
    before = {p: p.stat().st_mtime_ns for p in files}
    folders = run_folders(sweep)
    proc = train("-m", *JOBLIB, f"hydra.sweep.dir={sweep}", f"cache_dir={cache}", "seed=0,1", *TINY, "ckpt_path=last")
    assert run_folders(sweep) == folders  # no new folder: ckpt_path is not part of run names
    for run in folders.values():
        assert f"{sweep / run / 'checkpoints' / 'last.ckpt'}: the run already finished (1 iterations" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # not a checkpoint, log or event file touched


@pytest.mark.parametrize(
    ("overrides", "flags"),
    [
        (["trainer=gpu"], ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=8"]),
        (["trainer=gpu_fsdp2", "trainer.devices=4"], ["--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4"]),
        (["trainer=multinode", "trainer.num_nodes=2"], ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"]),
    ],
)
def test_the_slurm_preset_asks_for_one_task_per_device(tmp_path, overrides, flags):
    """hydra/launcher=slurm up to sbatch: a stand-in sbatch keeps the batch script submitit wrote and fails, as
    there is no cluster here."""
    bin_dir, script = tmp_path / "bin", tmp_path / "job.sbatch"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "sbatch: no cluster here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that srun exists
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    cmd += ["hydra.launcher.partition=gpu", "seed=0,1", "ckpt_path=last", *overrides]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert "sbatch: no cluster here" in proc.stderr, proc.stderr[-3000:]
    text = script.read_text()
    sbatch = set(re.findall(r"^#SBATCH (\S+)$", text, re.M))
    for flag in [*flags, "--time=1440", "--partition=gpu", "--array=0-1%2"]:  # one job per run, as an array
        assert flag in sbatch, (flag, sorted(sbatch))
    assert "srun --unbuffered" in text and "-m submitit.core._submit" in text  # one process per task


@pytest.mark.slow
def test_a_joblib_grid_killed_mid_run_resumes_every_run_where_it_stood(tmp_path, cache):
    """The whole process group of a joblib grid killed with SIGKILL once both runs hold a checkpoint, then the
    same command plus ckpt_path=last: each run resumes from its own last checkpoint and finishes."""
    sweep = tmp_path / "sweep"
    args = [*JOBLIB, f"hydra.sweep.dir={sweep}", f"cache_dir={cache}", "seed=0,1", *TINY, "iterations=12"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    output = (tmp_path / "killed.out").open("w")
    proc = subprocess.Popen(
        [sys.executable, "train.py", "-m", *args],
        cwd=REPO,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the joblib workers die with it
    )

    def done(seed: int) -> int:  # the newest iteration checkpointed (older ones are removed: checkpoint.keep)
        found = [
            int(m[1]) for p in (seed_dir(sweep, seed) / "checkpoints").glob("iter_*.ckpt") if (m := ITER.match(p.name))
        ]
        return max(found, default=0)

    try:
        deadline = time.monotonic() + 240
        while min(done(0), done(1)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the grid ended by itself
            pass
        proc.wait()
        output.close()
    assert min(done(0), done(1)) >= 2, (tmp_path / "killed.out").read_text()[-5000:]
    assert not any((seed_dir(sweep, s) / "checkpoints" / "iter_012.ckpt").exists() for s in (0, 1))  # mid-run
    train("-m", *args, "ckpt_path=last", timeout=600)
    for run in run_folders(sweep).values():
        log = (sweep / run / "train.log").read_text()
        assert re.search(rf"resuming {re.escape(str(sweep / run))} from iter_0\d\d(-update_\d+)?\.ckpt", log), log
        assert "`Trainer.fit` stopped: `max_epochs=12` reached." in log
        assert (sweep / run / "checkpoints" / "iter_012.ckpt").exists()
