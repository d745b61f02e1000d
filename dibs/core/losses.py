"""Advantages and policy-gradient losses of the EM M-step (docs/method.md, "The M-step"), pure torch.

All tensors are aligned on response positions: ``logp[b, t]`` is log π(token t+1 | prefix) for the
training policy, ``mask[b, t]`` is 1 where that target token belongs to the response.

Advantages (one scalar per sample, broadcast over its tokens; ``group[b]`` = prompt id, groups of any size):
- RAFT / RAFT++:  A = max(r, 0)
- GRPO:           A = (r − mean_g) / (std_g + 1e-6), std_g unbiased; a group of one gets A = r
- Dr.GRPO:        A = r − mean_g (no std division); a group of one gets A = r
A group of ≥ 2 equal rewards gets A = 0 exactly (``equal_reward_groups``).

Losses, per token, with ratio = exp(log π − log π_old):
- RAFT:     ℓ = −A · log π                                                  (SFT on accepted samples)
- RAFT++:   ℓ = max(−A · ratio, −A · clip(ratio, 1 − ε_low, 1 + ε_high))   (ε_high > ε_low: clip-higher)
- GRPO:     the RAFT++ ℓ, and for A < 0 the dual clip ℓ = min(ℓ, −A · c), c = 3
- Dr.GRPO:  the GRPO loss; only its advantages differ (the GVM paper's "Dr.GRPO variant: no std division").
Optional KL to a frozen reference (k3 "low_var_kl"): with k = log π_ref − log π,
ℓ += β · clamp(exp(k) − k − 1, −10, 10).

Aggregation of ℓ (``aggregate``), as verl's ``agg_loss``:
- "token-mean"          Σ_{b,t} m ℓ / Σ_{b,t} m        (the reference's mode for every loss: rejected samples,
                                                         A = 0, still count in the denominator)
- "seq-mean-token-sum"  Σ_b (Σ_t m ℓ) / B
- "seq-mean-token-mean" Σ_b (Σ_t m ℓ / Σ_t m) / B
Passing ``denom`` = ``loss_denominator`` of the WHOLE batch (summed over micro-batches / all-reduced over
ranks) makes the micro-batch losses, and their gradients, add up to the whole batch's. Dr.GRPO's constant
normaliser (Liu et al.) is "seq-mean-token-sum" with ``denom`` = n_sequences × max_response_len.

``ALGORITHMS`` is the one registry of ``algo.loss``: its name → advantages, loss, and whether its negative
advantages live on the rejected samples (which must then be kept). The loss options (clip ranges, dual clip,
aggregation, KL coefficient) have no defaults here: ``conf/algo/*.yaml`` hold them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = [
    "LossOutput",
    "AGG_MODES",
    "masked_mean",
    "aggregate",
    "loss_denominator",
    "raft_advantages",
    "grpo_advantages",
    "drgrpo_advantages",
    "equal_reward_groups",
    "low_var_kl",
    "raft_loss",
    "raftpp_loss",
    "grpo_loss",
    "ALGORITHMS",
    "Algorithm",
    "get_algorithm",
]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # [] scalar with grad
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1; 0 (not NaN) when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def loss_denominator(mask: torch.Tensor, agg: str = "token-mean") -> float:
    """Normaliser ``aggregate`` uses for this batch: masked tokens (token-mean) or rows (seq-mean-*).
    Additive, so the whole batch's is the sum over its micro-batches (or an all-reduce over ranks)."""
    if agg not in AGG_MODES:
        raise ValueError(f"agg={agg!r} is not one of {AGG_MODES}")
    return float(mask.sum()) if agg == "token-mean" else float(mask.shape[0])


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", denom: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Reduce ``per_token`` [B, T] to a scalar by ``agg``; ``denom`` (a float, or a tensor, e.g. all-reduced)
    replaces this batch's own normaliser. Clamped to ≥ 1, so an empty batch gives 0, not NaN."""
    if agg not in AGG_MODES:
        raise ValueError(f"agg={agg!r} is not one of {AGG_MODES}")
    mask = mask.to(per_token.dtype)
    row_sum = (per_token * mask).sum(-1)  # [B]
    if agg == "seq-mean-token-mean":
        row_sum = row_sum / mask.sum(-1).clamp_min(1.0)  # [B] per-sequence token-mean
    if denom is None:  # as loss_denominator, kept a tensor: no host sync per micro-batch
        denom = mask.sum() if agg == "token-mean" else mask.shape[0]
    return row_sum.sum() / torch.as_tensor(denom, dtype=row_sum.dtype, device=row_sum.device).clamp_min(1.0)


def raft_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RAFT advantage A = max(r, 0): 1 for accepted samples, 0 for rejected ones."""
    return rewards.clamp_min(0.0)


def _groups(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense group index [B] in 0..G-1 and group sizes [G] from arbitrary int prompt ids [B]."""
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    return inv, counts


def equal_reward_groups(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Bool [B]: the sample's group has ≥ 2 members and all their rewards are equal, i.e. its GRPO and
    Dr.GRPO advantage is 0 (a group of one keeps A = r, so it is not marked)."""
    inv, counts = _groups(group)
    empty = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device)
    hi = empty.scatter_reduce(0, inv, rewards, "amax", include_self=False)  # [G]
    lo = empty.scatter_reduce(0, inv, rewards, "amin", include_self=False)  # [G]
    return (hi[inv] == lo[inv]) & (counts[inv] > 1)  # [B]


def grpo_advantages(
    rewards: torch.Tensor, group: torch.Tensor, *, eps: float = 1e-6, norm_std: bool = True
) -> torch.Tensor:
    """GRPO advantage (r − mean_g) / (std_g + eps), std unbiased; ``norm_std=False`` is Dr.GRPO (r − mean_g).

    A group of one gets A = r (docs/method.md; verl sets mean 0, std 1 and
    so returns r / (1 + eps), a 1e-6 relative difference). Equal-reward groups get exactly 0, where the mean's
    rounding would otherwise leave ~1e-11 noise."""
    r = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())  # [B]
    inv, counts = _groups(group)
    n = counts.to(r.dtype)  # [G]
    mean = torch.zeros_like(n).index_add_(0, inv, r) / n  # [G]
    dev = r - mean[inv]  # [B]
    adv = dev  # [B]
    if norm_std:
        var = torch.zeros_like(n).index_add_(0, inv, dev**2) / (n - 1).clamp_min(1.0)  # [G] unbiased
        adv = dev / (var.sqrt()[inv] + eps)  # [B]
    adv = torch.where(counts[inv] == 1, r, adv)  # [B]
    return adv.masked_fill(equal_reward_groups(r, group), 0.0)


def drgrpo_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO advantage r − mean_g: GRPO without the std division."""
    return grpo_advantages(rewards, group, norm_std=False)


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π ‖ π_ref) per token: exp(k) − k − 1 with k = ref − logp, clamped to [−10, 10]."""
    # clamping k first changes nothing (|k| ≥ 20 gives k3 ≥ 19, clamped anyway) but keeps exp() finite,
    # so the clamped tokens get a 0 gradient instead of 0·inf = NaN
    kl = (ref_logp - logp).clamp(-20.0, 20.0)  # [B, T]
    return (torch.exp(kl) - kl - 1.0).clamp(-10.0, 10.0)  # [B, T]


def _finish(
    per_token: torch.Tensor,
    logp: torch.Tensor,
    mask: torch.Tensor,
    metrics: dict[str, torch.Tensor],
    *,
    agg: str,
    denom: float | torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    kl_coef: float,
) -> LossOutput:
    """Add the KL penalty (when ``ref_logp`` is given and ``kl_coef`` > 0) and aggregate."""
    if ref_logp is not None:
        kld = low_var_kl(logp, ref_logp)  # [B, T]
        metrics["kl"] = masked_mean(kld, mask).detach()
        if kl_coef > 0:
            per_token = per_token + kl_coef * kld  # aggregation is linear: same as adding β · agg(kld)
    return LossOutput(aggregate(per_token, mask, agg, denom), metrics)


def raft_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    agg: str,
    kl_coef: float,
    denom: float | torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> LossOutput:
    """−A · log π. ``old_logp`` is unused (kept so every loss has one signature)."""
    del old_logp
    per_token = -advantages[:, None] * logp  # [B, T]
    metrics = {"nll_accepted": masked_mean(-logp, mask * (advantages[:, None] > 0)).detach()}
    return _finish(per_token, logp, mask, metrics, agg=agg, denom=denom, ref_logp=ref_logp, kl_coef=kl_coef)


def _clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO loss in verl's sign convention (a loss, so max = the pessimistic bound), dual clip
    for A < 0 when ``clip_ratio_c`` is set; and its metrics."""
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # [B, T] guards exp() against overflow
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = advantages[:, None]  # [B, 1]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
            "approx_kl": masked_mean(-log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    if clip_ratio_c is not None:
        # A < 0 and ratio ≫ 1: max() keeps −A·ratio unbounded; cap it at −A·c (Ye et al., dual-clip PPO)
        dual = -adv * clip_ratio_c  # [B, 1]
        negative = adv < 0  # [B, 1]
        with torch.no_grad():
            metrics["clipfrac_dual"] = masked_mean(((per_token > dual) & negative).to(logp.dtype), mask)
        per_token = torch.where(negative, torch.minimum(per_token, dual), per_token)  # [B, T]
    return per_token, metrics


def raftpp_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    agg: str,
    kl_coef: float,
    denom: float | torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> LossOutput:
    """RAFT++: PPO clipped surrogate on RAFT advantages; clip_high > clip_low is "clip-higher". No dual clip:
    RAFT advantages are never negative."""
    per_token, metrics = _clipped_surrogate(logp, old_logp, mask, advantages, clip_low, clip_high, None)
    return _finish(per_token, logp, mask, metrics, agg=agg, denom=denom, ref_logp=ref_logp, kl_coef=kl_coef)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float,
    agg: str,
    kl_coef: float,
    denom: float | torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> LossOutput:
    """GRPO / Dr.GRPO: the RAFT++ surrogate plus the dual clip c for A < 0. The paper's GRPO runs use no
    clip-higher and a KL of 0.001 to the frozen reference; Dr.GRPO differs only in ``drgrpo_advantages``
    (the GVM paper names no other change, so it keeps the reference's token-mean)."""
    per_token, metrics = _clipped_surrogate(logp, old_logp, mask, advantages, clip_low, clip_high, clip_ratio_c)
    return _finish(per_token, logp, mask, metrics, agg=agg, denom=denom, ref_logp=ref_logp, kl_coef=kl_coef)


@dataclass(frozen=True)
class Algorithm:
    name: str
    advantages: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rewards [S], group [S]) -> [S]
    loss: Callable[..., LossOutput]
    needs_rejected: bool  # negative advantages live on the rejected samples: algo.keep_rejected must be true


ALGORITHMS = {
    "raft": Algorithm("raft", lambda rewards, group: raft_advantages(rewards), raft_loss, False),
    "raftpp": Algorithm("raftpp", lambda rewards, group: raft_advantages(rewards), raftpp_loss, False),
    "grpo": Algorithm("grpo", grpo_advantages, grpo_loss, True),
    "drgrpo": Algorithm("drgrpo", drgrpo_advantages, grpo_loss, True),
}


def get_algorithm(name: str) -> Algorithm:
    """The registry's entry for ``algo.loss``."""
    if name not in ALGORITHMS:
        raise ValueError(f"algo.loss={name!r} is not one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]
