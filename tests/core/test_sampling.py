"""Sampling strategies round by round (dibs.core.sampling), on hand-made tallies: what each asks for, what it
keeps, and GVM's pilot, reuse, refresh and online estimates."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from dibs.core.sampling import (
    GVM,
    DynamicSampling,
    Greso,
    Knapsack,
    PilotCommit,
    ReinforceAda,
    RoundTally,
    Uniform,
    UntilSolved,
    fit_to_budget,
)
from dibs.core.sampling.knapsack import knapsack_allocate, knapsack_value
from dibs.core.sampling.skipping import skip_probability

CONF = Path(__file__).resolve().parents[2] / "conf" / "allocation"


def build(name, **overrides):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    cfg = {k: 0 if v == "${seed}" else v for k, v in cfg.items()}  # the run's seed, outside a run
    cls = {
        "gvm": GVM,
        "uniform": Uniform,
        "until_solved": UntilSolved,
        "knapsack": Knapsack,
        "pilot_commit": PilotCommit,
        "dynamic_sampling": DynamicSampling,
        "reinforce_ada": ReinforceAda,
        "greso": Greso,
    }[name]
    return cls(**{**{k: v for k, v in cfg.items() if k != "_target_"}, **overrides})


def tally(samples, hits, grad=None):
    samples, hits = np.asarray(samples, float), np.asarray(hits, float)
    return RoundTally(samples, hits, hits.copy(), None if grad is None else np.asarray(grad, float))


def test_uniform_is_one_round_of_n_that_all_trains():
    s = build("uniform", n_per_prompt=3)
    first = s.begin(0, np.array([5, 9]))
    assert first.counts.tolist() == [3, 3] and not first.pilot and not first.grad_norms
    assert s.next(tally([3, 3], [1, 0])) is None
    assert [m.tolist() for m in s.keep(0, [np.array([1.0, 0.0, 0.0])])] == [[True, True, True]]
    assert s.max_samples(2) == 6 and s.rows_per_prompt == 3


def test_until_solved_asks_again_only_for_the_unsolved_within_the_cap():
    s = build("until_solved", per_round=2, solved_at=1, max_per_prompt=5)
    assert s.begin(0, np.arange(3)).counts.tolist() == [2, 2, 2]
    second = s.next(tally([2, 2, 2], [1, 0, 0]))  # prompt 0 solved
    assert second.counts.tolist() == [0, 2, 2]
    third = s.next(tally([0, 2, 2], [0, 1, 0]))  # prompt 1 solved; prompt 2 has 4 of 5
    assert third.counts.tolist() == [0, 0, 1]
    assert s.next(tally([0, 0, 1], [0, 0, 0])) is None  # the cap is reached
    assert s.max_samples(3) == 15
    with pytest.raises(ValueError, match="must be >= 1"):
        build("until_solved", per_round=0)


def test_gvm_pilot_then_one_allocated_round_with_reuse():
    # p = [1/2, 1/4, 0], G = [1, 1, 0], N = 4 × 3 = 12, α = 1e-3, β = 2:
    #   w = 1/√0.502 = 1.4114, 1/√0.254 = 1.9842, 0 → x = 5.01, 6.99, 0 → n = [5, 7, 0]
    s = build("gvm", n_per_prompt=4, pilot_samples=4, reuse_pilot=True, min_per_prompt=0, prior=None)
    pilot = s.begin(0, np.array([10, 11, 12]))
    assert pilot.counts.tolist() == [4, 4, 4] and pilot.pilot and pilot.grad_norms
    stage2 = s.next(tally([4, 4, 4], [2, 1, 0], grad=[1.0, 1.0, 0.0]))
    assert stage2.allocation.n.tolist() == [5, 7, 0]
    assert stage2.counts.tolist() == [1, 3, 0]  # min(n_i, N') pilot samples reused, the rest drawn afresh
    assert stage2.estimates.accept_rate.tolist() == [0.5, 0.25, 0.0]
    assert s.next(tally([1, 3, 0], [1, 1, 0])) is None
    pilot_r, fresh_r = np.array([1.0, 0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])
    assert [m.tolist() for m in s.keep(1, [pilot_r, fresh_r])] == [[True] * 4, [True] * 3]
    assert [m.tolist() for m in s.keep(0, [pilot_r, np.array([1.0])])] == [[True, True, True, True], [True]]
    assert [m.tolist() for m in s.keep(2, [np.zeros(4), np.zeros(0)])] == [[False] * 4, []]


def test_gvm_without_reuse_discards_the_pilot():
    s = build("gvm", n_per_prompt=4, pilot_samples=4, reuse_pilot=False, prior=None)
    s.begin(0, np.array([0, 1, 2]))
    stage2 = s.next(tally([4, 4, 4], [2, 1, 0], grad=[1.0, 1.0, 0.0]))
    assert stage2.counts.tolist() == [5, 7, 0]
    assert [m.tolist() for m in s.keep(0, [np.ones(4), np.ones(5)])] == [[False] * 4, [True] * 5]


def test_gvm_refresh_every_pilots_only_unseen_prompts_in_between():
    s = build("gvm", refresh_every=2, pilot_samples=2)
    s.begin(0, np.array([3, 4]))
    s.next(tally([2, 2], [1, 2], grad=[2.0, 1.0]))
    assert s.store == {3: (0.5, 2.0, 2.0), 4: (1.0, 1.0, 2.0)}
    between = s.begin(1, np.array([4, 5]))  # prompt 4 estimated at iteration 0, prompt 5 never
    assert between.counts.tolist() == [0, 2]
    stage2 = s.next(tally([0, 2], [0, 1], grad=[0.0, 3.0]))
    assert stage2.estimates.accept_rate.tolist() == [1.0, 0.5]  # prompt 4's stored estimate
    assert stage2.estimates.grad_norm.tolist() == [1.0, 3.0]
    assert s.begin(2, np.array([4, 5])).counts.tolist() == [2, 2]  # a refresh iteration pilots every prompt


def test_gvm_online_takes_estimates_from_the_training_samples():
    s = build("gvm", online=True, pilot_samples=2)
    assert s.training_grad_norms == 2
    s.begin(0, np.array([7, 8]))
    s.next(tally([2, 2], [1, 0], grad=[1.5, 0.0]))
    s.observe_training(tally([4, 3], [3, 1], grad=[2.5, 0.5]))  # p, G and m from the training samples
    assert s.store == {7: (0.75, 2.5, 4.0), 8: (1 / 3, 0.5, 3.0)}
    assert s.begin(1, np.array([7, 9])).counts.tolist() == [0, 2]  # online: only the unseen prompt is piloted
    state = s.state_dict()
    other = build("gvm", online=True, pilot_samples=2)
    other.load_state_dict(state)
    assert other.store == s.store


def test_fit_to_budget_hand_cases():
    assert fit_to_budget(np.array([4, 1, 3]), 5).tolist() == [2, 1, 2]
    assert fit_to_budget(np.array([4, 4]), 5).tolist() == [3, 2]  # the later prompt gives first among equals
    assert fit_to_budget(np.array([2, 2]), 10).tolist() == [2, 2]
    assert fit_to_budget(np.array([2, 2]), 0).tolist() == [0, 0]


@given(st.lists(st.integers(0, 20), min_size=1, max_size=12), st.integers(0, 200))
def test_fit_to_budget_stays_within_the_request_and_the_budget(counts, remaining):
    counts = np.array(counts)
    out = fit_to_budget(counts, remaining)
    assert (out >= 0).all() and (out <= counts).all()
    assert out.sum() == min(counts.sum(), remaining)
    trimmed = out < counts
    if trimmed.any():  # trimmed from the top: the trimmed prompts end level (within 1), no untrimmed one above them
        assert out[trimmed].max() - out[trimmed].min() <= 1
        assert (counts[~trimmed] <= out[trimmed].max() + 1).all()  # e.g. [3, 3] to 5: [3, 2]


# ---------------------------------------------------------------- the competitors' worked examples


def test_knapsack_worked_examples():
    # p = (.5, .25, 0, 1), B = 16: base 2 each, R = 8; need 3 + 8 = 11 >= 8, no fallback; the 8 largest marginal
    # gains give the p = .5 prompt 3 extra and the p = .25 prompt 5 extra
    p, valid = np.array([0.5, 0.25, 0.0, 1.0]), np.ones(4, dtype=bool)
    for faithful in (False, True):
        options = dict(n_low=2, n_max=128, code_faithful=faithful)
        assert knapsack_allocate(p, valid, 16, n=4, **options).tolist() == [5, 7, 2, 2]
        # p = (.5, .5, 0, 1), B = 32: R = 24, need 3 + 3 = 6, the surplus 18 to the unsolved prompt, 3 + 3 extra
        assert knapsack_allocate(np.array([0.5, 0.5, 0.0, 1.0]), valid, 32, n=8, **options).tolist() == [5, 5, 20, 2]
    assert knapsack_value(5, 0.5) + knapsack_value(7, 0.25) == pytest.approx(0.239033, abs=1e-6)
    # not valid yet: n each; nothing effective and nothing unsolved: uniform
    assert knapsack_allocate(p, np.zeros(4, dtype=bool), 16, n=4, n_low=2, n_max=128, code_faithful=False).tolist() == [
        4,
        4,
        4,
        4,
    ]
    assert knapsack_allocate(np.ones(3), np.ones(3, bool), 12, n=4, n_low=2, n_max=128, code_faithful=False).sum() == 12


def test_knapsack_strategy_estimates_from_earlier_visits():
    s = build("knapsack", n_per_prompt=4, min_history=8, window=16)
    assert s.begin(0, np.array([1, 2])).counts.tolist() == [4, 4]  # first visits: uniform
    s.next(tally([4, 4], [2, 0]))
    assert s.estimate(1) == (0.0, False)  # 4 < min_history samples so far
    s.begin(1, np.array([1, 2]))
    s.next(tally([4, 4], [1, 0]))
    assert s.estimate(1) == (pytest.approx(3 / 8), True) and s.estimate(2) == (0.0, True)
    s.visits[3] = [(20, 5), (10, 10)]  # the last visit drew 10 < 16: its 10 and 6 of the earlier one at 5/20
    assert s.estimate(3) == (pytest.approx((10 + 6 * 0.25) / 16), True)
    counts = s.begin(2, np.array([1, 2])).counts
    assert counts.sum() == 8 and counts[0] > counts[1] == 2  # the unsolved prompt keeps the base only
    other = build("knapsack")
    other.load_state_dict(s.state_dict())
    assert other.visits == s.visits


def test_pilot_commit_worked_example():
    # M = 4, n_p = 4, B = 32; pilot 2/4, 4/4, 0/4, 1/4: A (.5) and D (.25) pass, B is evicted, C deferred
    s = build("pilot_commit", n_per_prompt=8, pilot_samples=4)
    assert s.begin(0, np.array([10, 11, 12, 13])).counts.tolist() == [4, 4, 4, 4]
    commit = s.next(tally([4, 4, 4, 4], [2, 4, 0, 1]))
    assert commit.counts.tolist() == [8, 0, 0, 8]  # (32 - 16) / 2 each: N = (12, 4, 4, 12)
    assert [m.tolist() for m in s.keep(0, [np.ones(4), np.ones(8)])] == [[True] * 4, [True] * 8]
    assert [m.tolist() for m in s.keep(1, [np.ones(4), np.ones(0)])] == [[False] * 4, []]
    assert s.next(tally([8, 0, 0, 8], [4, 0, 0, 2])) is None
    assert s.begin(1, np.array([11, 14])).counts.tolist() == [0, 4]  # the evicted prompt gets no pilot
    # an odd remainder goes to the highest p(1 - p); nothing passing: spread over every prompt, everything trains
    s = build("pilot_commit", n_per_prompt=4, pilot_samples=2)
    s.begin(0, np.arange(3))
    assert s.next(tally([2, 2, 2], [0, 2, 0])).counts.tolist() == [2, 2, 2]
    assert [m.tolist() for m in s.keep(2, [np.ones(2), np.ones(2)])] == [[True, True], [True, True]]


def test_dynamic_sampling_worked_example():
    # batches of 4, 3 groups to keep, n = 4: batch 1 keeps P2 and P4 (1111 and 0000 dropped), batch 2 keeps P5
    # and P7 but only P5 is needed: train on P2, P4, P5; 32 generated, 12 trained
    s = build("dynamic_sampling", n_per_prompt=4, batch_prompts=4, train_prompts=3)
    first = s.begin(0, np.arange(12))
    assert first.counts.tolist() == [4] * 4 + [0] * 8
    second = s.next(tally([4] * 4 + [0] * 8, [4, 1, 0, 3] + [0] * 8))
    assert second.counts.tolist() == [0] * 4 + [4] * 4 + [0] * 4
    assert s.next(tally([0] * 4 + [4] * 4 + [0] * 4, [0] * 4 + [2, 4, 1, 0] + [0] * 4)) is None
    trained = [j for j in range(12) if s.keep(j, [np.ones(4)])[0].all()]
    assert trained == [1, 3, 4]
    # out of prompts: the groups kept so far train
    s.begin(0, np.arange(4))
    assert s.next(tally([4] * 4, [4, 1, 0, 0])) is None
    assert [j for j in range(4) if s.keep(j, [np.ones(4)])[0].all()] == [1]


def test_reinforce_ada_worked_example():
    # accepted per round of 8: A 3; B 8, 7, 8, 6; C 1, 1, 0, 0; D 0, 0, 0, 0 (n = 4, M = 8, R = 4)
    s = build("reinforce_ada", group_size=4, round_samples=8, max_rounds=4, exit="balance")
    drawn = s.begin(0, np.arange(4)).counts
    generated = [int(drawn.sum())]
    for hits in ([3, 8, 1, 0], [0, 7, 1, 0], [0, 8, 0, 0], [0, 6, 0, 0]):
        request = s.next(tally(drawn, np.minimum(hits, drawn)))
        if request is None:
            break
        drawn = request.counts
        generated.append(int(drawn.sum()))
    assert generated == [32, 24, 16, 16]  # 88 in all: A leaves after round 1, C after 2, B after 4, D never
    assert s.baselines().tolist() == pytest.approx([0.375, 29 / 32, 2 / 16, 0.0])
    # the balanced group: the first 2 accepted and first 2 rejected (D: 4 rejected)
    b_rounds = [np.r_[np.ones(8)], np.r_[np.ones(7), 0.0], np.ones(8), np.r_[np.ones(6), 0.0, 0.0]]
    kept = np.concatenate(s.keep(1, b_rounds))
    assert kept.sum() == 4 and np.flatnonzero(kept).tolist() == [0, 1, 15, 30]
    assert np.concatenate(s.keep(3, [np.zeros(8)] * 4)).sum() == 4
    # the positive exit: B leaves after round 1 with 1111, C with 1000
    p = build("reinforce_ada", exit="positive")
    p.begin(0, np.arange(4))
    assert p.next(tally([8, 8, 8, 8], [3, 8, 1, 0])).counts.tolist() == [0, 0, 0, 8]
    assert p.keep(2, [np.r_[1.0, np.zeros(7)]])[0].astype(int).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert p.keep(1, [np.ones(8)])[0].sum() == 4


def test_a_pool_baseline_sets_the_advantages_and_needs_grpo():
    from dibs.core.losses import ALGORITHMS
    from dibs.estep.samples import build_trajectories
    from dibs.estep.step import check_keep_rejected
    from dibs.rollout.base import Completion

    done = Completion(torch.tensor([5]), torch.tensor([-1.0]), "x", "stop")
    samples = [(7, [1], done), (7, [1], done), (9, [2], done)]
    out, _ = build_trajectories(samples, np.array([1.0, 0.0, 1.0]), ALGORITHMS["grpo"].advantages, {7: 29 / 32, 9: 1.0})
    assert [t.advantage for t in out] == pytest.approx([3 / 32, -29 / 32, 0.0])
    with pytest.raises(ValueError, match="needs algo=grpo or drgrpo"):
        check_keep_rejected(ALGORITHMS["raftpp"], True, build("reinforce_ada"))
    check_keep_rejected(ALGORITHMS["drgrpo"], True, build("reinforce_ada"))


def test_greso_worked_example():
    assert skip_probability(["mixed"], 0.5, 0.5) == 0.0  # A: no trailing run
    assert skip_probability(["mixed", "easy", "easy"], 0.5, 0.5) == 0.75  # B: z_e = 2
    assert skip_probability(["mixed", "hard", "hard", "hard"], 0.5, 0.5) == 0.875  # C: z_h = 3
    assert skip_probability(["easy", "hard"], 0.5, 0.5) == 0.5  # D: the last entry decides
    assert skip_probability(["easy"] * 7, 0.5, 0.5) == pytest.approx(0.99)  # the 0.01 floor
    assert skip_probability([], 0.5, 0.5) == 0.0  # new prompts are never skipped
    # self-tuning: 40 of 400 groups all accepted (.10 >= .0833: p_easy down), 60 all rejected (.15 < .1667: up)
    s = build("greso", alpha=0.25, step=0.01, seed=0)
    s._iteration, s._counts = 1, {"easy": 40, "hard": 60, "groups": 400}
    s._tune()
    assert (s.p_easy, s.p_hard) == (pytest.approx(0.49), pytest.approx(0.51))


def test_greso_fills_the_batch_in_rounds_and_skips_predictable_prompts():
    s = build("greso", n_per_prompt=4, batch_prompts=4, min_batch=2, train_prompts=3, seed=0)
    first = s.begin(0, np.arange(10, 20))  # new prompts: none skipped
    assert first.counts.tolist() == [4] * 4 + [0] * 6
    # 1 mixed of 4 (ζ = .75): est = ⌊1.25 · 2 / .25⌋ = 10, capped at batch_prompts = 4
    second = s.next(tally([4] * 4 + [0] * 6, [4, 2, 0, 4] + [0] * 6))
    assert second.counts.tolist() == [0] * 4 + [4] * 4 + [0] * 2
    assert s.next(tally([0] * 4 + [4] * 4 + [0] * 2, [0] * 4 + [1, 3, 2, 0] + [0] * 2)) is None
    assert [j for j in range(10) if s.keep(j, [np.ones(4)])[0].all()] == [1, 4, 5]  # the first 3 mixed groups
    assert s.history[10] == ["easy"] and s.history[12] == ["hard"] and 18 not in s.history
    # prompts all accepted many times are skipped (almost always); fresh ones never
    s.history.update({i: ["easy"] * 7 for i in range(10, 20)})
    assert s.begin(1, np.arange(10, 30)).counts[:10].sum() <= 4 * 2
    other = build("greso")
    other.load_state_dict(s.state_dict())
    assert other.history == s.history and other.p_easy == s.p_easy
