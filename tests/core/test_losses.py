import math

import numpy as np
import pytest
import torch

from dibs.core.allocation import UniformAllocator
from dibs.core.batching import chunk_by_tokens, pad_left, pad_right
from dibs.core.logprobs import gather_logprobs
from dibs.core.losses import masked_mean, raft_advantages, raft_loss, raftpp_loss
from dibs.core.metrics import level_accuracy, level_sums


def test_raft_advantages_clip_negative_rewards_to_zero():
    assert raft_advantages(torch.tensor([1.0, 0.0, -1.0])).tolist() == [1.0, 0.0, 0.0]


def test_raft_loss_is_token_mean_of_accepted_nll_over_all_tokens():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, 0.0])
    # accepted row contributes 1 + 2 = 3; denominator counts all 5 response tokens → 0.6
    out = raft_loss(logp, torch.zeros_like(logp), mask, adv)
    assert out.loss.item() == pytest.approx(0.6)
    assert out.metrics["nll_accepted"].item() == pytest.approx(1.5)  # (1 + 2) / 2


def test_raftpp_clips_ratio_above_one_plus_eps_for_positive_advantage():
    # ratios e^{0.5}=1.6487 (clipped to 1.2 → loss −1.2) and e^{−0.1}=0.9048 (inside → −0.9048)
    logp = torch.tensor([[0.5, -0.1]])
    old = torch.zeros_like(logp)
    out = raftpp_loss(logp, old, torch.ones_like(logp), torch.tensor([1.0]), clip_low=0.2, clip_high=0.2)
    assert out.loss.item() == pytest.approx((-1.2 - math.exp(-0.1)) / 2, rel=1e-6)
    assert out.metrics["clipfrac"].item() == pytest.approx(0.5)


def test_raftpp_clip_higher_raises_the_upper_bound_only():
    # ratio e^{0.3}=1.3499: clipped to 1.28 with eps_high=0.28; ratio e^{-0.5}=0.6065 stays (A>0: max picks −0.6065)
    logp = torch.tensor([[0.3, -0.5]])
    out = raftpp_loss(logp, torch.zeros_like(logp), torch.ones(1, 2), torch.tensor([1.0]), clip_low=0.2, clip_high=0.28)
    assert out.loss.item() == pytest.approx((-1.28 - math.exp(-0.5)) / 2, rel=1e-6)


def test_raftpp_gradient_vanishes_where_clipped_and_equals_raft_at_ratio_one():
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    raftpp_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([1.0])).loss.backward()
    # d/dlogp of −ratio/2 at ratio 1 is −1/2; the clipped token has no gradient
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5])


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_gather_logprobs_matches_log_softmax_with_temperature():
    logits = torch.tensor([[[2.0, 0.0, 1.0]]])
    # T=2: logits/2 = [1, 0, 0.5]; log p(token 2) = 0.5 − log(e + 1 + e^0.5)
    expected = 0.5 - math.log(math.e + 1 + math.exp(0.5))
    assert gather_logprobs(logits, torch.tensor([[2]]), temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_uniform_allocator_spends_exactly_n_per_prompt():
    alloc = UniformAllocator(n_per_prompt=3)
    n = alloc.allocate(5)
    assert n.tolist() == [3] * 5 and n.sum() == alloc.budget(5) == 15
    with pytest.raises(ValueError, match="n_per_prompt"):
        UniformAllocator(n_per_prompt=0)


def test_padding_helpers_place_tokens_and_masks():
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    ids, mask = pad_right(seqs, 0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_left(seqs, 0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_chunk_by_tokens_respects_budget():
    # lengths 10, 8, 2 with 6 new tokens: [10, 8] → 2·(10+6)=32 ≤ 32; adding 2 → 3·16=48 > 32
    assert chunk_by_tokens([10, 8, 2], extra=6, token_budget=32) == [[0, 1], [2]]
    assert chunk_by_tokens([100], extra=6, token_budget=32) == [[0]]  # oversize row still gets a chunk


def test_level_accuracy_sums_and_overall():
    sums = level_sums(np.array([1.0, 0.0, 1.0, 1.0]), ["1", "1", "2", "2"], ["1", "2", "3"])
    assert sums.tolist() == [[1.0, 2.0, 0.0], [2.0, 2.0, 0.0]]
    assert level_accuracy(sums, ["1", "2", "3"]) == {"1": 0.5, "2": 1.0, "all": 0.75}
