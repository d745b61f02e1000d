"""The E-step's advantages by prompt group and the choice of training samples (dibs.estep.samples)."""

import math

import numpy as np
import pytest
import torch

from dibs.core.losses import ALGORITHMS
from dibs.core.sampling import Uniform
from dibs.estep.dist import Dist
from dibs.estep.samples import build_trajectories, select_training
from dibs.estep.step import EStep
from dibs.rollout.base import Completion, SamplingParams

PROMPTS = {7: torch.tensor([1, 2]), 3: torch.tensor([3]), 11: torch.tensor([4, 5, 6]), 2: torch.tensor([7])}


def samples(groups):
    """(train-pool index, prompt ids, completion); completion k has k + 1 tokens and log-probs −(k + 1)."""
    out = []
    for k, i in enumerate(groups):
        ids = torch.arange(10, 11 + k)
        out.append((i, PROMPTS[i], Completion(ids, torch.full((k + 1,), -(k + 1.0)), f"s{k}", "stop")))
    return out


def build(groups, rewards, loss):
    return build_trajectories(samples(groups), rewards, ALGORITHMS[loss].advantages)


# A GVM allocation gave the prompts 3, 2, 1 and 4 samples, interleaved as the E-step may hold them:
#   prompt 7: r = [1, 0, 0]   mean 1/3, unbiased std sqrt(1/3) = 0.57735
#   prompt 3: r = [1, 1]      equal rewards            prompt 11: r = [0]   a group of one: A = r = 0
#   prompt 2: r = [0, 0, 0, 0] equal rewards
GROUPS = [7, 3, 7, 2, 2, 7, 3, 11, 2, 2]
REWARDS = np.array([1, 1, 0, 0, 0, 0, 1, 0, 0, 0], dtype=np.float32)
S = math.sqrt(1 / 3) + 1e-6


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        ("grpo", [2 / 3 / S, 0, -1 / 3 / S, 0, 0, -1 / 3 / S, 0, 0, 0, 0]),  # 1.1547, −0.57735
        ("drgrpo", [2 / 3, 0, -1 / 3, 0, 0, -1 / 3, 0, 0, 0, 0]),
        ("raftpp", [1, 1, 0, 0, 0, 0, 1, 0, 0, 0]),  # A = max(r, 0), groups ignored
        ("raft", [1, 1, 0, 0, 0, 0, 1, 0, 0, 0]),
    ],
)
def test_advantages_of_variable_size_groups_reach_the_trajectories(loss, expected):
    trajectories, equal = build(GROUPS, REWARDS, loss)
    assert [t.advantage for t in trajectories] == pytest.approx(expected, abs=1e-6)
    assert [t.group for t in trajectories] == GROUPS and [t.reward for t in trajectories] == REWARDS.tolist()
    assert equal == [False, True, False, True, True, False, True, False, True, True]  # prompts 3 and 2
    third = trajectories[2]  # prompt 7, its completion of 3 tokens
    assert torch.equal(third.prompt_ids, PROMPTS[7]) and third.old_logprobs.tolist() == [-3.0] * 3
    assert third.sampler_logprobs is third.old_logprobs and third.ref_logprobs is None  # until scored


def test_grpo_keeps_every_sample_and_counts_the_equal_reward_groups():
    trajectories, equal = build(GROUPS, REWARDS, "grpo")
    train, counts = select_training(trajectories, equal, keep_rejected=True, filter_equal_groups=False)
    assert len(train) == 10
    # [training samples, with A != 0 (prompt 7's three), equal-reward groups (3 and 2), samples in them]
    assert counts.tolist() == [10, 3, 2, 6]


def test_filtering_drops_the_equal_reward_groups_only():
    trajectories, equal = build(GROUPS, REWARDS, "grpo")
    train, counts = select_training(trajectories, equal, keep_rejected=True, filter_equal_groups=True)
    assert [t.group for t in train] == [7, 7, 7, 11]  # the singleton stays: its A = r is not forced to 0
    assert counts.tolist() == [4, 3, 2, 6]


def test_raft_without_rejected_samples_trains_on_the_accepted_ones():
    trajectories, equal = build(GROUPS, REWARDS, "raft")
    train, counts = select_training(trajectories, equal, keep_rejected=False, filter_equal_groups=False)
    assert [t.group for t in train] == [7, 3, 3] and counts.tolist() == [3, 3, 2, 6]


def test_all_equal_groups_leave_no_signal_and_a_rank_without_samples_counts_zero():
    trajectories, equal = build([2, 2, 3, 3], np.zeros(4, np.float32), "grpo")
    _, counts = select_training(trajectories, equal, keep_rejected=True, filter_equal_groups=False)
    assert counts.tolist() == [4, 0, 2, 4]  # no non-zero advantage: the M-step is skipped
    nothing, none_equal = build([], np.zeros(0, np.float32), "grpo")
    assert nothing == [] and none_equal == []
    assert select_training([], [], keep_rejected=True, filter_equal_groups=True)[1].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("loss", ["grpo", "drgrpo"])
def test_grpo_refuses_to_drop_rejected_samples(loss):
    with pytest.raises(ValueError, match=f"algo.keep_rejected=false with algo.loss={loss}"):
        EStep(
            None,
            None,
            Uniform(n_per_prompt=4),
            algorithm=ALGORITHMS[loss],
            sampling=SamplingParams(),
            keep_rejected=False,
            filter_equal_groups=False,
            seed=0,
            dist=Dist(),
        )


def test_packed_trajectories_come_back_equal_bit_for_bit():
    from dibs.estep.samples import Trajectory, pack_trajectories, unpack_trajectories

    g = torch.Generator().manual_seed(0)
    rows = []
    for k in range(7):
        t = int(torch.randint(0, 5, (1,), generator=g))  # empty responses included
        lp = torch.randn(t, generator=g)
        rows.append(
            Trajectory(
                torch.randint(0, 100, (3 + k,), generator=g), torch.randint(0, 100, (t,), generator=g), lp,
                advantage=float(torch.randn(1, generator=g)) / 3, reward=float(k % 2), group=k // 2,
                sampler_logprobs=lp + 1e-7 if k % 3 else None, ref_logprobs=None if k % 2 else lp * 2,
            )
        )  # fmt: skip
    back = unpack_trajectories(pack_trajectories(rows))
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        for name in ("prompt_ids", "response_ids", "old_logprobs", "sampler_logprobs", "ref_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or (torch.equal(x, y) and x.dtype == y.dtype), name
        assert (a.advantage, a.reward, a.group) == (b.advantage, b.reward, b.group)
    assert unpack_trajectories(pack_trajectories([])) == []
