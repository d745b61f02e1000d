"""Pilot statistics for GVM: acceptance rates p_i and gradient norms G_i of the training policy.

G_i is measured on the training policy (not the generator's copy), with the fast paths of
``dibs.core.grad_norms``, on the accepted pilot samples of this rank's prompts, in chunks of at most
``token_budget`` tokens. Under FSDP2 the forward passes are collectives, so every rank runs the same number
of chunks (ranks with fewer accepted samples run small padding chunks whose result is discarded) and the
embedding and output tables are gathered in full once.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.distributed.tensor import DTensor

from dibs.core.batching import chunk_by_tokens, pad_right
from dibs.core.grad_norms import grad_norms
from dibs.lit.evaluation import reduce_sum

__all__ = ["accept_rates", "policy_grad_norms", "to_global"]


def accept_rates(rewards: Sequence[Sequence[float]], threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the fraction of samples scored above ``threshold`` and the number of samples."""
    counts = np.array([len(r) for r in rewards], dtype=np.float64)
    hits = np.array([sum(x > threshold for x in r) for r in rewards], dtype=np.float64)
    return np.divide(hits, counts, out=np.zeros_like(hits), where=counts > 0), counts


def to_global(trainer: L.Trainer, local: np.ndarray, num_prompts: int) -> np.ndarray:
    """This rank's values (its prompts are the global ones at rank::world) → the global array, on every rank."""
    out = np.zeros(num_prompts, dtype=np.float64)
    out[trainer.global_rank :: trainer.world_size] = local
    return reduce_sum(trainer, out)


def _full(weight: torch.Tensor) -> torch.Tensor:
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def policy_grad_norms(
    trainer: L.Trainer,
    policy: Any,
    rows: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    param: str,
    reduction: str,
    token_budget: int,
    pad_id: int,
) -> np.ndarray:
    """‖∂(−Σ log π(response | prompt))/∂param‖ for each (prompt_ids, response_ids) row; [len(rows)]."""
    embed_param, head_param = policy.get_input_embeddings().weight, policy.get_output_embeddings().weight
    tied = embed_param is head_param
    embed = _full(embed_param).detach()
    head = embed if tied else _full(head_param).detach()
    device = trainer.strategy.root_device

    def hidden_fn(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # through the root module, whose FSDP2 hooks gather its own parameters (final norm, tables); the last
        # hidden state is the final norm's output, the input of the output projection
        out = policy(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1]

    lengths = [len(p) + len(r) for p, r in rows]
    order = sorted(range(len(rows)), key=lengths.__getitem__)  # similar lengths share a chunk: less padding
    chunks = [[order[i] for i in c] for c in chunk_by_tokens([lengths[i] for i in order], 0, token_budget)]
    counts = np.zeros(trainer.world_size)
    counts[trainer.global_rank] = len(chunks)
    rounds = int(reduce_sum(trainer, counts).max())  # every rank runs as many forwards (FSDP collectives)
    out = np.zeros(len(rows))
    for k in range(rounds):
        chunk = chunks[k] if k < len(chunks) else None
        picked = [rows[i] for i in chunk] if chunk is not None else [(torch.tensor([pad_id]), torch.tensor([pad_id]))]
        ids, mask = pad_right([torch.cat([p, r]) for p, r in picked], pad_id)
        response, _ = pad_right([torch.cat([torch.zeros(len(p)), torch.ones(len(r))]) for p, r in picked], 0)
        norms = grad_norms(
            hidden_fn,
            embed,
            head,
            ids.to(device),
            mask.to(device),
            response.to(device),
            param=param,
            reduction=reduction,
            padding_idx=getattr(policy.get_input_embeddings(), "padding_idx", None),
        )
        if chunk is not None:
            out[list(chunk)] = norms.cpu().numpy()
    return out
