"""Per-sample gradient norms for GVM's G_i (PAPER.md section 3), pure torch.

For each accepted sample, G = ‖∂L/∂θ‖₂ with L = −Σ_t log π(y_t | x, y_<t) summed over the response tokens
(``reduction="mean"`` divides by their number), θ one parameter tensor. The reference computes this with
one batch-1 forward and backward per sample (:func:`reference_grad_norms`, kept as the oracle). The fast
paths here need one batched forward (and, for the input embedding, one batched backward) for all samples:

- ``lm_head``: ∂L/∂W = Σ_t e_t h_tᵀ with e_t = softmax(z_t) − onehot(y_t) and h_t the final hidden state,
  so ‖∂L/∂W‖² = Σ_{t,s} ⟨e_t, e_s⟩⟨h_t, h_s⟩ (the Gram trick), or ‖Eᵀ H‖² directly when that is cheaper;
  no backward pass at all.
- ``embed_tokens`` (untied): the gradient reaches the table only through the rows the sequence looked up,
  ∂L/∂W_v = Σ_{t: x_t = v} g_t with g_t = ∂L/∂(input embedding t). Samples do not interact in a forward
  pass, so one backward of Σ_b L_b gives every sample's g_t at once; rows are then summed per token id.
- ``embed_tokens`` with tied embeddings (one tensor is both the input table and the output projection):
  the gradient of the shared tensor is the sum of both parts, and ‖A + B‖² = ‖A‖² + ‖B‖² + 2⟨A, B⟩ with
  ⟨A, B⟩ = Σ_{t,s} E[s, x_t] ⟨g_t, h_s⟩. This is what the reference measures on a tied model, where
  ``named_parameters()`` lists the shared tensor once, as ``embed_tokens``.

``hidden_fn(inputs_embeds, attention_mask) -> [B, L, H]`` is the model body up to the final norm; the
output projection is ``hidden @ head_weight.T`` (no bias, as in Qwen2 and Llama). Temperature 1, as the
reference.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["PARAMS", "grad_norms", "reference_grad_norms"]

PARAMS = ("embed_tokens", "lm_head")
HiddenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _targets(input_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [B, L−1] (the next token) and their float mask; ``response_mask`` is [B, L], 1 on response tokens."""
    return input_ids[:, 1:], response_mask[:, 1:].to(torch.float32)


def _output_part(hidden: torch.Tensor, head_weight: torch.Tensor, target: torch.Tensor, keep: torch.Tensor):
    """For one sample: E = softmax(H Wᵀ) − onehot(y) over the kept positions, and those positions' H."""
    h = hidden[keep]  # [T, H]
    probs = torch.softmax(h.float() @ head_weight.float().T, dim=-1)  # [T, V]
    e = probs.clone()
    e[torch.arange(len(h)), target[keep]] -= 1.0
    return e, h.float()


def _output_norm_sq(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """‖Eᵀ H‖_F², through the T×T Gram matrices or the V×H product, whichever is cheaper."""
    t, v = e.shape
    if t * t * (v + h.shape[1]) < t * v * h.shape[1]:
        return ((e @ e.T) * (h @ h.T)).sum()
    return (e.T @ h).pow(2).sum()


@torch.no_grad()
def _lm_head_norms(hidden, head_weight, input_ids, response_mask) -> torch.Tensor:
    target, keep = _targets(input_ids, response_mask)
    out = torch.zeros(len(input_ids), dtype=torch.float32, device=input_ids.device)
    for b in range(len(input_ids)):
        e, h = _output_part(hidden[b, :-1], head_weight, target[b], keep[b] > 0)
        out[b] = _output_norm_sq(e, h).sqrt()
    return out


def grad_norms(
    hidden_fn: HiddenFn,
    embed_weight: torch.Tensor,
    head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    param: str = "embed_tokens",
    reduction: str = "sum",
) -> torch.Tensor:
    """[B] gradient norms, one per sample (row), w.r.t. ``param``; rows are prompt + response, padded.

    ``response_mask`` [B, L] marks response tokens (the ones whose log-probability is summed).
    """
    if param not in PARAMS:
        raise ValueError(f"param={param!r} is not one of {PARAMS}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is not 'sum' or 'mean'")
    tied = embed_weight.data_ptr() == head_weight.data_ptr()
    embeds = embed_weight.detach()[input_ids]  # [B, L, H]
    if param == "lm_head" and not tied:
        with torch.no_grad():
            norms = _lm_head_norms(hidden_fn(embeds, attention_mask), head_weight, input_ids, response_mask)
    else:
        norms = _embedding_norms(hidden_fn, embeds, head_weight, input_ids, attention_mask, response_mask, tied)
    if reduction == "mean":
        norms = norms / response_mask[:, 1:].sum(dim=1).clamp(min=1).to(norms.dtype)
    return norms


def _embedding_norms(hidden_fn, embeds, head_weight, input_ids, attention_mask, response_mask, tied) -> torch.Tensor:
    embeds = embeds.clone().requires_grad_(True)
    with torch.enable_grad():
        hidden = hidden_fn(embeds, attention_mask)  # [B, L, H]
        logits = hidden[:, :-1].float() @ head_weight.detach().float().T  # [B, L-1, V]
        target, keep = _targets(input_ids, response_mask)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * keep).sum()  # Σ_b L_b: each sample's inputs only reach its own loss
        (g,) = torch.autograd.grad(loss, embeds)  # [B, L, H]
    hidden = hidden.detach()
    out = torch.zeros(len(input_ids), dtype=torch.float32, device=input_ids.device)
    for b in range(len(input_ids)):
        valid = attention_mask[b] > 0
        ids, gb = input_ids[b][valid], g[b][valid].float()  # [n], [n, H]
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.zeros(len(unique), gb.shape[1], device=gb.device).index_add_(0, inverse, gb)  # A's nonzero rows
        sq = rows.pow(2).sum()
        if tied:  # + the output projection's part of the same tensor, and the cross term
            kb = keep[b] > 0
            e, h = _output_part(hidden[b, :-1], head_weight.detach(), target[b], kb)  # [T, V], [T, H]
            sq = sq + _output_norm_sq(e, h) + 2.0 * (e[:, ids].T * (gb @ h.T)).sum()
        out[b] = sq.clamp(min=0).sqrt()
    return out


def reference_grad_norms(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    param: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """The reference's way, one sample at a time: a batch-1 forward and ``autograd.grad`` w.r.t. ``param``.

    Kept as the oracle for the fast paths (and for the benchmark); rows are unpadded before the forward.
    """
    out = torch.zeros(len(input_ids), dtype=torch.float32, device=input_ids.device)
    for b in range(len(input_ids)):
        valid = attention_mask[b] > 0
        ids, resp = input_ids[b][valid][None], response_mask[b][valid][None]
        with torch.enable_grad():
            logits = logits_fn(ids, torch.ones_like(ids))
            target, keep = _targets(ids, resp)
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            loss = -(logp * keep).sum()
            if reduction == "mean":
                loss = loss / keep.sum().clamp(min=1)
            (grad,) = torch.autograd.grad(loss, param)
        out[b] = grad.float().norm()
    return out
