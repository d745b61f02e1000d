"""Per-token log-probabilities of a causal LM's targets, pure torch.

log π(y_t | x, y_<t) = logits_t[y_t] / T − logsumexp(logits_t / T). Computed by gather − logsumexp so the
full [B, T, V] log-softmax is never materialised a second time.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["gather_logprobs", "sequence_logprobs"]


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``logits`` [B, T, V], ``targets`` [B, T] → log-probs of the targets [B, T] (float32)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)  # [B, T]


def sequence_logprobs(
    forward: Callable[..., torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs of tokens 1..L−1 given their prefix. ``forward`` maps (input_ids, attention_mask) to
    logits [B, L, V]; sequences are right-padded so positions match generation's. Returns [B, L−1]."""
    logits = forward(input_ids=input_ids, attention_mask=attention_mask)  # [B, L, V]
    return gather_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)  # [B, L-1]
