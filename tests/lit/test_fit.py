"""End-to-end fits of `python train.py` in a subprocess, exactly as a user runs it: one process, 2-process
DDP and 2-process FSDP2 (gloo on CPU). Tiny sizes; the warm start is built once and shared (cache hit)."""

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "iterations=2",
    "prompts_per_iteration=16",
    "batch_size=8",
    "updates_per_iteration=2",
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
]
WARM = ["warmstart.steps=250", "warmstart.eval_every=0", "warmstart.lr=1e-2"]  # a shared, quickly built pi0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train(
    run_dir: Path, cache: Path, *overrides: str, timeout: int = 600, small: list[str] = SMALL
) -> subprocess.CompletedProcess:
    warm = [] if "warmstart=none" in overrides else WARM
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"cache_dir={cache}", *small, *warm, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir / "tb")).Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def runs_by(sweep: Path, *keys: str) -> dict[str, Path]:
    """A multirun's run folders (named by all their overrides, Hydra's override_dirname) by the values of ``keys``:
    ``{"algo=raft,seed=0": <folder>, ...}``."""
    found = {}
    for run in sorted(p for p in sweep.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()):
        overrides = [line[2:] for line in (run / ".hydra" / "overrides.yaml").read_text().splitlines()]
        found[",".join(o for o in overrides for k in keys if o.startswith(f"{k}="))] = run
    return found


def test_single_process_fit_logs_checkpoints_and_summary(tmp_path, cache):
    run = tmp_path / "run"
    proc = train(run, cache)
    out = proc.stdout + proc.stderr
    assert "Held-out Average@2 (pass@2 and maj@2" in out and "pi0" in out
    s = scalars(run)
    for tag in (
        "train/loss",
        "train/grad_norm",
        "rollout/accept_rate",
        "rollout/samples_cum",
        "rollout/tokens_cum",
        "val/acc",
        "time/generation_s",
        "time/verification_s",
        "time/train_s",
        "reward/exact",
    ):
        assert tag in s, f"{tag} missing from TensorBoard"
    assert s["rollout/samples_cum"] == [16 * 8, 2 * 16 * 8]  # every sample counted, cumulative
    assert len(s["val/acc"]) == 3  # pi0 + after each of 2 iterations
    assert sum(s["rollout/accept_rate"]) > 0, "the shared warm start should solve some prompts"
    assert len(s["train/loss"]) == 2 * 2  # fixed number of updates per iteration
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "hf" / "iter_002" / "config.json").exists() and (run / "hf" / "iter_002" / "tokenizer.json").exists()
    assert (run / "resolved_config.yaml").read_text().count("${") == 0  # resolved
    for key in ("avg@2", "pass@1", "pass@2", "maj@2", "problems", "avg@2/level_1", "verifier/no_answer"):
        assert len(s[f"val/embedded/{key}"]) == 3, key
    assert s["val/acc"] == s["val/embedded/avg@2"] and s["val/embedded/problems"] == [24, 24, 24]
    # The standalone evaluation of the last export, with the run's settings, draws the same samples
    report = tmp_path / "eval"
    cmd = [sys.executable, "-m", "dibs.evaluate", f"evaluate.checkpoint={run / 'hf' / 'iter_002'}",
           f"hydra.run.dir={report}", *SMALL]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((report / "eval.json").read_text())["benchmarks"]["embedded"]["scores"]
    for key, value in scores.items():
        assert value == pytest.approx(s[f"val/embedded/{key}"][-1], abs=1e-6), key
    assert re.search(r"^\| embedded +\| +24 +\|", (report / "eval.md").read_text(), re.M)  # problems: 24


def test_evaluation_every_other_iteration_without_pi0(tmp_path, cache):
    run = tmp_path / "run"
    proc = train(run, cache, "iterations=3", "eval.every=2", "eval.before_training=false")
    s = scalars(run)
    assert s["cost/updates"] == [4, 6]  # after iteration 2 (every 2nd) and 3 (the last); pi0 not evaluated
    assert "resuming from" not in proc.stdout + proc.stderr
    # iteration 1 was not evaluated, yet its export holds the policy it trained, not pi0's weights
    from safetensors.torch import load_file

    folder = re.search(r"(?:reusing cached warm start|cached in) (\S+)", proc.stdout + proc.stderr).group(1)
    pi0 = load_file(Path(folder) / "model.safetensors")
    first = load_file(run / "hf" / "iter_001" / "model.safetensors")
    assert set(first) == set(pi0) and any(not (first[k] == pi0[k]).all() for k in first)


def test_second_run_reuses_the_cached_warm_start_and_resumes(tmp_path, cache):
    run = tmp_path / "run"
    train(run, cache, "iterations=1")  # builds the warm start unless an earlier test did
    resumed = train(run, cache, "iterations=2", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    out = resumed.stdout + resumed.stderr
    assert "reusing cached warm start" in out and "resuming" in out
    assert "(pi0)" not in out  # pi0 is evaluated once, by the first run
    s = scalars(run)
    assert s["rollout/samples_cum"] == [16 * 8, 2 * 16 * 8]  # counters carried over through the checkpoint
    assert len(s["train/loss"]) == 2 * 2


@pytest.mark.distributed
@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_two_process_fit(tmp_path, cache, trainer):
    run = tmp_path / "run"
    # an update budget of 3 (2 a step) is reached by iteration 2: both ranks must agree to stop there, or the
    # run would hang in a collective; the cap of 3 iterations is not reached
    proc = train(run, cache, f"trainer={trainer}", "trainer.devices=2", "budget.updates=3", "iterations=3")
    out = proc.stdout + proc.stderr
    assert "Held-out Average@2" in out and "budget reached after iteration 2: 4 updates >= 3" in out
    s = scalars(run)
    assert s["rollout/samples_cum"][0] == 16 * 8  # the global allocation, split over both ranks
    assert s["cost/updates"] == [0, 2, 4] and s["cost/samples"] == [0, 128, 256]
    assert s["val/embedded/problems"] == [24, 24, 24]  # the metric state summed over both ranks' halves
    # the export is the whole policy, gathered from the shards under FSDP2
    from safetensors.torch import load_file

    exported = load_file(run / "hf" / "iter_002" / "model.safetensors")
    assert "model.embed_tokens.weight" in exported and exported["model.embed_tokens.weight"].shape[1] == 64
    assert len(s["train/loss"]) == 2 * 2 and all(v == v for v in s["train/grad_norm"])


def test_sweep_and_iterations_without_accepted_samples(tmp_path, cache):
    # a 2-run Hydra multirun of an untrained policy, which solves nothing: each run warns and goes on
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        f"hydra.sweep.dir={sweep}",
        f"cache_dir={cache}",
        *SMALL,
        "warmstart=none",
        "seed=0,1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    named = runs_by(sweep, "seed")
    assert sorted(named) == ["seed=0", "seed=1"] and all("seed=" in run.name for run in named.values())
    runs = [named["seed=0"], named["seed=1"]]
    logs = [(run / "train.log").read_text() for run in runs]  # each run's own log file
    for log in logs:
        assert log.count("iteration 1: no training sample has a non-zero advantage (0 of 128 accepted)") == 1
        assert "the run continues" in log
    for run in runs:
        assert "train/loss" not in scalars(run)  # no update was made
        assert len(scalars(run)["val/acc"]) == 3  # but every iteration ran and was evaluated
        steps = [e.step for e in EventAccumulator(str(run / "tb")).Reload().Scalars("val/acc")]
        assert steps == sorted(set(steps)), steps  # each iteration at a step of its own, updates or none
        assert (run / "resolved_config.yaml").exists()


BENCHMARKS = REPO.parent / "shared" / "data" / "benchmarks"  # beside the checkout in CI; never copied in


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="benchmark files not found beside the checkout")
def test_a_numina_style_parquet_pool_in_shards_evaluated_on_real_benchmarks(tmp_path, cache):
    # The reference's preparation: the gold is the last \boxed{} of the worked solution, one shard per iteration.
    datasets = pytest.importorskip("datasets")
    from dibs.data.synthetic import make_task

    task = make_task(seed=3, n_train=120, n_test=0)
    rows = [{"problem": p.problem, "solution": p.solution} for p in task.train]
    rows.append({"problem": "2 + 2?", "solution": "4"})  # no \boxed{}: a bad row
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pool.parquet"))
    run = tmp_path / "run"
    proc = train(
        run, cache, "data=jsonl", f"data.source.train_path={tmp_path / 'pool.parquet'}",
        "data.source.answer_key=solution", "data.source.answer_from=boxed", "data.source.on_bad_row=skip",
        "pool_sampling=shards", "prompts_per_iteration=50", "template=qwen25-math-cot",
        "eval.benchmarks=[aime24,amc23]", f"benchmarks.dir={BENCHMARKS}", "max_prompt_tokens=4096",
        "warmstart.steps=20", "warmstart.eval_problems=8",
        small=[o for o in SMALL if not o.startswith(("data.", "+data."))],
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "pool.parquet row 121: field 'solution' has no \\boxed{} answer" in out  # skipped and reported
    assert "pool of 120 prompts: 2 shards of 50 per epoch, 20 prompts dropped per epoch" in out
    s = scalars(run)
    assert s["val/aime24/problems"] == [30, 30, 30] and s["val/amc23/problems"] == [40, 40, 40]
    assert s["val/acc"] == [(a + b) / 2 for a, b in zip(s["val/aime24/avg@2"], s["val/amc23/avg@2"])]
    assert "val/5-average" not in s  # three benchmarks are missing


def test_rollout_vllm_without_vllm_fails_at_start_up_naming_the_extra(tmp_path):
    pytest.importorskip("torch")
    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vllm and a GPU are here: rollout=vllm would run")
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}", "rollout=vllm"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pip install -e .[vllm]" in proc.stderr and "pi0" not in proc.stdout + proc.stderr  # before the warm start


def test_missing_model_path_is_a_clear_error(tmp_path, cache):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}", "model=hf", f"model.path={tmp_path}/nope"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"model.path='{tmp_path}/nope': model folder does not exist" in proc.stdout + proc.stderr


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        f"hydra.run.dir={tmp_path}",
        "data=jsonl",
        f"data.source.train_path={tmp_path}/train.jsonl",
        f"data.source.test_path={tmp_path}/test.jsonl",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"dataset file not found: {tmp_path}/train.jsonl" in proc.stdout + proc.stderr


def test_grid_stops_on_budget_and_reports(tmp_path, cache):
    """A 2-configuration x 2-seed grid of tiny runs, each stopped by a sample budget, then its report."""
    sweep = tmp_path / "grid"
    small = [o for o in SMALL if not o.startswith("iterations=")]
    # 16 prompts x 8 samples = 128 a step: a budget of 200 is spent exactly, iteration 2 cut to the 72 samples
    # left; the cap of 5 iterations is never reached
    cmd = [sys.executable, "train.py", "-m", "+grid=raft_vs_raftpp", "seed=0,1", "budget.samples=200", "iterations=5"]
    cmd += [f"hydra.sweep.dir={sweep}", f"cache_dir={cache}", *small, *WARM]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    named = runs_by(sweep, "algo", "seed")
    assert sorted(named) == ["algo=raft,seed=0", "algo=raft,seed=1", "algo=raftpp,seed=0", "algo=raftpp,seed=1"]
    runs = [run.name for run in named.values()]
    for name in runs:
        s = scalars(sweep / name)
        assert s["cost/samples"] == [0, 128, 200]
        assert s["cost/updates"] == [0, 2, 4] and len(s["val/acc"]) == 3
        assert s["cost/tokens"][-1] == s["rollout/tokens_cum"][-1] > 0
        assert 0 < s["cost/wall_s"][1] < s["cost/wall_s"][2]
        log = (sweep / name / "train.log").read_text()
        assert "budget reached after iteration 2: 200 samples >= 200" in log
        assert "the learning-rate schedule spans 2 iterations" in log  # ceil(200 / 128), not the cap of 5

    report = subprocess.run(
        [sys.executable, "-m", "dibs.report", f"sweep={sweep}", f"out={tmp_path / 'report'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    for section in ("## Final metrics", "## Accuracy at fractions of the budget", "## Cost to reach the target"):
        assert section in text
    for label in ("algo=raft", "algo=raftpp"):  # one row per configuration, 2 seeds
        assert re.search(rf"^\| {label} +\| +2 +\|", text, re.M), label
    for unit in ("samples", "tokens", "updates", "wall_s"):
        png = tmp_path / "report" / f"acc_vs_{unit}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"](acc_vs_{unit}.png)" in text

    # refusals on real output: a folder without runs, and a run whose config differs outside the axes
    empty = subprocess.run(
        [sys.executable, "-m", "dibs.report", f"sweep={tmp_path / 'report'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode == 2 and "no runs found" in empty.stderr and "Traceback" not in empty.stderr
    stray = sweep / "algo=raft,seed=2"
    shutil.copytree(named["algo=raft,seed=0"], stray)
    (stray / ".hydra" / "overrides.yaml").write_text("- algo=raft\n- seed=2\n- +grid=raft_vs_raftpp\n")
    config = (stray / "resolved_config.yaml").read_text()
    (stray / "resolved_config.yaml").write_text(
        config.replace("batch_size: 8", "batch_size: 16").replace("\nseed: 0\n", "\nseed: 2\n")
    )
    mixed = subprocess.run(
        [sys.executable, "-m", "dibs.report", f"sweep={sweep}"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert mixed.returncode == 2 and "not declared axes" in mixed.stderr and "'batch_size'" in mixed.stderr


def test_a_grid_without_multirun_is_refused(tmp_path):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}", "+grid=raft_vs_raftpp"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "launch it with `python train.py -m +grid=...`" in proc.stderr


def test_a_second_run_into_an_occupied_folder_is_refused(tmp_path):
    (tmp_path / "resolved_config.yaml").write_text("seed: 0\n")  # a folder that already holds a run
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"{tmp_path} already holds a run: resume it with ckpt_path=last" in proc.stderr


def test_resuming_a_run_its_budget_stopped_trains_no_further(tmp_path, cache):
    run = tmp_path / "run"
    train(run, cache, "budget.samples=100")  # 128 samples a step, cut to 100: stops after iteration 1 of 2
    resumed = train(run, cache, "budget.samples=100", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert "the run already finished (1 iterations, 2 updates, its budget (100 samples) reached): nothing to do" in (
        resumed.stdout + resumed.stderr
    )
    s = scalars(run)
    assert s["cost/samples"] == [0, 100] and len(s["train/loss"]) == 2  # nothing generated or trained after it


def test_a_reasoning_gym_task_warm_starts_on_answers_and_trains_on_its_own_scorer(tmp_path, cache):
    """data=reasoning_gym end to end: the tiny pi0 is SFT-ed on answers alone (no worked solutions), the E-step
    and the evaluation score with the task's scorer in the verifier's workers, per-level metrics by num_terms."""
    pytest.importorskip("reasoning_gym")
    run = tmp_path / "run"
    gym = [o for o in SMALL if not o.startswith(("data.source.", "+data.source."))]
    gym += [
        "data=reasoning_gym",
        "data.source.tasks=[chain_sum]",
        "data.source.size=300",
        "data.source.test_size=16",
        "data.source.options={chain_sum: {min_terms: 2, max_terms: 3, max_digits: 1}}",
        "data.source.level_from=num_terms",
    ]
    proc = train(run, cache, small=gym)
    out = proc.stdout + proc.stderr
    assert "300 of 300 problems have no worked solution: SFT on the answer alone" in out
    s = scalars(run)
    assert s["val/embedded/problems"] == [16, 16, 16] and {"val/acc_level_2", "val/acc_level_3"} <= set(s)
    statuses = sum(s[f"reward/{k}"][-1] for k in ("exact", "verified", "rejected", "no_answer", "error", "timeout"))
    assert statuses == s["rollout/samples"][-1] == 16 * 8 and s["reward/error"][-1] == 0
    assert sum(s["reward/exact"]) + sum(s["reward/verified"]) > 0, "the answer-only warm start solves some prompts"
    assert sum(s["reward/no_answer"]) < sum(s["rollout/samples"]), "pi0 learned the <answer> format"


def test_per_sample_accounting_gives_equal_updates_for_an_exactly_spent_sample_budget(tmp_path, cache):
    """DAPO's dynamic sampling spends a different number of samples every iteration; under
    update_accounting=per_sample the run still makes budget.samples // samples_per_update updates, and generates
    exactly budget.samples (the last E-step cut to what is left)."""
    run = tmp_path / "run"
    proc = train(
        run,
        cache,
        "allocation=dynamic_sampling",
        "allocation.n_per_prompt=4",
        "allocation.batch_prompts=6",
        "allocation.train_prompts=4",
        "algo=grpo",
        "update_accounting=per_sample",
        "samples_per_update=40",
        "budget.samples=150",
        "iterations=20",
        "eval.every=100",
    )
    s = scalars(run)
    drawn = s["rollout/generated_samples"]
    assert sum(drawn) == 150 == s["cost/samples"][-1] and len(set(drawn)) > 1  # unequal iterations, exact total
    assert s["cost/updates"][-1] == 150 // 40
    cumulative = np.cumsum(drawn)
    made = np.diff(np.concatenate([[0], cumulative // 40]))
    assert s["train/updates_per_iteration"] == made.tolist()
    assert "3 updates in all" in proc.stdout + proc.stderr and 0 in made  # an iteration without an update


@pytest.mark.distributed
@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_gvm_two_process_fit_shares_one_allocation(tmp_path, cache, trainer):
    """Pilot, G_i on the (sharded) training policy, one global allocation checked equal on both ranks."""
    run = tmp_path / "run"
    proc = train(
        run,
        cache,
        f"trainer={trainer}",
        "trainer.devices=2",
        "allocation=gvm",
        "allocation.n_per_prompt=8",
        "allocation.pilot_samples=4",
        # a backward through the (sharded) policy on every rank: the input table under DDP, every parameter
        # (hooks on the FSDP2-wrapped layers) under FSDP2
        f"allocation.grad_param={'all' if trainer == 'fsdp2' else 'embed_tokens'}",
    )
    assert "Held-out Average@2" in proc.stdout + proc.stderr
    s = scalars(run)
    assert s["pilot/samples"] == [16 * 4, 16 * 4]  # N' = 4 for each of the 16 prompts, over both ranks
    assert s["rollout/samples"] == [16 * 8, 16 * 8]  # the training data holds exactly N = 8 x 16
    # everything generated is counted: the pilot plus the fresh stage-2 samples (pilot reused)
    assert s["cost/samples"][1] == s["rollout/generated_samples"][0] == 64 + s["stage2/samples"][0]
    assert 0 <= s["alloc/zero_frac"][0] <= 1 and s["alloc/variance_vs_uniform"][0] <= 1.0 + 1e-6


def test_gvm_with_the_pilot_discarded_and_without_gradient_norms(tmp_path, cache):
    run = tmp_path / "run"
    train(
        run,
        cache,
        "allocation=gvm",
        "allocation.n_per_prompt=8",
        "allocation.pilot_samples=4",
        "allocation.reuse_pilot=false",
        "allocation.grad_param=none",
    )
    s = scalars(run)
    assert s["pilot/samples"] == [64, 64] and s["stage2/samples"] == [128, 128]  # all N drawn afresh
    assert s["rollout/samples"] == [128, 128] and s["cost/samples"] == [0, 192, 384]  # the pilot is paid for
    assert s["alloc/variance_vs_uniform"][0] <= 1.0 + 1e-6


def test_a_round_based_strategy_runs_end_to_end(tmp_path, cache):
    # until_solved: rounds of 2 samples for the prompts not solved yet, at most 8 each; every round counted
    run = tmp_path / "run"
    small = [o for o in SMALL if not o.startswith("allocation.")]
    train(run, cache, "allocation=until_solved", "allocation.per_round=2", "allocation.max_per_prompt=8", small=small)
    s = scalars(run)
    generated = s["rollout/generated_samples"]
    assert len(generated) == 2 and all(32 <= g <= 128 for g in generated)  # 16 prompts: one round to eight
    assert any(g > 32 for g in generated)  # some prompt needed a second round
    assert s["rollout/samples"] == generated  # every sample trains
    assert s["cost/samples"] == [0, generated[0], sum(generated)] and len(s["train/loss"]) == 4


@pytest.mark.parametrize("mode", ["allocation.online=true", "allocation.refresh_every=2"])
def test_gvm_online_and_refresh_modes_pilot_only_what_they_must(tmp_path, cache, mode):
    # a pool of 40 prompts, 16 drawn per iteration: later iterations meet prompts estimated before
    run = tmp_path / "run"
    train(
        run,
        cache,
        "allocation=gvm",
        "allocation.n_per_prompt=8",
        "allocation.pilot_samples=4",
        mode,
        "iterations=3",
        "data.source.n_train=40",
    )
    s = scalars(run)
    assert s["rollout/samples"] == [128, 128, 128]  # N = 8 x 16 whatever the pilot
    pilot = s["pilot/samples"]
    assert pilot[0] == 64 and 0 < pilot[1] < 64  # iteration 1: only prompts never estimated get a pilot
    if "refresh_every" in mode:
        assert pilot[2] == 64  # iteration 2 refreshes every prompt
    else:
        assert pilot[2] < 64  # online: estimates come from earlier training samples
    assert s["cost/samples"][-1] == sum(s["rollout/generated_samples"])  # the pilot is paid for


EMBEDDED = ["embedded_raftpp", "embedded_grpo", "embedded_gvm_raftpp", "embedded_gvm_grpo"]


@pytest.mark.parametrize("preset", EMBEDDED)
def test_embedded_presets_run_end_to_end_at_equal_cost(tmp_path, cache, preset):
    run = tmp_path / "run"
    small = [o for o in SMALL if not o.startswith("allocation.n_per_prompt")]  # the presets' best-of-4
    train(run, cache, f"experiment={preset}", small=small)
    s = scalars(run)
    # every preset generates 4 samples per prompt: 16 x 4 (GVM: a pilot of 2 per prompt, all of it reused)
    assert s["rollout/generated_samples"] == [64, 64] and s["rollout/samples"] == [64, 64]
    assert s["pilot/samples"] == ([32, 32] if "gvm" in preset else [0, 0])
    assert s["rollout/train_samples"] == [64, 64]  # rejected samples kept (A = 0 or negative)
    assert s["train/updates_per_iteration"] == [2, 2] and s["cost/updates"] == [0, 2, 4]
    # recompute_old_logprobs=auto: the HF sampler's log-probs are the CPU trainer's, so nothing recomputes them
    assert "rollout/logprob_gap_max" not in s
    for k, equal in enumerate(s["rollout/equal_reward_samples"]):
        assert s["rollout/equal_reward_frac"][k] == pytest.approx(equal / 64)
        assert 2 * s["rollout/equal_reward_groups"][k] <= equal  # groups of >= 2 (the GVM minimum is 2)
    if "grpo" in preset:
        assert len(s["train/kl"]) == 4 and all(v >= 0 for v in s["train/kl"])
        assert len(s["train/clipfrac_dual"]) == 4  # GRPO's dual clip is on
    else:
        assert "train/kl" not in s


@pytest.mark.parametrize(
    ("allocation", "mini_batch"),
    [
        # uniform best-of-4: batch_size 3 prompts x 4 rows = 12 sequences per update
        (["allocation.n_per_prompt=4", "batch_size=3"], 12),
        # GVM: each sample its own row, batch_size 5 rows per update
        (["allocation=gvm", "allocation.n_per_prompt=4", "allocation.pilot_samples=2", "batch_size=5"], 5),
    ],
    ids=["uniform", "gvm"],
)
def test_reference_accounting_makes_one_pass_over_the_training_samples(tmp_path, cache, allocation, mini_batch):
    run = tmp_path / "run"
    settings = ["update_accounting=reference", "algo.lr_schedule=constant", "algo.filter_equal_groups=true"]
    train(run, cache, "algo=grpo", "iterations=1", *settings, *allocation)
    s = scalars(run)
    (samples,), (equal,), (kept,) = s["rollout/samples"], s["rollout/equal_reward_samples"], s["rollout/train_samples"]
    assert samples == 64 and kept == samples - equal > 0  # the equal-reward groups were dropped
    updates = math.ceil(kept / mini_batch)
    assert s["train/updates_per_iteration"] == [updates] and s["cost/updates"] == [0, updates]
    assert len(s["train/loss"]) == updates


def test_reference_accounting_refuses_a_cosine_schedule(tmp_path):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}", "update_accounting=reference"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "update_accounting=reference makes the number of optimiser updates" in proc.stderr
    assert "algo.lr_schedule=cosine has no known horizon: set algo.lr_schedule=constant" in proc.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_two_process_gvm_grpo_with_micro_batches_and_reference_accounting(tmp_path, cache, trainer):
    """Ranks hold different numbers of samples (GVM gives their prompts different n_i), so they can differ in
    scoring chunks, update rows and micro-batches: the dummy forwards and the sharded KL reference keep the
    collectives in step, or the run would hang."""
    run = tmp_path / "run"
    train(
        run,
        cache,
        f"trainer={trainer}",
        "trainer.devices=2",
        "experiment=embedded_gvm_grpo",
        "algo.micro_batch_size=2",
        "update_accounting=reference",
        "algo.lr_schedule=constant",
        "batch_size=5",
        "algo.recompute_old_logprobs=true",  # the sharded trainer recomputes them, and checks the sampler's
    )
    s = scalars(run)
    assert s["rollout/generated_samples"] == [16 * 8, 16 * 8]  # SMALL's n_per_prompt=8, pilot 2 reused
    updates = [math.ceil(n / (5 * 2)) for n in s["rollout/train_samples"]]  # 5 rows per rank and update
    assert s["train/updates_per_iteration"] == updates and s["cost/updates"][-1] == sum(updates)
    assert max(s["rollout/logprob_gap_max"]) < 1e-3 and all(v == v for v in s["train/grad_norm"])
    assert len(s["train/kl"]) == sum(updates)
