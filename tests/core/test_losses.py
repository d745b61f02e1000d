import inspect
import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dibs.core.batching import chunk_by_tokens, pad_left, pad_right
from dibs.core.logprobs import gather_logprobs
from dibs.core.losses import (
    AGG_MODES,
    ALGORITHMS,
    aggregate,
    drgrpo_advantages,
    equal_reward_groups,
    grpo_advantages,
    grpo_loss,
    loss_denominator,
    low_var_kl,
    masked_mean,
    raft_advantages,
    raft_loss,
    raftpp_loss,
)

# The hand cases' settings (the losses take no defaults: conf/algo holds them): ε = 0.2 both sides, c = 3.
HAND = dict(clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, agg="token-mean", kl_coef=0.0)


def loss(fn, *args, **options):
    """``fn`` (a loss, or an algo.loss name) with the hand settings it takes, ``options`` overriding them."""
    fn = ALGORITHMS[fn].loss if isinstance(fn, str) else fn
    accepted = inspect.signature(fn).parameters
    return fn(*args, **{**{k: v for k, v in HAND.items() if k in accepted}, **options})


def test_raft_advantages_clip_negative_rewards_to_zero():
    assert raft_advantages(torch.tensor([1.0, 0.0, -1.0])).tolist() == [1.0, 0.0, 0.0]


def test_raft_loss_is_token_mean_of_accepted_nll_over_all_tokens():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, 0.0])
    # accepted row contributes 1 + 2 = 3; denominator counts all 5 response tokens → 0.6
    out = loss(raft_loss, logp, torch.zeros_like(logp), mask, adv)
    assert out.loss.item() == pytest.approx(0.6)
    assert out.metrics["nll_accepted"].item() == pytest.approx(1.5)  # (1 + 2) / 2


def test_raftpp_clips_ratio_above_one_plus_eps_for_positive_advantage():
    # ratios e^{0.5}=1.6487 (clipped to 1.2 → loss −1.2) and e^{−0.1}=0.9048 (inside → −0.9048)
    logp = torch.tensor([[0.5, -0.1]])
    old = torch.zeros_like(logp)
    out = loss(raftpp_loss, logp, old, torch.ones_like(logp), torch.tensor([1.0]), clip_low=0.2, clip_high=0.2)
    assert out.loss.item() == pytest.approx((-1.2 - math.exp(-0.1)) / 2, rel=1e-6)
    assert out.metrics["clipfrac"].item() == pytest.approx(0.5)


def test_raftpp_clip_higher_raises_the_upper_bound_only():
    # ratio e^{0.3}=1.3499: clipped to 1.28 with eps_high=0.28; ratio e^{-0.5}=0.6065 stays (A>0: max picks −0.6065)
    logp = torch.tensor([[0.3, -0.5]])
    out = loss(
        raftpp_loss, logp, torch.zeros_like(logp), torch.ones(1, 2), torch.tensor([1.0]), clip_low=0.2, clip_high=0.28
    )
    assert out.loss.item() == pytest.approx((-1.28 - math.exp(-0.5)) / 2, rel=1e-6)


def test_raftpp_gradient_vanishes_where_clipped_and_equals_raft_at_ratio_one():
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    loss(raftpp_loss, logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([1.0])).loss.backward()
    # d/dlogp of −ratio/2 at ratio 1 is −1/2; the clipped token has no gradient
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5])


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


# ---------------------------------------------------------------- advantages


def _grpo_loop(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6, norm_std: bool = True) -> torch.Tensor:
    """Per-group reference, as verl's compute_grpo_outcome_advantage but with A = r for a group of one."""
    out = torch.empty_like(rewards)
    for g in set(group.tolist()):
        idx = (group == g).nonzero().flatten()
        r = rewards[idx]
        if len(idx) == 1:
            out[idx] = r
        else:
            out[idx] = (r - r.mean()) / (r.std() + eps) if norm_std else r - r.mean()  # torch.std is unbiased
    return out


def test_grpo_advantages_by_hand_with_unbiased_std_singleton_and_equal_group():
    # prompt 7: r = [1, 0, 0], mean 1/3, unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3, std = 0.57735
    #   → A = [ (2/3)/0.57735, −(1/3)/0.57735 ] = [1.1547, −0.57735]   (population std 0.4714 would give 1.4142)
    # prompt 3: r = [1, 1] → 0;  prompt 11: singleton r = 0.5 → A = 0.5
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    group = torch.tensor([7, 3, 7, 7, 3, 11])
    s = math.sqrt(1 / 3) + 1e-6
    expected = [2 / 3 / s, 0.0, -1 / 3 / s, -1 / 3 / s, 0.0, 0.5]
    assert grpo_advantages(rewards, group).tolist() == pytest.approx(expected, rel=1e-9)
    assert expected[0] == pytest.approx(1.1547, rel=1e-4)
    # Dr.GRPO: r − mean only
    assert drgrpo_advantages(rewards, group).tolist() == pytest.approx([2 / 3, 0, -1 / 3, -1 / 3, 0, 0.5], rel=1e-9)


def test_grpo_advantages_eps_is_added_to_the_std():
    # r = [1, 0]: mean 0.5, unbiased std = sqrt(0.5) = 0.70711; eps = 1 − 0.70711 makes the divisor 1 → ±0.5
    adv = grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0]), eps=1 - math.sqrt(0.5))
    assert adv.tolist() == pytest.approx([0.5, -0.5], rel=1e-12)


def test_grpo_advantages_of_singletons_are_the_rewards_and_equal_groups_are_exactly_zero():
    assert grpo_advantages(torch.tensor([0.0, 1.0, -1.0]), torch.tensor([4, 5, 6])).tolist() == [0.0, 1.0, -1.0]
    # mean of three 0.1 rounds to 0.10000000000000002: without the explicit zeroing A would be ~1e-11
    tenths = torch.full((3,), 0.1, dtype=torch.float64)
    assert grpo_advantages(tenths, torch.zeros(3, dtype=torch.long)).tolist() == [0.0, 0.0, 0.0]
    assert drgrpo_advantages(tenths, torch.zeros(3, dtype=torch.long)).tolist() == [0.0, 0.0, 0.0]


def test_equal_reward_groups_marks_groups_of_two_or_more_with_one_reward():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0])
    group = torch.tensor([7, 3, 7, 7, 3, 11, 2, 2])
    # 7: mixed; 3: [1, 1] equal; 11: singleton (keeps A = r, so not marked); 2: [0, 0] equal
    assert equal_reward_groups(rewards, group).tolist() == [False, True, False, False, True, False, True, True]


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
    discrete=st.booleans(),
)
def test_grpo_advantages_vectorised_equals_the_per_group_loop(sizes, seed, discrete):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(1000, generator=g)[: len(sizes)]  # arbitrary prompt ids
    group = ids.repeat_interleave(torch.tensor(sizes))
    order = torch.randperm(len(group), generator=g)  # groups interleaved, not contiguous
    group = group[order]
    if discrete:  # {0, 0.5, 1}: equal-reward groups are common
        rewards = torch.randint(0, 3, (len(group),), generator=g).double() / 2
    else:
        rewards = torch.randn(len(group), generator=g, dtype=torch.float64)
    for norm_std in (True, False):
        fast = grpo_advantages(rewards, group, norm_std=norm_std)
        torch.testing.assert_close(fast, _grpo_loop(rewards, group, norm_std=norm_std), rtol=1e-9, atol=1e-9)
    equal = equal_reward_groups(rewards, group)
    loop_equal = [bool((group == x).sum() > 1 and rewards[group == x].unique().numel() == 1) for x in group]
    assert equal.tolist() == loop_equal


# ---------------------------------------------------------------- clipped surrogates


@pytest.mark.parametrize("loss_fn", [raftpp_loss, grpo_loss])
def test_ratio_exactly_at_the_clip_bound_keeps_its_gradient_and_just_outside_loses_it(loss_fn):
    # row 0, A = +1: ratios [1.2 (= 1 + ε_high), 1.2 + 1e-6]; row 1, A = −1: ratios [0.8 (= 1 − ε_low), 0.8 − 1e-6]
    # per token max(−A·ratio, −A·clip(ratio)) = [−1.2, −1.2] and [0.8, 0.8] → token-mean (−2.4 + 1.6) / 4 = −0.2
    # gradient −A·ratio / 4 on the bound tokens ([−0.3], [0.2]); 0 on the clipped ones; clipfrac 2/4 (ties not clipped)
    ratios = torch.tensor([[1.2, 1.2 + 1e-6], [0.8, 0.8 - 1e-6]], dtype=torch.float64)
    logp = ratios.log().requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    out = loss(loss_fn, logp, torch.zeros_like(ratios), torch.ones_like(ratios), adv)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.2, abs=1e-12)
    assert logp.grad.flatten().tolist() == pytest.approx([-0.3, 0.0, 0.2, 0.0], abs=1e-12)
    assert out.metrics["clipfrac"].item() == pytest.approx(0.5)


def test_clip_higher_moves_only_the_upper_bound():
    # row 0, A = +1, ratio 1.3; row 1, A = −1, ratio 0.7
    # (ε_low, ε_high) = (0.2, 0.2):  [max(−1.3, −1.2), max(0.7, 0.8)]  = [−1.2, 0.8]  → −0.2
    # (0.2, 0.28):                   [max(−1.3, −1.28), 0.8]           = [−1.28, 0.8] → −0.24
    # (0.28, 0.2):                   [−1.2, max(0.7, 0.72)]            = [−1.2, 0.72] → −0.24
    logp = torch.tensor([[1.3], [0.7]], dtype=torch.float64).log()
    args = (logp, torch.zeros_like(logp), torch.ones_like(logp), torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert loss(raftpp_loss, *args, clip_low=0.2, clip_high=0.2).loss.item() == pytest.approx(-0.2)
    assert loss(raftpp_loss, *args, clip_low=0.2, clip_high=0.28).loss.item() == pytest.approx(-0.24)
    assert loss(raftpp_loss, *args, clip_low=0.28, clip_high=0.2).loss.item() == pytest.approx(-0.24)


def test_grpo_dual_clip_caps_negative_advantage_tokens_at_c():
    # ratios e^1.5 = 4.481689 (A = −1), e^0.5 = 1.648721 (A = −1), e^1.5 (A = +1); ε = 0.2, c = 3
    # row 0: max(4.4817, 1.2) = 4.4817 → min(4.4817, 3) = 3      dual clip active, no gradient
    # row 1: max(1.6487, 1.2) = 1.6487 < 3                        inactive, gradient −A·ratio / 3 = 0.549574
    # row 2: A > 0: max(−4.4817, −1.2) = −1.2                     ordinary clip (dual clip is for A < 0 only)
    # GRPO (3 + 1.648721 − 1.2) / 3 = 1.149574; RAFT++ (no dual clip) (4.481689 + 1.648721 − 1.2) / 3 = 1.643470
    logp = torch.tensor([[1.5], [0.5], [1.5]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    args = (torch.zeros(3, 1, dtype=torch.float64), torch.ones(3, 1), adv)
    out = loss(grpo_loss, logp, *args)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(1.149574, rel=1e-6)
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.549574, 0.0], abs=1e-6)
    assert out.metrics["clipfrac_dual"].item() == pytest.approx(1 / 3)
    assert out.metrics["clipfrac"].item() == pytest.approx(1 / 3)  # row 2 only
    assert loss(raftpp_loss, logp, *args).loss.item() == pytest.approx(1.643470, rel=1e-6)
    # c = 5 > 4.4817: inactive everywhere → the RAFT++ value
    assert loss(grpo_loss, logp, *args, clip_ratio_c=5.0).loss.item() == pytest.approx(1.643470, rel=1e-6)


def test_surrogate_metrics_ratio_and_approx_kl():
    # log ratios [0.5, −0.1, (masked) 3]: ratio mean (1.648721 + 0.904837) / 2 = 1.276779
    # approx_kl = mean(−log ratio) = −(0.5 − 0.1) / 2 = −0.2
    logp = torch.tensor([[0.5, -0.1, 3.0]])
    out = loss(grpo_loss, logp, torch.zeros_like(logp), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1.0]))
    assert out.metrics["ratio"].item() == pytest.approx(1.276779, rel=1e-6)
    assert out.metrics["approx_kl"].item() == pytest.approx(-0.2, rel=1e-6)


# ---------------------------------------------------------------- KL to the reference


def test_low_var_kl_by_hand_with_clamp():
    # k = ref − logp = [0.5, −0.5, 3, −12]; e^k − k − 1 = [0.148721, 0.106531, 16.0855 → 10, 11.000006 → 10]
    kl = low_var_kl(torch.zeros(1, 4), torch.tensor([[0.5, -0.5, 3.0, -12.0]]))
    assert kl.flatten().tolist() == pytest.approx([0.148721, 0.106531, 10.0, 10.0], rel=1e-5)


def test_kl_penalty_is_added_with_its_coefficient_and_clamped_tokens_get_no_gradient():
    # A = 0, so only the KL term: 0.1 · (0.148721 + 0.106531 + 10 + 10) / 4 = 0.506381
    # d/dlogp of 0.1·(e^k − k − 1)/4 with k = ref − logp is 0.1·(1 − e^k)/4 = [−0.016218, 0.0098367, 0 (clamped), 0]
    # the last token has k = 100: e^100 overflows float32, yet its gradient must be 0, not NaN
    ref = torch.tensor([[0.5, -0.5, 3.0, 100.0]])
    logp = torch.zeros(1, 4, requires_grad=True)
    out = loss(raft_loss, logp, torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([0.0]), ref_logp=ref, kl_coef=0.1)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.506381, rel=1e-5)
    assert logp.grad.flatten().tolist() == pytest.approx([-0.016218, 0.0098367, 0.0, 0.0], abs=1e-6)
    assert out.metrics["kl"].item() == pytest.approx(5.063813, rel=1e-5)


@pytest.mark.parametrize("name", ["raft", "raftpp", "grpo", "drgrpo"])
def test_kl_is_only_logged_at_zero_coefficient_and_absent_without_reference(name):
    logp = torch.tensor([[-1.0, -0.5]])
    args = (logp, logp - 0.1, torch.ones(1, 2), torch.tensor([1.0]))
    plain = loss(name, *args)
    logged = loss(name, *args, ref_logp=logp + 1.0, kl_coef=0.0)
    # k = 1: e − 2 = 0.718282 per token
    assert "kl" not in plain.metrics and logged.metrics["kl"].item() == pytest.approx(math.e - 2, rel=1e-6)
    assert logged.loss.item() == plain.loss.item()
    penalised = loss(name, *args, ref_logp=logp + 1.0, kl_coef=0.001)
    assert penalised.loss.item() == pytest.approx(plain.loss.item() + 0.001 * (math.e - 2), rel=1e-6)


# ---------------------------------------------------------------- aggregation


def test_aggregate_modes_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0] * 4])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4])  # row 2 has no response token
    # token-mean (1 + 2 + 3 + 4) / 4 = 2.5; seq-mean-token-sum (6 + 4 + 0) / 3 = 3.3333;
    # seq-mean-token-mean (2 + 4 + 0) / 3 = 2 (an empty row counts as a sequence with loss 0, as verl's row mean)
    assert aggregate(x, mask, "token-mean").item() == pytest.approx(2.5)
    assert aggregate(x, mask, "seq-mean-token-sum").item() == pytest.approx(10 / 3)
    assert aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx(2.0)
    assert [loss_denominator(mask, a) for a in AGG_MODES] == [4.0, 3.0, 3.0]
    # a global denominator of 8 replaces the local one: 10/8, 10/8, 6/8
    assert [aggregate(x, mask, a, denom=8.0).item() for a in AGG_MODES] == pytest.approx([1.25, 1.25, 0.75])
    assert aggregate(x, mask, denom=torch.tensor(8.0)).item() == 1.25  # e.g. an all-reduced count
    assert [aggregate(x, torch.zeros_like(mask), a).item() for a in AGG_MODES] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="agg"):
        aggregate(x, mask, "token-sum")


@pytest.mark.parametrize("name", ["raftpp", "grpo"])
def test_losses_pass_their_aggregation_mode_through(name):
    # ratio 1, A = 1 → −1 per token; response lengths 3 and 1
    # token-mean −4/4 = −1; seq-mean-token-sum (−3 − 1)/2 = −2; seq-mean-token-mean (−1 − 1)/2 = −1
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    values = [loss(name, logp, logp, mask, torch.ones(2), agg=a).loss.item() for a in AGG_MODES]
    assert values == pytest.approx([-1.0, -2.0, -1.0])


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", ["raft", "raftpp", "grpo", "drgrpo"])
def test_micro_batches_with_the_global_denominator_sum_to_the_whole_batch(name, agg):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 6, 4, 1])  # one row without response tokens
    B, T = len(lengths), 6
    mask = (torch.arange(T)[None] < lengths[:, None]).double()  # [B, T]
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    logp0 = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios on both sides of the clips
    ref = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64) * 2
    fn = partial(loss, name, agg=agg, ref_logp=None, kl_coef=0.1)
    denom = loss_denominator(mask, agg)

    whole_logp = logp0.clone().requires_grad_()
    whole = fn(whole_logp, old, mask, adv, ref_logp=ref, denom=denom).loss
    whole.backward()
    assert whole.item() == pytest.approx(fn(logp0, old, mask, adv, ref_logp=ref).loss.item(), abs=1e-12)

    micro_logp = logp0.clone().requires_grad_()
    total, naive = 0.0, []
    splits = [[0, 1, 2, 3], [4], [5, 6, 7, 8]]  # uneven micro-batches
    for rows in splits:
        width = max(int(lengths[rows].max()), 1)  # each micro-batch padded only to its own longest response
        part = (micro_logp[rows, :width], old[rows, :width], mask[rows, :width], adv[rows])
        total = total + fn(*part, ref_logp=ref[rows, :width], denom=denom).loss
        naive.append(fn(*part, ref_logp=ref[rows, :width]).loss.item())
    total.backward()
    assert sum(loss_denominator(mask[rows], agg) for rows in splits) == denom
    assert total.item() == pytest.approx(whole.item(), abs=1e-6)
    torch.testing.assert_close(micro_logp.grad, whole_logp.grad, rtol=0, atol=1e-6)
    # the local normalisers would not do: the mean of the micro-batch losses is off
    assert abs(sum(naive) / len(naive) - whole.item()) > 1e-3


def test_registry_names():
    assert sorted(ALGORITHMS) == ["drgrpo", "grpo", "raft", "raftpp"]
    assert ALGORITHMS["drgrpo"].loss is grpo_loss  # Dr.GRPO differs only in its advantages
    assert [a.needs_rejected for a in ALGORITHMS.values()] == [False, False, True, True]
    rewards, group = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1])
    assert ALGORITHMS["grpo"].advantages(rewards, group).tolist() == grpo_advantages(rewards, group).tolist()
    assert ALGORITHMS["raft"].advantages(rewards, group).tolist() == [1.0, 0.0, 1.0]


def test_gather_logprobs_matches_log_softmax_with_temperature():
    logits = torch.tensor([[[2.0, 0.0, 1.0]]])
    # T=2: logits/2 = [1, 0, 0.5]; log p(token 2) = 0.5 − log(e + 1 + e^0.5)
    expected = 0.5 - math.log(math.e + 1 + math.exp(0.5))
    assert gather_logprobs(logits, torch.tensor([[2]]), temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


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
