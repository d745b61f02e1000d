"""π0's evaluation read back from the cache: same numbers, and a key that moves with anything they depend on."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dibs.lit.eval_cache import eval_key, load_eval, save_eval
from dibs.lit.evaluation import EvalPlan, EvalResult
from dibs.rollout.base import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from test_fit import scalars, train  # noqa: E402


class Bench:
    def __init__(self, golds):
        self.name, self.prompts, self.levels = "b", [[1, 2, 3], [4, 5]], ["1"]
        self.problems = [type("P", (), {"gold": g, "level": "1"})() for g in golds]


def plan(golds=("1", "2"), **sampling):
    return EvalPlan([Bench(golds)], 4, (1, 4), SamplingParams(**sampling), 1, 0, True, {})


def test_the_key_moves_with_weights_seed_sampling_golds_and_verifier(tiny_model):
    gen = type("G", (), {"decoder": "loop", "token_budget": 100})()
    verifier = SimpleNamespace(timeout_s=2)
    key = lambda model=tiny_model, p=None, seed=0, v=verifier: eval_key(
        model, p or plan(), generator=gen, verifier=v, seed=seed, device="cpu"
    )
    base = key()
    assert key() == base  # deterministic
    other = type(tiny_model)(tiny_model.config)
    other.load_state_dict(tiny_model.state_dict())
    assert key(other) == base  # the same weights in another object
    with torch.no_grad():
        p = next(other.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))  # one ulp
    assert key(other) != base
    assert key(seed=1) != base
    assert key(p=plan(temperature=0.9)) != base
    assert key(p=plan(golds=("1", "3"))) != base
    assert key(v=SimpleNamespace(timeout_s=3)) != base


def test_saved_results_read_back_and_damaged_files_are_ignored(tmp_path):
    result = EvalResult(4, 0, {"b": {"avg@4": 0.25, "pass@4": 0.5}}, {"avg": 0.25})
    save_eval(tmp_path, "k", result)
    assert load_eval(tmp_path, "k") == result and load_eval(tmp_path, "missing") is None
    (tmp_path / "k.json").write_text("{not json")
    assert load_eval(tmp_path, "k") is None


@pytest.mark.slow
def test_a_run_reads_pi0s_evaluation_back_and_trains_the_same(tmp_path):
    """Three runs on one cache: the first evaluates π0 and keeps it, the second reads it back, the third
    (eval.reuse_pi0=false) evaluates again. Every run logs the same scalars, bit for bit."""
    cache, runs, logs = tmp_path / "cache", [], []
    for name, extra in (("first", []), ("cached", []), ("fresh", ["eval.reuse_pi0=false"])):
        run = tmp_path / name
        proc = train(run, cache, "iterations=1", *extra)
        runs.append(scalars(run))
        logs.append(proc.stdout + proc.stderr)
    assert len(list((cache / "evals").glob("*.json"))) == 1
    assert "evaluation read from" not in logs[0] and "evaluation read from" in logs[1]
    assert "evaluation read from" not in logs[2]
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for tag, values in runs[0].items():
            if not tag.startswith("time/") and tag != "cost/wall_s" and "memory" not in tag:
                assert other[tag] == values, tag
