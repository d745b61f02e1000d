"""The E-step in-process (dibs.estep.step), without a Trainer: the tests' tiny Qwen2 samples through the real HF
generator, and a reward rule that accepts a sample whose token count is even stands in for the answer check, so
that acceptance is spread over prompts the way an allocation needs. The sequence is checked round by round:
pilot, allocation, second round, reuse, online estimates, rounds until solved and the iteration's sample cap."""

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dibs.core.losses import ALGORITHMS
from dibs.core.sampling import GVM, GradSettings, Request, RoundTally, Uniform, UntilSolved
from dibs.core.verifier import VerifyResult
from dibs.data.prompts import PromptTemplate, encode_prompts
from dibs.estep.dist import Dist
from dibs.estep.gradnorms import GradNormMeter
from dibs.estep.samples import IterationPrompts
from dibs.estep.step import EStep
from dibs.rollout.base import SamplingParams
from dibs.rollout.hf import HFGenerator

CONF = Path(__file__).resolve().parents[2] / "conf" / "allocation"
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=6)


class EvenLength:
    """A reward (the verifier's interface): 1 when the response text has an even number of characters."""

    def __init__(self):
        self.calls = 0

    def score(self, completions, golds):
        self.calls += 1
        rewards = np.array([float(len(c) % 2 == 0) for c in completions], dtype=np.float32)
        return VerifyResult(rewards, tuple("exact" if r else "rejected" for r in rewards))


def gvm(**overrides):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "gvm.yaml"))
    return GVM(**{**{k: v for k, v in cfg.items() if k != "_target_"}, **overrides})


@pytest.fixture()
def prompts(task, tokenizer):
    _, ids, _ = encode_prompts(task.train[:6], tokenizer, PromptTemplate(None, "", ""), max_prompt_tokens=256)
    return IterationPrompts(pool=np.arange(100, 106), token_ids=ids, answers=["1"] * 6)


def e_step(strategy, tiny_model, tokenizer, reward=None, **kw):
    generator = HFGenerator(tiny_model, tokenizer, token_budget=32768, show_progress=False)
    meter = None
    if strategy.grad is not None:
        meter = GradNormMeter(
            strategy.grad,
            policy=tiny_model,
            dist=Dist(),
            token_budget=4096,
            pad_id=tokenizer.pad_token_id,
            generator=generator,
        )
    options = dict(algorithm=ALGORITHMS["raftpp"], sampling=SAMPLING, keep_rejected=True, filter_equal_groups=False)
    return EStep(
        generator, reward or EvenLength(), strategy, seed=3, dist=Dist(), grad_norms=meter, **{**options, **kw}
    )


def kept_ids(result):
    return [c.token_ids.tolist() for _, c in result.samples]


def test_gvm_pilot_allocation_and_second_round_with_reuse(tiny_model, tokenizer, prompts):
    strategy = gvm(n_per_prompt=4, pilot_samples=3, reuse_pilot=True)
    result = e_step(strategy, tiny_model, tokenizer).run(0, prompts)
    pilot, second = result.rounds
    assert pilot.request.pilot and pilot.counts.tolist() == [3] * 6
    assert [len(g) for g in pilot.completions] == [3] * 6
    a = result.allocation
    assert a.n.sum() == 24 and a is second.request.allocation  # N = 4 x 6 prompts, exactly
    # the estimates are the pilot's: p = accepted / 3, G = the mean over accepted samples (0 where none)
    hits = np.array([float((r > 0.5).sum()) for r in pilot.rewards])
    assert result.estimates.accept_rate.tolist() == pytest.approx((hits / 3).tolist())
    assert ((result.estimates.grad_norm > 0) == (hits > 0)).all()
    reused = np.minimum(a.n, 3)
    assert second.counts.tolist() == (a.n - reused).tolist()  # only what the pilot did not provide
    # every prompt trains on its first min(n_i, 3) pilot samples, then the second round's, in that order
    expected = []
    for j in range(6):
        expected += [c.token_ids.tolist() for c in pilot.completions[j][: reused[j]]]
        expected += [c.token_ids.tolist() for c in second.completions[j]]
    assert kept_ids(result) == expected and len(result.training) == 24
    m = result.metrics
    assert m["pilot/samples"] == 18 and m["stage2/samples"] == int(second.counts.sum())
    assert m["rollout/generated_samples"] == 18 + int(second.counts.sum()) and m["rollout/samples"] == 24
    assert 0 <= m["alloc/gini"] < 1 and m["alloc/realised_accept"] == pytest.approx(
        float(sum((r > 0.5).sum() for r in second.rewards)) / max(second.counts.sum(), 1)
    )


def test_gvm_without_reuse_trains_on_the_second_round_only(tiny_model, tokenizer, prompts):
    result = e_step(gvm(n_per_prompt=4, pilot_samples=3, reuse_pilot=False), tiny_model, tokenizer).run(0, prompts)
    pilot, second = result.rounds
    assert second.counts.tolist() == result.allocation.n.tolist()
    assert kept_ids(result) == [c.token_ids.tolist() for g in second.completions for c in g]
    assert result.metrics["rollout/generated_samples"] == 18 + 24


def test_g_from_the_generator_equals_g_on_the_policy(tiny_model, tokenizer, prompts):
    # lm_head's closed form from the generator's log-prob pass against the policy's own measurement
    a = e_step(gvm(pilot_samples=3, grad_in_generator=True), tiny_model, tokenizer).run(0, prompts)
    b = e_step(gvm(pilot_samples=3, grad_in_generator=False), tiny_model, tokenizer).run(0, prompts)
    assert kept_ids(a) == kept_ids(b)  # the same seed draws the same samples
    assert a.metrics["time/grad_norms_s"] == 0.0 < b.metrics["time/grad_norms_s"]
    np.testing.assert_allclose(a.estimates.grad_norm, b.estimates.grad_norm, rtol=1e-4)


def test_grad_eos_false_leaves_the_final_eos_out(tiny_model, tokenizer, prompts):
    generator = HFGenerator(tiny_model, tokenizer, token_budget=32768, show_progress=False)
    torch.manual_seed(0)
    groups = generator.generate(prompts.token_ids, [4] * 6, SamplingParams(temperature=1.0, max_new_tokens=30))
    stopped = [[c for c in g if c.finish_reason == "stop" and len(c.token_ids) > 1] for g in groups]
    assert sum(map(len, stopped)) > 0
    settings = dict(param="lm_head", reduction="sum", in_generator=False)
    meter = dict(policy=tiny_model, dist=Dist(), token_budget=4096, pad_id=tokenizer.pad_token_id, generator=None)
    with_eos = GradNormMeter(GradSettings(**settings, eos=True), **meter).per_prompt(prompts.token_ids, stopped)
    without = GradNormMeter(GradSettings(**settings, eos=False), **meter).per_prompt(prompts.token_ids, stopped)
    trimmed = [[replace(c, token_ids=c.token_ids[:-1]) for c in g] for g in stopped]
    by_hand = GradNormMeter(GradSettings(**settings, eos=True), **meter).per_prompt(prompts.token_ids, trimmed)
    np.testing.assert_allclose(without, by_hand, rtol=1e-5)
    solved = np.array([len(g) > 0 for g in stopped])
    assert not np.allclose(with_eos[solved], without[solved])
    assert not GradNormMeter(GradSettings(**settings, eos=False), **{**meter, "generator": True}).from_generator


def test_online_estimates_come_from_the_training_samples_and_skip_the_pilot(tiny_model, tokenizer, prompts):
    strategy = gvm(n_per_prompt=4, pilot_samples=2, online=True, reuse_pilot=True)
    step = e_step(strategy, tiny_model, tokenizer)
    first = step.run(0, prompts)
    for i in prompts.pool:  # each prompt's stored p is its training samples' acceptance
        rewards = [r for (k, _), r in zip(first.samples, first.rewards) if k == i]
        if not rewards:  # given no sample: it keeps its pilot's estimate
            assert strategy.store[int(i)][2] == 2
            continue
        assert strategy.store[int(i)][0] == pytest.approx(np.mean(np.array(rewards) > 0.5))
        assert strategy.store[int(i)][2] == len(rewards)
    first_store = dict(strategy.store)
    # the next iteration meets prompts 103..105 again and three new ones: only the new ones get a pilot
    again = IterationPrompts(np.array([103, 104, 105, 200, 201, 202]), prompts.token_ids, prompts.answers)
    second = step.run(1, again)
    assert second.rounds[0].counts.tolist() == [0, 0, 0, 2, 2, 2]
    stored = [strategy_p for strategy_p, _, _ in (first_store[i] for i in (103, 104, 105))]
    assert second.estimates.accept_rate[:3].tolist() == pytest.approx(stored)


def test_until_solved_draws_rounds_and_counts_every_one(tiny_model, tokenizer, prompts):
    strategy = UntilSolved(per_round=1, solved_at=1, max_per_prompt=4)
    result = e_step(strategy, tiny_model, tokenizer).run(0, prompts)
    assert len(result.rounds) >= 2
    drawn = sum(r.counts for r in result.rounds)
    hits_before = np.zeros(6)
    for r in result.rounds:  # a prompt is asked again only while unsolved and under its cap
        asked = r.counts > 0
        assert not (asked & (hits_before >= 1)).any()
        hits_before += np.array([float((x > 0.5).sum()) for x in r.rewards])
    assert (drawn <= 4).all() and ((hits_before >= 1) | (drawn == 4)).all()
    assert result.metrics["rollout/generated_samples"] == drawn.sum() == len(result.samples)


@dataclass
class Greedy:
    """Asks for 5 more samples per prompt every round and never stops by itself."""

    rows_per_prompt: int = 1
    grad: None = None
    training_grad_norms: int = 0
    pool_baseline: bool = False
    rounds: list = field(default_factory=list)

    def max_samples(self, num_prompts):
        return 2 * num_prompts

    def begin(self, iteration, pool):
        return Request(np.full(len(pool), 5))

    def next(self, tally: RoundTally):
        self.rounds.append(tally.samples.copy())
        return Request(np.full(len(tally.samples), 5))

    def keep(self, prompt, rewards):
        return [np.ones(len(r), dtype=bool) for r in rewards]

    def observe_training(self, tally):
        pass


def test_the_iteration_stops_at_the_strategys_sample_cap(tiny_model, tokenizer, prompts):
    strategy = Greedy()
    result = e_step(strategy, tiny_model, tokenizer).run(0, prompts)
    assert len(result.rounds) == 1 and result.rounds[0].counts.tolist() == [2] * 6  # 30 asked, trimmed to 12
    assert result.metrics["rollout/generated_samples"] == 12
    assert [r.tolist() for r in strategy.rounds] == [[2] * 6]  # the trimmed round is shown, its next request dropped


def test_uniform_is_one_round_and_the_same_samples_for_the_same_seed(tiny_model, tokenizer, prompts):
    a = e_step(Uniform(n_per_prompt=2), tiny_model, tokenizer).run(4, prompts)
    b = e_step(Uniform(n_per_prompt=2), tiny_model, tokenizer).run(4, prompts)
    assert len(a.rounds) == 1 and a.allocation is None and kept_ids(a) == kept_ids(b)
    assert "alloc/gini" not in a.metrics and a.metrics["pilot/samples"] == 0


@dataclass
class Stuck(Greedy):
    """Asks for nothing, round after round."""

    def begin(self, iteration, pool):
        return Request(np.zeros(len(pool), dtype=np.int64))

    def next(self, tally):
        return Request(np.zeros(len(tally.samples), dtype=np.int64))


def test_a_strategy_that_asks_for_nothing_twice_is_stopped(tiny_model, tokenizer, prompts):
    with pytest.raises(RuntimeError, match="Stuck asked for no sample twice in a row"):
        e_step(Stuck(), tiny_model, tokenizer).run(0, prompts)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_shipped_strategy_runs_two_e_steps_within_its_samples(name, tiny_model, tokenizer, prompts):
    strategy = instantiate(
        OmegaConf.create({"seed": 0, "allocation": OmegaConf.load(CONF / f"{name}.yaml")}).allocation
    )
    algorithm = ALGORITHMS["grpo" if strategy.pool_baseline else "raftpp"]  # a pool baseline needs GRPO's loss
    step = e_step(strategy, tiny_model, tokenizer, algorithm=algorithm)
    for iteration in (0, 1):  # the second meets the same prompts: strategies with memory use it
        result = step.run(iteration, prompts)
        generated = result.metrics["rollout/generated_samples"]
        assert 0 < generated <= strategy.max_samples(6)
        assert generated == sum(int(r.counts.sum()) for r in result.rounds)
        assert result.metrics["rollout/samples"] == len(result.samples) <= generated
        assert result.metrics["pilot/samples"] + result.metrics["stage2/samples"] == generated


@pytest.mark.parametrize("limit", [1, 7, 13])
@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_shipped_strategy_stops_at_a_budget_limit_cut_mid_round(name, limit, tiny_model, tokenizer, prompts):
    """What is left of a sample budget cuts the E-step wherever it falls (inside a pilot or a later round)."""
    strategy = instantiate(
        OmegaConf.create({"seed": 0, "allocation": OmegaConf.load(CONF / f"{name}.yaml")}).allocation
    )
    algorithm = ALGORITHMS["grpo" if strategy.pool_baseline else "raftpp"]
    step = e_step(strategy, tiny_model, tokenizer, algorithm=algorithm)
    step.run(0, prompts)  # strategies with memory meet the prompts again under the limit
    result = step.run(1, prompts, limit=limit)
    assert result.metrics["rollout/generated_samples"] == sum(int(r.counts.sum()) for r in result.rounds) == limit
    assert result.metrics["rollout/samples"] == len(result.samples) <= limit


def test_every_round_reaches_the_strategy_the_one_that_spends_the_cap_included(tiny_model, tokenizer, prompts):
    """Knapsack-RL's only round always spends its cap (B = n x prompts): its visit history must still grow, so
    that a prompt seen often enough is allocated by the knapsack, not uniformly."""
    strategy = instantiate(OmegaConf.load(CONF / "knapsack.yaml"))  # min_history 8: valid from the third visit
    step = e_step(strategy, tiny_model, tokenizer, algorithm=ALGORITHMS["grpo"])
    counts = [step.run(iteration, prompts).rounds[0].counts.tolist() for iteration in range(3)]
    assert all(sum(c) == strategy.max_samples(6) for c in counts)
    assert counts[0] == counts[1] == [4] * 6  # first and second visits: fewer than 8 samples of history each
    assert all(sum(m for m, _ in strategy.visits[100 + j]) == 8 + counts[2][j] for j in range(6))  # every visit
    assert counts[2] != [4] * 6  # the knapsack's own counts on the third visit


def test_dynamic_sampling_keeps_the_groups_of_the_round_that_spends_its_cap(tiny_model, tokenizer, prompts):
    from dibs.core.sampling import DynamicSampling

    # one batch of all 6 prompts spends the cap at once: its unequal groups must still train
    strategy = DynamicSampling(n_per_prompt=4, batch_prompts=6, train_prompts=6)
    result = e_step(strategy, tiny_model, tokenizer, algorithm=ALGORITHMS["grpo"]).run(0, prompts)
    unequal = [0 < int(h) < int(m) for m, h in zip(result.rounds[0].tally.samples, result.rounds[0].tally.hits)]
    assert any(unequal) and strategy._kept.tolist() == unequal
    assert result.metrics["rollout/samples"] == 4 * sum(unequal)
