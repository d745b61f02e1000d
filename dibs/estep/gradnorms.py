"""Gradient norms G_i for the E-step: ‖∂(−Σ_t log π(y_t | x, y_<t))/∂θ‖ of a prompt's accepted samples.

G_i w.r.t. ``lm_head`` comes from the generator's own log-prob pass when the backend offers it
(``Completion.head_grad_norm``; the generator holds the policy's current weights), so no forward runs here.
Otherwise G_i is measured on the training policy with the fast paths of ``dibs.core.grad_norms``, in chunks of
at most ``token_budget`` tokens. Under FSDP2 the forward passes are collectives, so every rank runs the same
number of chunks (ranks with fewer samples run small padding chunks whose result is discarded) and the
embedding and output tables are gathered in full once.

``GradSettings.eos`` false leaves the final EOS token out of the sum, as the reference does (it re-tokenises the
decoded text, which has no EOS); the generator's closed form includes it, so that setting measures on the policy.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from dibs.core.batching import chunk_by_tokens, pad_right
from dibs.core.grad_norms import all_grad_norms, grad_norms
from dibs.core.sampling import GradSettings
from dibs.estep.dist import Dist
from dibs.rollout.base import Completion

__all__ = ["GradNormMeter", "policy_grad_norms"]


def _full(weight: torch.Tensor) -> torch.Tensor:
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def policy_grad_norms(
    policy: Any,
    rows: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    param: str,
    reduction: str,
    token_budget: int,
    pad_id: int,
    dist: Dist,
) -> np.ndarray:
    """‖∂(−Σ log π(response | prompt))/∂param‖ for each (prompt_ids, response_ids) row; [len(rows)]."""
    embed_param, head_param = policy.get_input_embeddings().weight, policy.get_output_embeddings().weight
    tied = embed_param is head_param
    embed = _full(embed_param).detach()
    head = embed if tied else _full(head_param).detach()
    device = dist.device

    def hidden_fn(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # through the root module, whose FSDP2 hooks gather its own parameters (final norm, tables); the last
        # hidden state is the final norm's output, the input of the output projection
        out = policy(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1]

    lengths = [len(p) + len(r) for p, r in rows]
    order = sorted(range(len(rows)), key=lengths.__getitem__)  # similar lengths share a chunk: less padding
    chunks = [[order[i] for i in c] for c in chunk_by_tokens([lengths[i] for i in order], 0, token_budget)]
    counts = np.zeros(dist.world)
    counts[dist.rank] = len(chunks)
    rounds = int(dist.sum(counts).max())  # every rank runs as many forwards (FSDP collectives)
    out = np.zeros(len(rows))
    for k in range(rounds):
        chunk = chunks[k] if k < len(chunks) else None
        picked = [rows[i] for i in chunk] if chunk is not None else [(torch.tensor([pad_id]), torch.tensor([pad_id]))]
        ids, mask = pad_right([torch.cat([p, r]) for p, r in picked], pad_id)
        response, _ = pad_right([torch.cat([torch.zeros(len(p)), torch.ones(len(r))]) for p, r in picked], 0)
        rows_on_device = (ids.to(device), mask.to(device), response.to(device))
        common = dict(reduction=reduction, padding_idx=getattr(policy.get_input_embeddings(), "padding_idx", None))
        if param == "all":
            logits_fn = lambda e, m: policy(inputs_embeds=e, attention_mask=m, use_cache=False).logits  # noqa: E731
            head_module = policy.get_output_embeddings()
            norms = all_grad_norms(logits_fn, policy, embed, head_module, *rows_on_device, tied=tied, **common)
        else:
            norms = grad_norms(hidden_fn, embed, head, *rows_on_device, param=param, **common)
        if chunk is not None:
            out[list(chunk)] = norms.cpu().numpy()
    return out


class GradNormMeter:
    """Per-prompt mean G_i over given samples (0 for a prompt without one), from the generator's closed form or
    the policy's fast paths. A collective on the policy path: every rank calls it as often."""

    def __init__(
        self, settings: GradSettings, *, policy: Any, dist: Dist, token_budget: int, pad_id: int, generator: Any
    ) -> None:
        self.settings, self.policy, self.dist = settings, policy, dist
        self.token_budget, self.pad_id = token_budget, pad_id
        # the same on every rank: it depends on the configuration and the backend only
        self.from_generator = (
            settings.param == "lm_head"
            and settings.in_generator
            and settings.eos
            and getattr(generator, "measures_head_grad_norms", False)
        )
        self.seconds = 0.0  # spent measuring on the policy (the generator's closed form is within generation)

    def per_prompt(self, prompts: Sequence[Sequence[int]], groups: Sequence[Sequence[Completion]]) -> np.ndarray:
        """[len(groups)] this rank's per-prompt means; ``groups[j]``: the samples of ``prompts[j]`` to measure."""
        count = len(groups)
        if self.settings.param == "none":  # G_i = 1 where a sample is given (solved), 0 elsewhere
            return np.array([float(len(g) > 0) for g in groups], dtype=np.float64)
        owner = [j for j, g in enumerate(groups) for _ in g]
        flat = [c for g in groups for c in g]
        if self.from_generator:
            norms = np.array([_generator_norm(c, self.settings.reduction) for c in flat], dtype=np.float64)
        else:
            started = time.perf_counter()
            rows = [(torch.as_tensor(prompts[j]), self._response(c)) for j, c in zip(owner, flat)]
            norms = policy_grad_norms(
                self.policy,
                rows,
                param=self.settings.param,
                reduction=self.settings.reduction,
                token_budget=self.token_budget,
                pad_id=self.pad_id,
                dist=self.dist,
            )
            self.seconds += time.perf_counter() - started
        sums = np.bincount(owner, weights=norms, minlength=count) if owner else np.zeros(count)
        counts = np.bincount(owner, minlength=count) if owner else np.zeros(count)
        return np.divide(sums, counts, out=np.zeros(count), where=counts > 0)

    def _response(self, completion: Completion) -> torch.Tensor:
        ids = torch.as_tensor(completion.token_ids)
        if not self.settings.eos and completion.finish_reason == "stop" and len(ids) > 1:
            return ids[:-1]  # the reference's re-tokenised text has no EOS
        return ids


def _generator_norm(completion: Any, reduction: str) -> float:
    if completion.head_grad_norm is None:
        raise RuntimeError(
            "the generator returned a sample without head_grad_norm although it was asked for one; "
            "set allocation.grad_in_generator=false to measure G_i on the training policy"
        )
    return completion.head_grad_norm / (max(len(completion.token_ids), 1) if reduction == "mean" else 1)
