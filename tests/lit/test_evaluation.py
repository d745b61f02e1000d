"""evaluate(): a scripted generator (the boundary) with the real verifier, so every number is hand-checkable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dibs.core.verifier import MathVerifier
from dibs.data.benchmarks import Benchmark
from dibs.data.records import Problem
from dibs.lit.evaluation import EvalPlan, EvalResult, eval_seed, evaluate, format_summary, val_metrics
from dibs.rollout.base import Completion, SamplingParams

REWARD = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/reward/math_verify.yaml"))
REWARD.pop("_target_")


class ScriptedGenerator:
    """Stand-in for a generation backend: replies to prompt i with ``replies[i]`` (must be n long)."""

    def __init__(self, replies: dict[int, list[str]]):
        self.replies, self.calls = replies, []

    def generate(self, prompts, n_per_prompt, sampling):
        self.calls.append(list(n_per_prompt))
        out = []
        for prompt, n in zip(prompts, n_per_prompt):
            texts = self.replies[prompt[0]]
            assert len(texts) == n
            out.append([Completion(torch.tensor([1]), torch.tensor([-1.0]), t, "stop") for t in texts])
        return out


def bench(name: str, golds: list[str], levels: list[str]) -> Benchmark:
    problems = [Problem(f"{name}:{i}", f"q{i}", g, lv) for i, (g, lv) in enumerate(zip(golds, levels))]
    return Benchmark(name, problems, [[i] for i in range(len(golds))], sorted(set(levels)))


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(**REWARD)
    yield v
    v.close()


def b(x: str) -> str:
    return f"so \\boxed{{{x}}}"


def test_average_pass_and_majority_by_hand(verifier):
    math = bench("math", ["4", "\\frac{1}{2}", "7"], ["1", "1", "2"])
    generator = ScriptedGenerator(
        {
            0: [b("4"), b("4"), b("5"), "no box"],  # 2 of 4 right; "4" has 2 votes -> maj 1
            1: [b("0.5"), b("3"), b("3"), b("2")],  # 1 right ("0.5" == 1/2 by math-verify); "3" wins -> maj 0
            2: [b("7"), b("8"), "none", "none"],  # 1 right; "7" and "8" tie -> maj 1/2
        }
    )
    result = evaluate(generator, verifier, [math], samples=4, pass_k=[1, 2], sampling=SamplingParams(), averages={})
    s = result.scores["math"]
    assert s["avg@4"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)  # = 1/3
    assert s["pass@1"] == pytest.approx(s["avg@4"])  # pass@1 is the mean success rate
    # pass@2 = 1 - C(4-c, 2)/C(4, 2): c=2 -> 1 - 1/6, c=1 -> 1 - 3/6 (twice)
    assert s["pass@2"] == pytest.approx((5 / 6 + 1 / 2 + 1 / 2) / 3)
    assert s["maj@4"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert s["avg@4/level_1"] == pytest.approx((2 / 4 + 1 / 4) / 2) and s["maj@4/level_2"] == pytest.approx(0.5)
    assert (s["problems"], s["verifier/no_answer"], s["verifier/exact"]) == (3, 3, 3)
    assert result.accuracy == pytest.approx(1 / 3) and result.iteration == 0


def test_several_benchmarks_their_average_and_the_logged_tags(verifier):
    one = bench("a", ["1"], [""])
    generator = ScriptedGenerator({0: [b("1"), b("2")]})
    averages = {"both": ["a", "b"], "three": ["a", "b", "c"]}
    result = evaluate(
        generator, verifier, [one, bench("b", ["2"], [""])], samples=2, pass_k=[2], sampling=SamplingParams(),
        averages=averages, iteration=3,
    )  # fmt: skip
    # both benchmarks hold prompt [0] answered "1" then "2": a scores 1/2, b scores 1/2
    assert result.averages == {"both": pytest.approx(0.5)}  # "three" lacks c: left out
    tags = val_metrics(result)
    assert tags["val/a/avg@2"] == tags["val/acc"] == tags["val/both"] == pytest.approx(0.5)
    assert tags["val/b/pass@2"] == 1.0 and not any("level" in t for t in tags)  # no levels: no level tags


def test_a_rank_without_problems_still_reports_its_benchmarks(verifier):
    # rank 1 of 2 on a one-problem benchmark gets no problem: it generates nothing and its state is empty
    generator = ScriptedGenerator({})
    result = evaluate(
        generator, verifier, [bench("a", ["1"], [""])], samples=2, pass_k=[1], sampling=SamplingParams(),
        averages={}, rank=1, world_size=2,
    )  # fmt: skip
    assert generator.calls == [] and result.scores["a"]["problems"] == 0


def test_summary_table_lists_benchmarks_levels_and_averages():
    first = EvalResult(2, 0, {"a": {"avg@2": 0.25, "pass@2": 0.5, "maj@2": 0.25, "avg@2/level_1": 0.0}}, {"x": 0.25})
    last = EvalResult(2, 4, {"a": {"avg@2": 0.5, "pass@2": 0.75, "maj@2": 0.5, "avg@2/level_1": 0.5}}, {"x": 0.5})
    text = format_summary(first, last, where={"tensorboard": "tb"})
    rows = [line.split() for line in text.splitlines()]
    assert text.startswith("Held-out Average@2 (pass@2 and maj@2 of the final policy)\n")
    assert ["benchmark", "pi0", "final", "change", "pass@2", "maj@2"] in rows
    assert ["a", "25.0%", "50.0%", "+25.0", "75.0%", "50.0%"] in rows
    assert ["level", "1", "0.0%", "50.0%", "+50.0", "nan%", "nan%"] in rows  # the level's pass@2/maj@2 not given
    assert ["x", "25.0%", "50.0%", "+25.0"] in rows  # a suite average: no pass@k or maj@k
    assert ["tensorboard:", "tb"] in rows


def test_the_plan_evaluates_every_nth_iteration_and_the_last():
    settings = dict(benchmarks=[], samples=4, pass_k=[1, 4], sampling=SamplingParams(), before_training=True)
    settings.update(averages={}, every_samples=0)
    plan = EvalPlan(**settings, every=3)
    assert [i for i in range(1, 8) if plan.due(i, last=i == 7)] == [3, 6, 7]
    with pytest.raises(ValueError, match="eval.every=0"):
        EvalPlan(**settings, every=0)
    with pytest.raises(ValueError, match=r"eval.pass_k=\[1, 8\] must be distinct values in \[1, eval.samples=4\]"):
        EvalPlan(**{**settings, "pass_k": [1, 8]}, every=1)
    assert len({eval_seed(1, 0), eval_seed(1, 1), eval_seed(2, 1), eval_seed(1, 1, rank=1)}) == 4


def test_the_plan_by_samples_evaluates_where_a_multiple_is_crossed():
    settings = dict(benchmarks=[], samples=4, pass_k=[1], sampling=SamplingParams(), before_training=True)
    plan = EvalPlan(**settings, averages={}, every=1, every_samples=100)
    spent = [0, 60, 130, 190, 340, 360]  # cumulative generated samples after each iteration
    due = [i for i in range(1, 6) if plan.due(i, last=i == 5, samples=(spent[i - 1], spent[i]))]
    assert due == [2, 4, 5]  # 130 crosses 100; 340 crosses 200 and 300 (one evaluation); 360 is the last
    with pytest.raises(ValueError, match="eval.every_samples=-1 must be >= 0"):
        EvalPlan(**settings, averages={}, every=1, every_samples=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_per_phase_on_a_gpu():
    from dibs.lit.logs import peak_memory

    device = torch.device("cuda")
    block = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB
    first = peak_memory(device, "e_step")
    del block
    second = peak_memory(device, "m_step")  # the peak was reset: this phase allocated nothing
    assert first["memory/e_step_peak_gib"] >= 0.25 > second["memory/m_step_peak_gib"]
    assert peak_memory(torch.device("cpu"), "eval") == {}
