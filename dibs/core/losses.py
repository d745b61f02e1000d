"""Policy-gradient losses of the EM M-step (PAPER.md section 5), pure torch.

All tensors are aligned on response positions: ``logp[b, t]`` is log π(token t+1 | prefix) for the
training policy, ``mask[b, t]`` is 1 where that target token belongs to the response.

- RAFT (vanilla):  A = max(r, 0);  loss = token-mean(−A · log π)            (SFT on accepted samples)
- RAFT++:          ratio = exp(log π − log π_old)
                   loss = token-mean(max(−A · ratio, −A · clip(ratio, 1 − ε_low, 1 + ε_high)))
Token-mean runs over all response tokens of the micro-batch it is given. The reference feeds it rejected
samples too (A = 0: they add to the denominator only); the kit's ``algo.keep_rejected`` chooses whether the
E-step hands them to the M-step at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LossOutput", "masked_mean", "raft_advantages", "raft_loss", "raftpp_loss", "LOSSES"]


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # [] scalar with grad
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1; 0 (not NaN) when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def raft_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RAFT advantage A = max(r, 0): 1 for accepted samples, 0 for rejected ones."""
    return rewards.clamp_min(0.0)


def raft_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> LossOutput:
    """−A · log π, token-mean. ``old_logp`` is unused (kept so every loss has one signature)."""
    del old_logp
    per_token = -advantages[:, None] * logp  # [B, T]
    loss = masked_mean(per_token, mask)
    return LossOutput(loss, {"nll_accepted": masked_mean(-logp, mask * (advantages[:, None] > 0)).detach()})


def raftpp_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> LossOutput:
    """RAFT++: PPO clipped surrogate on RAFT advantages; clip_high > clip_low is "clip-higher"."""
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # [B, T] guards exp() against overflow
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = advantages[:, None]  # [B, 1]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(-log_ratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return LossOutput(loss, {"clipfrac": clipfrac, "approx_kl": approx_kl, "ratio": ratio_mean})


LOSSES = {"raft": raft_loss, "raftpp": raftpp_loss}
