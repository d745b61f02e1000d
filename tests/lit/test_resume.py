"""Runs that survive: `python train.py` killed with SIGKILL at a chosen moment, then resumed with `ckpt_path=last`,
must end exactly where an uninterrupted run of the same config and seed ends (weights, every val/* and cost/*
scalar, the number of TensorBoard points of every tag); a finished run resumed does nothing; bad settings fail
in seconds, naming the key."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.train_process import run_train

REPO = Path(__file__).resolve().parents[2]
CONFIG = [
    "iterations=3",
    "prompts_per_iteration=16",
    "batch_size=8",
    "updates_per_iteration=4",
    "checkpoint.every_updates=2",
    "eval.samples=2",
    "eval.pass_k=[1,2]",
    "data.source.n_train=300",
    "data.source.n_test=24",
    "+data.source.level_weights=[3,1,1,0,0]",
    "model.tiny.hidden_size=64",
    "rollout.sampling.max_new_tokens=24",
    "eval.sampling.max_new_tokens=24",
    "rollout.generator.show_progress=false",
    "+trainer.enable_progress_bar=false",
    "allocation.n_per_prompt=8",
    "warmstart.steps=250",
    "warmstart.eval_every=0",
    "warmstart.lr=1e-2",
]


def launch(run: Path, cache: Path, *extra: str, kill_after: str | None = None, timeout: float = 600) -> str:
    """Run train.py into ``run``; with ``kill_after``, SIGKILL it as soon as that text appears in its output."""
    args = [f"hydra.run.dir={run}", f"cache_dir={cache}", *CONFIG, *extra]
    code, out = run_train(args, kill_after=kill_after, timeout=timeout)
    if kill_after is None:
        assert code == 0, f"train.py failed:\n{out[-6000:]}"
    else:
        assert code == -signal.SIGKILL, f"train.py ended ({code}) before '{kill_after}':\n{out[-4000:]}"
        _wait_for_children(run)
    return out


def _wait_for_children(run: Path, limit: float = 60) -> None:
    """The other ranks of a killed multi-process run exit once their peer is gone."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        if f"hydra.run.dir={run}" not in ps:
            return
        time.sleep(0.5)
    raise AssertionError("a rank of the killed run is still running")


def points(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_run(resumed: Path, reference: Path) -> None:
    got, want = points(resumed), points(reference)
    assert set(got) == set(want)
    counts = {tag: (len(got[tag]), len(want[tag])) for tag in want if len(got[tag]) != len(want[tag])}
    assert not counts, f"TensorBoard points per tag differ (resumed, uninterrupted): {counts}"
    for tag in want:  # wall seconds are measured, not computed: the only cost that may differ
        if tag.startswith(("val/", "cost/", "rollout/", "train/")) and tag != "cost/wall_s":
            assert got[tag] == want[tag], tag
    last = sorted(p.name for p in (reference / "hf").iterdir())[-1]
    a, b = (load_file(run / "hf" / last / "model.safetensors") for run in (resumed, reference))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a), "final weights differ"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("reference") / "run"
    launch(run, cache)
    return run


@pytest.mark.parametrize(
    "moment",
    [
        "iteration 2: E-step",  # generation (and verification) of iteration 2's samples
        "checkpoint iter_002-update_002.ckpt saved",  # the M-step of iteration 2, after its mid-iteration save
        "iteration 2: evaluation",  # the held-out evaluation after iteration 2
    ],
)
def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result(tmp_path, cache, reference, moment):
    run = tmp_path / "run"
    launch(run, cache, kill_after=moment)
    out = launch(run, cache, "ckpt_path=last")
    assert "resuming" in out and "pi0: evaluation" not in out and "iteration 1: E-step" not in out
    if "E-step" not in moment:  # iteration 2's E-step was finished and checkpointed: never generated again
        assert "iteration 2: E-step" not in out
    assert_same_run(run, reference)
    kept = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))  # checkpoint.keep=2, its earlier life's too
    assert kept == ["iter_003-update_002.ckpt", "iter_003.ckpt", "last.ckpt"]


def test_a_killed_online_gvm_run_resumes_with_its_stored_estimates(tmp_path, cache):
    # GVM online keeps per-prompt estimates across iterations (the strategy's state, in the checkpoint): a resumed
    # run that lost them would pilot prompts it has met before, and draw other samples
    gvm = ["allocation=gvm", "allocation.pilot_samples=2", "allocation.online=true", "data.source.n_train=40"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    launch(reference, cache, *gvm)
    launch(run, cache, *gvm, kill_after="checkpoint iter_002-update_002.ckpt saved")
    out = launch(run, cache, *gvm, "ckpt_path=last")
    assert "resuming" in out and "iteration 2: E-step" not in out
    assert_same_run(run, reference)
    pilot = [v for _, v in points(run)["pilot/samples"]]
    assert pilot[0] == 2 * 16 and pilot[-1] < 2 * 16  # iteration 3 met prompts estimated before: fewer pilots


@pytest.mark.distributed
def test_a_killed_two_process_fsdp2_run_resumes_to_the_uninterrupted_result(tmp_path, cache):
    fsdp2 = ["trainer=fsdp2", "trainer.devices=2"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    launch(reference, cache, *fsdp2)
    launch(run, cache, *fsdp2, kill_after="checkpoint iter_002-update_002.ckpt saved")
    assert (run / "checkpoints" / "last.ckpt" / ".metadata").exists()  # a distributed checkpoint, verified on load
    out = launch(run, cache, *fsdp2, "ckpt_path=last")
    assert "resuming" in out and "iteration 2: E-step" not in out
    assert_same_run(run, reference)


def test_a_run_killed_twice_with_checkpoints_between_iterations_only(tmp_path, cache, reference):
    # the default cadence: after the first E-step and after every iteration; the second life resumes from the
    # first-E-step checkpoint, the third from the end of iteration 1, which the second life wrote
    run, every = tmp_path / "run", "checkpoint.every_updates=0"
    launch(run, cache, every, kill_after="iteration 1: M-step")
    launch(run, cache, every, "ckpt_path=last", kill_after="checkpoint iter_001.ckpt saved")
    out = launch(run, cache, every, "ckpt_path=last")
    assert "iteration 1: E-step" not in out and "iteration 2: E-step" not in out
    assert_same_run(run, reference)
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == [
        "iter_002.ckpt",
        "iter_003.ckpt",
        "last.ckpt",
    ]


def test_a_budget_run_killed_in_its_last_iteration_finishes_it(tmp_path, cache):
    # 128 samples an iteration against a budget of 100: the budget stops the run after iteration 1, and a kill
    # during that iteration's M-step must not be taken for the end of the run
    reference, run = tmp_path / "reference", tmp_path / "run"
    launch(reference, cache, "budget.samples=100")
    launch(run, cache, "budget.samples=100", kill_after="iteration 1: M-step")
    out = launch(run, cache, "budget.samples=100", "ckpt_path=last")
    assert "nothing to do" not in out and "budget reached after iteration 1" in out
    assert_same_run(run, reference)


def test_resuming_with_other_settings_is_refused_naming_them(tmp_path, cache, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run}", f"cache_dir={cache}", *CONFIG, "ckpt_path=last"]
    proc = subprocess.run([*cmd, "algo=raft", "seed=3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "holds a run with other settings" in proc.stderr
    assert "algo.loss='raftpp' in the run, 'raft' now" in proc.stderr and "seed=0 in the run, 3 now" in proc.stderr


def test_a_run_killed_before_its_first_checkpoint_starts_over_in_its_folder(tmp_path, cache, reference):
    run = tmp_path / "run"
    launch(run, cache, kill_after="iteration 1: E-step")
    assert not (run / "checkpoints" / "last.ckpt").exists()
    out = launch(run, cache, "ckpt_path=last")
    assert "holds no checkpoint yet: starting the run over" in out
    assert_same_run(run, reference)


def test_resuming_a_finished_run_generates_and_writes_nothing(tmp_path, cache, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run, symlinks=True)
    kept = ("tb", "checkpoints", "hf", "resolved_config.yaml")

    def snapshot():
        files = [p for name in kept for p in ([run / name] if (run / name).is_file() else (run / name).rglob("*"))]
        return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in files}

    before = snapshot()
    started = time.monotonic()
    out = launch(run, cache, "ckpt_path=last")
    assert "the run already finished (3 iterations, 12 updates, iterations=3 reached): nothing to do" in out
    assert "E-step" not in out and "evaluation" not in out and "pi0" not in out
    assert snapshot() == before
    assert time.monotonic() - started < 30


def test_a_checkpoint_path_that_does_not_exist_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={tmp_path / 'nope.ckpt'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"ckpt_path={tmp_path / 'nope.ckpt'}: no such checkpoint" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["allocation.n_per_prompt=0"], "allocation.n_per_prompt=0"),
        (["allocation.n_per_prompt=-1"], "allocation.n_per_prompt=-1"),
        (["prompts_per_iteration=0"], "prompts_per_iteration=0"),
        (["iterations=two"], "iterations='two'"),
        (["experiment=smoke", "warmstart=none"], "warmstart.steps=200"),
        (["rollout.sampling.temperature=0"], "rollout.sampling.temperature=0"),
        (["eval.pass_k=[1,8]"], "eval.pass_k=[1, 8]"),
        (["checkpoint.keep=0"], "checkpoint.keep=0"),
    ],
)
def test_a_bad_setting_fails_in_seconds_on_a_fresh_cache_naming_the_key(tmp_path, overrides, named):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    started = time.monotonic()
    proc = subprocess.run([*cmd, *overrides], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0 and f"config error: {named}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert not (tmp_path / "cache").exists()  # nothing was built
