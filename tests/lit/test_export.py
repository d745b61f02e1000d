"""Hugging Face exports (dibs/lit/export.py): which are kept (the pure policy, then the same policy on disk through
kills at every step of a write), and a real run's exports: the folders and the manifest, a plain transformers
``generate()`` that reaches the answer, and the standalone evaluation of a kept export."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import dibs.lit.export as export
from dibs.conf import ROOT, register_resolvers
from dibs.core.verifier import extract_boxed
from dibs.data.synthetic import make_task
from dibs.lit.evaluation import EvalResult
from dibs.lit.export import MANIFEST, ExportOptions, card_facts, export_iteration, model_card, select
from dibs.rollout.base import SamplingParams
from dibs.schema import ConfigError, validate_config
from tests.train_process import run_train

REPO = Path(__file__).resolve().parents[2]
register_resolvers()
NAN = float("nan")


def resolved(*overrides: str) -> dict:
    """The composed config, as train.py sees it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=["run_dir=/tmp/run", *overrides]), resolve=True)


# ---- the policy --------------------------------------------------------------------------------------


def run_policy(options: ExportOptions, iterations: int, accuracy: dict[int, float]) -> tuple[set[int], int | None]:
    """Thin after every export as a run does (the evaluations known so far), like the folders on disk."""
    on_disk: set[int] = set()
    selection = None
    for it in range(1, iterations + 1):
        last = it == iterations
        if options.due(it, last):
            on_disk.add(it)
            known = {i: a for i, a in accuracy.items() if i <= it}
            selection = select(options.exported(it, last), known, options.keep_last)
            on_disk &= set(selection.keep)
    return on_disk, selection.best if selection else None


@pytest.mark.parametrize(
    ("every", "keep_last", "iterations", "accuracy", "kept", "best"),
    [
        (1, 3, 12, {i: i / 100 for i in range(13)}, {10, 11, 12}, 12),  # improving: the newest, best among them
        (1, 2, 6, {1: 0.5, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.1, 6: 0.2}, {1, 5, 6}, 1),  # the best is old: kept
        (1, 1, 5, {2: 0.4, 3: 0.4, 4: 0.1, 5: 0.2}, {2, 5}, 2),  # a tie: the earliest stays best
        (1, 2, 5, {}, {4, 5}, None),  # no evaluation: no best, the newest
        (0, 3, 12, {i: 0.9 if i == 4 else 0.1 for i in range(13)}, {12}, 12),  # every=0: the final one only
        (0, 1, 1, {0: 0.5}, {1}, None),  # pi0's evaluation is no export's
        (5, 1, 12, {3: 1.0, 5: 0.9, 10: 0.1, 12: 0.2}, {5, 12}, 5),  # iteration 3 was evaluated, not exported
        (2, 1, 7, {3: 0.9, 6: 0.5, 7: 0.1}, {6, 7}, 6),  # exports without evaluations cannot be best
        (1, 1, 4, {1: 0.3, 2: 0.1, 3: 0.2, 4: 0.4}, {4}, 4),  # keep_last=1 and the last is best: one folder
        (1, None, 4, {1: 0.3}, {1, 2, 3, 4}, 1),  # keep_last=null: every export
        (1, 1, 3, {1: NAN, 2: 0.0, 3: NAN}, {2, 3}, 2),  # NaN is never best; 0.0 is
        (3, 2, 10, {3: 0.2, 6: 0.1, 9: 0.3, 10: 0.3}, {9, 10}, 9),  # the final iteration, off the every-3 grid
    ],
)
def test_the_policy_keeps_the_newest_the_last_and_the_best(every, keep_last, iterations, accuracy, kept, best):
    options = ExportOptions(every=every, keep_last=keep_last)
    on_disk, chosen = run_policy(options, iterations, accuracy)
    assert (on_disk, chosen) == (kept, best)
    final = select(options.exported(iterations, True), accuracy, keep_last)
    assert (set(final.keep), final.best, final.last) == (kept, best, iterations)  # one decision over the whole run


@settings(max_examples=300, deadline=None)
@given(
    every=st.integers(0, 4),
    keep_last=st.one_of(st.none(), st.integers(1, 4)),
    accuracy=st.lists(st.one_of(st.none(), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, NAN])), min_size=1, max_size=14),
)
def test_thinning_as_the_run_goes_ends_where_one_decision_over_the_whole_run_does(every, keep_last, accuracy):
    """The kept set never needs a folder deleted earlier: thinning after each export ends with the whole run's
    selection, which holds the last, the best of the evaluated exports and the keep_last newest."""
    options, iterations = ExportOptions(every=every, keep_last=keep_last), len(accuracy)
    scores = {i + 1: a for i, a in enumerate(accuracy) if a is not None}
    on_disk, best = run_policy(options, iterations, scores)
    exported = options.exported(iterations, True)
    assert exported[-1] == iterations and all(options.due(i, False) for i in exported[:-1])
    assert on_disk == set(select(exported, scores, keep_last).keep)
    assert iterations in on_disk and set(exported[-(keep_last or len(exported)) :]) <= on_disk
    evaluated = [scores[i] for i in exported if i in scores and not math.isnan(scores[i])]
    assert (best is None) == (not evaluated)
    if evaluated:
        assert best in on_disk and scores[best] == max(evaluated)
        assert best == min(i for i in exported if scores.get(i) == max(evaluated))  # ties: the earliest
    assert len(on_disk) <= (keep_last or len(exported)) + 1


def test_bad_options_name_their_key():
    with pytest.raises(ValueError, match="export.every=-1"):
        ExportOptions(every=-1, keep_last=1)
    with pytest.raises(ValueError, match="export.keep_last=0"):
        ExportOptions(every=1, keep_last=0)
    with pytest.raises(ConfigError, match="export.keep_last=0: input should be greater than or equal to 1"):
        validate_config(resolved("export.keep_last=0"))
    validate_config(resolved("export.keep_last=null", "export.every=0"))


@pytest.mark.parametrize("preset", ["paper_raftpp", "paper_grpo", "paper_gvm_raftpp", "paper_gvm_grpo"])
def test_the_paper_presets_keep_a_handful_of_their_150_iterations(preset):
    config = resolved(f"experiment={preset}")
    options = ExportOptions(**config["export"])
    exported = options.exported(config["iterations"], True)
    assert 1 < len(exported) <= 20  # written
    assert len(select(exported, {i: 0.0 for i in exported}, options.keep_last).keep) <= 4  # on disk at once
    assert set(exported) <= {i for i in range(1, 151) if i % config["eval"]["every"] == 0 or i == 150}  # evaluated


# ---- on disk, through kills -------------------------------------------------------------------------


class Killed(Exception):
    """Stands for SIGKILL: whatever the process was doing stops there."""


def evaluation(iteration: int, accuracy: float) -> EvalResult:
    scores = {"avg@2": accuracy, "pass@1": accuracy, "pass@2": min(1.0, 2 * accuracy), "maj@2": accuracy}
    return EvalResult(samples=2, iteration=iteration, scores={"embedded": scores})


def export_run(hf: Path, model, tokenizer, options, accuracy, iterations, *, start=1, evals=None):
    """What the rollout callback does after each iteration from ``start`` on: evaluate (when ``accuracy`` has
    the iteration), then export. Returns the evaluations, as the checkpoint would hold them."""
    evals = list(evals or [evaluation(0, 0.05)])
    for it in range(start, iterations + 1):
        if it in accuracy:
            evals.append(evaluation(it, accuracy[it]))
        export_iteration(
            model, tokenizer, hf, options, iteration=it, last=it == iterations, global_step=4 * it, seed=0,
            evals=evals, sampling=SamplingParams(max_new_tokens=48), card={"iterations": iterations}, write=True,
        )  # fmt: skip
    return evals


def listing(hf: Path) -> tuple[list[str], dict]:
    return sorted(p.name for p in hf.iterdir()), json.loads((hf / MANIFEST).read_text())


ACCURACY = {1: 0.2, 2: 0.5, 3: 0.1, 4: 0.3, 5: 0.4, 6: 0.2}  # the best (2) is old by the end
OPTIONS = ExportOptions(every=1, keep_last=2)


@pytest.fixture()
def uninterrupted(tmp_path_factory, tokenizer, tiny_model):
    hf = tmp_path_factory.mktemp("uninterrupted") / "hf"
    export_run(hf, tiny_model, tokenizer, OPTIONS, ACCURACY, 6)
    return listing(hf)


def test_the_folders_on_disk_and_the_manifest(uninterrupted):
    names, manifest = uninterrupted
    assert names == [MANIFEST, "iter_002", "iter_005", "iter_006"]  # best, then keep_last=2 newest
    assert manifest["best"] == "iter_002" and manifest["last"] == "iter_006" and manifest["pi0"] == {"val/acc": 0.05}
    assert [(e["iteration"], e["global_step"], e["val/acc"], e["best"], e["last"]) for e in manifest["exports"]] == [
        (2, 8, 0.5, True, False),
        (5, 20, 0.4, False, False),
        (6, 24, 0.2, False, True),
    ]


# (what a kill interrupts, on which of its calls in that iteration's export, whether that call did its work first,
# the iteration)
KILLS = {
    "while the folder is written": ("export_policy", 1, True, 4),  # weights written, no card yet
    "after the rename, before the manifest": ("thin", 1, False, 4),
    "after the manifest, while deleting": ("rmtree", 4, False, 5),  # publish clears leftovers in calls 1-3
    "after the last export, before its checkpoint": ("thin", 1, True, 6),
}


@pytest.mark.parametrize("moment", list(KILLS))
def test_a_kill_at_any_step_of_an_export_then_a_resume_keeps_the_same_folders(
    moment, tmp_path, tokenizer, tiny_model, monkeypatch, uninterrupted
):
    name, call, works, at = KILLS[moment]
    hf, calls = tmp_path / "hf", []
    owner = export.shutil if name == "rmtree" else export
    original = getattr(owner, name)

    def killed(*args, **kwargs):
        calls.append(name)
        if len(calls) == call:
            if works:
                original(*args, **kwargs)
            raise Killed
        return original(*args, **kwargs)

    checkpointed = export_run(hf, tiny_model, tokenizer, OPTIONS, ACCURACY, at - 1)  # what iteration at-1 saved
    monkeypatch.setattr(owner, name, killed)
    with pytest.raises(Killed):
        export_run(hf, tiny_model, tokenizer, OPTIONS, ACCURACY, 6, start=at, evals=checkpointed)
    monkeypatch.undo()
    looks_complete = [p for p in hf.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert all((p / "README.md").is_file() and (p / "model.safetensors").is_file() for p in looks_complete)
    names, manifest = listing(hf)
    if moment == "while the folder is written":
        assert ".iter_004.partial" in names and "iter_004" not in names and manifest["last"] == "iter_003"
    elif moment == "after the rename, before the manifest":
        assert "iter_004" in names and manifest["last"] == "iter_003"
    elif moment == "after the manifest, while deleting":  # iteration 5 drops iteration 3 (keep_last=2, best 2)
        assert "iter_003" in names and manifest["last"] == "iter_005"
    # resumed from the checkpoint of iteration at-1 (saved after its export), iteration at is exported again
    export_run(hf, tiny_model, tokenizer, OPTIONS, ACCURACY, 6, start=at, evals=checkpointed)
    assert listing(hf) == uninterrupted


def test_an_export_of_an_iteration_already_on_disk_replaces_it(tmp_path, tokenizer, tiny_model):
    hf = tmp_path / "hf"
    export_run(hf, tiny_model, tokenizer, ExportOptions(every=1, keep_last=None), {}, 2)
    (hf / "iter_002" / "stale").write_text("from an earlier life")
    export_run(hf, tiny_model, tokenizer, ExportOptions(every=1, keep_last=None), {}, 2, start=2)
    assert not (hf / "iter_002" / "stale").exists() and sorted(p.name for p in hf.iterdir()) == [
        MANIFEST,
        "iter_001",
        "iter_002",
    ]


def test_a_run_extended_or_resumed_under_other_settings_keeps_its_best_and_newest_exports(
    tmp_path, tokenizer, tiny_model
):
    """Exports on disk that the current settings would not have made (a former final export, one made under another
    export.every) stay while they are the best or among the newest."""
    hf = tmp_path / "hf"
    accuracy = {1: 0.1, 2: 0.2, 3: 0.6, 4: 0.3, 5: 0.3, 6: 0.4, 7: 0.2}
    evals = export_run(hf, tiny_model, tokenizer, ExportOptions(every=2, keep_last=2), accuracy, 3)
    assert listing(hf)[0] == [MANIFEST, "iter_002", "iter_003"]  # iter_003: the final export, also the best
    export_run(hf, tiny_model, tokenizer, ExportOptions(every=2, keep_last=2), accuracy, 7, start=4, evals=evals)
    names, manifest = listing(hf)
    assert names == [MANIFEST, "iter_003", "iter_006", "iter_007"] and manifest["best"] == "iter_003"
    hf2 = tmp_path / "hf2"
    evals = export_run(hf2, tiny_model, tokenizer, ExportOptions(every=1, keep_last=None), accuracy, 3)
    export_run(hf2, tiny_model, tokenizer, ExportOptions(every=3, keep_last=None), accuracy, 6, start=4, evals=evals)
    assert listing(hf2)[0] == [MANIFEST, "iter_001", "iter_002", "iter_003", "iter_006"]  # keep_last null: all


def test_other_ranks_gather_and_write_nothing(tmp_path, tokenizer, tiny_model):
    hf = tmp_path / "hf"
    folder = export_iteration(
        tiny_model, tokenizer, hf, OPTIONS, iteration=1, last=True, global_step=4, seed=0, evals=[],
        sampling=SamplingParams(), card={}, write=False,
    )  # fmt: skip
    assert folder is None and not hf.exists()


def test_the_model_card_says_what_trained_it_its_scores_and_its_prompt():
    config = resolved("experiment=paper_raftpp", "model.path=/models/base", "data.source.train_path=/data/pool.jsonl")
    overrides = ["experiment=paper_raftpp", "model.path=/models/base", "eval.pass_k=[1,8]", "ckpt_path=last"]
    choices = {"algo": "raftpp", "allocation": "uniform", "data": "jsonl", "template": "paper", "reward": "math_verify"}
    facts = card_facts(config, overrides, choices)
    assert json.loads(json.dumps(facts)) == facts  # plain values
    evals = [evaluation(0, 0.125), evaluation(10, 0.25)]
    card = model_card(facts, iteration=10, global_step=40, evals=evals, sampling=SamplingParams(max_new_tokens=3072))
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    for text in (
        "# dibs policy after iteration 10 of 150",
        "algorithm `raftpp`",
        "`uniform` (8 samples per prompt)",
        "40 optimiser updates",
        "`/models/base`",
        "train_path=/data/pool.jsonl",
        "dibs-train experiment=paper_raftpp model.path=/models/base 'eval.pass_k=[1,8]'`",  # quoted for a shell
        "`val/acc` = 25.0 (pi0: 12.5)",
        "| embedded | iteration 10 | 25.0 | 25.0 | 50.0 | 25.0 |",
        "| embedded | pi0 | 12.5 | 12.5 | 25.0 | 12.5 |",
        "Template `paper`",
        "Please reason step by step, and put your final answer within \\\\boxed{}.",  # the repr of the prompt
        "up to 3072 new tokens",
        "python -m dibs.evaluate evaluate.checkpoint=path/to/iter_010 experiment=paper_raftpp",
    ):
        assert text in card, text
    assert "ckpt_path=last" not in card
    grid = card_facts(config, ["+grid=smoke", "algo=raft", "logger=mlflow", "+logger.mlflow.tracking_uri=x"], choices)
    grid_card = model_card(grid, iteration=10, global_step=40, evals=evals, sampling=SamplingParams())
    assert "`dibs-train -m +grid=smoke algo=raft`" in grid_card and "mlflow" not in grid_card  # a grid launches with -m
    unevaluated = model_card(facts, iteration=11, global_step=44, evals=evals, sampling=SamplingParams())
    assert "Iteration 11 was not evaluated" in unevaluated and "| embedded |" not in unevaluated


# ---- a real run ------------------------------------------------------------------------------------

FIT = [
    "experiment=smoke",
    "iterations=3",
    "prompts_per_iteration=16",
    "export.every=1",
    "export.keep_last=1",
    "warmstart.steps=150",  # a quicker pi0 than smoke's; its responses still end with a boxed answer
    "warmstart.batch_size=16",
    "warmstart.lr=1e-2",
    "rollout.generator.show_progress=false",
    "+trainer.enable_progress_bar=false",
]


def launch(run: Path, cache: Path, *extra: str, kill_after: str | None = None) -> str:
    """``train.py`` into ``run``; with ``kill_after``, SIGKILL it as soon as that text appears in its output."""
    code, out = run_train([f"hydra.run.dir={run}", f"cache_dir={cache}", *FIT, *extra], kill_after=kill_after)
    assert code == (-signal.SIGKILL if kill_after else 0), out[-5000:]
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def fit(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("fit") / "run"
    launch(run, cache)
    return run


def val_acc(run: Path) -> list[float]:
    return [e.value for e in EventAccumulator(str(run / "tb")).Reload().Scalars("val/acc")]


def test_a_run_keeps_the_last_and_the_best_export_with_a_manifest(fit):
    logged = val_acc(fit)  # pi0, then after each of the 3 iterations
    assert len(logged) == 4
    expected = select(ExportOptions(1, 1).exported(3, True), dict(enumerate(logged)), keep_last=1)
    names, manifest = listing(fit / "hf")
    assert names == [MANIFEST, *(f"iter_{i:03d}" for i in expected.keep)] and len(expected.keep) <= 2
    assert manifest["last"] == "iter_003" and manifest["best"] == f"iter_{expected.best:03d}"
    assert manifest["pi0"]["val/acc"] == pytest.approx(logged[0])
    for entry in manifest["exports"]:
        i = entry["iteration"]
        assert entry["global_step"] == 4 * i and entry["val/acc"] == pytest.approx(logged[i])  # smoke: 4 updates each
        folder = fit / "hf" / entry["folder"]
        for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
            assert (folder / name).is_file(), name
        assert json.loads((folder / "dibs_export.json").read_text())["iteration"] == i
        card = (folder / "README.md").read_text()
        pi0 = manifest["pi0"]["val/acc"]
        assert f"`val/acc` = {100 * entry['val/acc']:.1f} (pi0: {100 * pi0:.1f})" in card
        assert "experiment=smoke iterations=3 prompts_per_iteration=16" in card  # the run's overrides
        assert "make_task` (seed=0, n_train=500" in card


def test_a_plain_generate_on_an_export_samples_like_the_run_and_reaches_the_answer(fit):
    folder = fit / "hf" / "iter_003"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = GenerationConfig.from_pretrained(folder)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 1.0, 1.0, 0)  # rollout.sampling
    assert config.max_new_tokens == 64 and config.eos_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    for problem in make_task(seed=0, n_train=500, n_test=40).test[:5]:
        messages = [{"role": "user", "content": problem.problem}]  # template=none: the problem alone
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs)  # no generation argument at all
        response = output[0, inputs["input_ids"].shape[1] :]
        text = tokenizer.decode(response, skip_special_tokens=True)
        assert len(output[0]) > 20  # past transformers' default max_length, which ends before the prompt does
        assert response[-1] == tokenizer.eos_token_id, f"cut before its end: {text!r}"
        assert extract_boxed(text) is not None, f"no boxed answer the verifier reads: {text!r}"


def test_the_standalone_evaluation_of_a_kept_export_repeats_its_logged_score(fit, tmp_path):
    manifest = json.loads((fit / "hf" / MANIFEST).read_text())
    entry = next(e for e in manifest["exports"] if e["best"]) if manifest["best"] else manifest["exports"][0]
    cmd = [sys.executable, "-m", "dibs.evaluate", f"evaluate.checkpoint={fit / 'hf' / entry['folder']}",
           f"hydra.run.dir={tmp_path}", *FIT]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["iteration"] == entry["iteration"] and report["accuracy"] == pytest.approx(entry["val/acc"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["iteration 2: evaluation", "exported"])
def test_a_killed_run_resumed_keeps_the_exports_of_the_uninterrupted_one(fit, cache, tmp_path, moment):
    run = tmp_path / "run"
    kill = moment if moment != "exported" else f"exported {run / 'hf' / 'iter_002'}"
    launch(run, cache, kill_after=kill)
    launch(run, cache, "ckpt_path=last")
    assert listing(run / "hf") == listing(fit / "hf")
