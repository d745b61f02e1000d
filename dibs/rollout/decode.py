"""The HF backend's own decode loop: batched sampling with a KV cache, finished rows dropped, log-probs kept.

One call samples a response for every row of a left-padded prompt batch:

    prefill:  one forward over the prompts fills the KV cache; only the last position's logits are computed
    step t:   z = logits / T  ->  log p = log_softmax(z)  (the sampling distribution's log-probs, kept)
              z -> top-k -> top-p (``transformers``' TopK/TopPLogitsWarper rules, in generate()'s order)
              y_t ~ softmax(z)  (torch.multinomial); a row that drew EOS is finished
              finished rows leave the batch: their KV cache rows, mask and positions are dropped
              one forward of the live rows' new tokens extends the cache

so each step costs what the rows still running cost, where ``model.generate`` runs every row of a chunk until
its longest row ends. The log-prob of each drawn token is read from the same softmax the sampler used
(log π(y_t | x, y_<t) at temperature T, before top-k/top-p truncation, as the trainer's teacher-forced pass
defines it), so no second forward is needed for them. They equal a teacher-forced pass up to float rounding
(different matrix shapes sum in a different order): tests/rollout/test_decode.py measures it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from dibs.rollout.base import SamplingParams

__all__ = ["Decoded", "decode", "filter_logits"]


@dataclass(frozen=True)
class Decoded:
    tokens: torch.Tensor  # [R, T] int64, each row's response; a row's tokens past its length are padding
    logprobs: torch.Tensor  # [R, T] float32, log π(y_t | x, y_<t) at the sampling temperature
    lengths: torch.Tensor  # [R] int64, response length (an EOS drawn included)
    stopped: torch.Tensor  # [R] bool, the row drew EOS


def filter_logits(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then top-p (nucleus), with ``transformers``' rules: top-k keeps every token scoring at least the
    k-th best; top-p drops the low tail whose cumulative probability is at most 1 - top_p, keeping at least
    one token. ``scores`` [A, V] are temperature-scaled logits; dropped tokens get -inf."""
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # [A, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        tail = ordered.softmax(-1).cumsum(-1) <= (1 - top_p)  # [A, V] in ascending order
        tail[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
    return scores


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingParams,
    *,
    eos_token_id: int,
    pad_token_id: int,
) -> Decoded:
    """Sample one response per row of the left-padded ``input_ids`` [R, Lp] (``attention_mask`` marks the
    prompt tokens). Every row runs until it draws EOS or reaches ``sampling.max_new_tokens``."""
    rows, device = input_ids.shape[0], input_ids.device
    steps = sampling.max_new_tokens
    tokens = torch.full((rows, steps), pad_token_id, dtype=torch.long, device=device)  # [R, T]
    logprobs = torch.zeros(rows, steps, dtype=torch.float32, device=device)  # [R, T]
    lengths = torch.full((rows,), steps, dtype=torch.long, device=device)  # [R]
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)  # [R]
    live = torch.arange(rows, device=device)  # [A] the original rows still running
    mask = attention_mask.to(device=device, dtype=torch.long)  # [A, L]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [A, L] left padding: each row's prompt starts at 0
    cache = DynamicCache()
    cache_arg = _cache_argument(model)
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{cache_arg: cache},
        logits_to_keep=1,
    ).logits[:, -1]  # [A, V]
    position = positions[:, -1]  # [A]
    filtering = sampling.top_k > 0 or sampling.top_p < 1.0
    for t in range(steps):
        scores = logits.float()
        if sampling.temperature != 1.0:
            scores = scores / sampling.temperature
        logp = scores.log_softmax(-1)  # [A, V]
        probs = filter_logits(scores, sampling.top_k, sampling.top_p).softmax(-1) if filtering else logp.exp()
        drawn = torch.multinomial(probs, 1)  # [A, 1]
        tokens[live, t] = drawn[:, 0]
        logprobs[live, t] = logp.gather(-1, drawn)[:, 0]
        done = drawn[:, 0] == eos_token_id  # [A]
        if t + 1 == steps:
            stopped[live[done]] = True
            lengths[live[done]] = t + 1
            break
        if done.any():
            stopped[live[done]] = True
            lengths[live[done]] = t + 1
            keep = (~done).nonzero()[:, 0]  # [A']
            if len(keep) == 0:
                break
            live, drawn, mask, position = live[keep], drawn[keep], mask[keep], position[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)  # [A, L + 1]
        position = position + 1
        logits = model(
            input_ids=drawn,
            attention_mask=mask,
            position_ids=position[:, None],
            use_cache=True,
            **{cache_arg: cache},
        ).logits[:, -1]  # [A, V]
    return Decoded(tokens, logprobs, lengths, stopped)


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` in recent ``transformers``, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
