"""Knapsack-RL (Li et al., arXiv 2509.25849; code liziniu/KnapsackRL, ``verl/trainer/ppo/exploration_utils.py``):
per-prompt sample counts from a knapsack over (prompt, count) items, with each prompt's success rate p̂ taken
from its earlier visits.

Value of giving a prompt N samples, V(N, p) = (1 − p^N − (1 − p)^N) · p (1 − p)²: the probability of a non-zero
GRPO gradient times the "information gain" p (1 − p)². V = 0 at p ∈ {0, 1}. With a budget B = n × prompts:

1. base counts: a prompt not yet valid (fewer than ``min_history`` samples over its visits) gets n; p̂ = 0 and
   p̂ = 1 get ``n_low``; prompts with 0 < p̂ < 1 (effective) get ``n_low``. R = B − Σ base.
2. no effective prompt: R is spread evenly over the p̂ = 0 prompts; with none of those either, every prompt gets
   n (uniform).
3. fallback: need_i = ⌊min(n_max, ln 0.1 / ln max(p̂_i, 1 − p̂_i))⌋ (samples for a 90% chance of a non-zero
   gradient). If Σ need < R, the surplus R − Σ need is spread evenly over the p̂ = 0 prompts (or over every
   non-effective prompt when none is unsolved) and R = Σ need.
4. R extra samples over the effective prompts, each at most n_max in all, maximising Σ V(N_i, p̂_i). The marginal
   gain of one more sample falls with N, so giving them one at a time to the largest gain (ties: lowest
   position) is the knapsack's optimum. What the caps leave is spread evenly over the effective prompts.

Choices where the paper and code leave room (docs/reference.md, "Competing strategies"):
- the code scores "no extra sample" as V = 0 instead of V(n_low, p̂), which pushes every effective prompt to at
  least one extra; the kit solves the clean problem (``code_faithful=true`` restores the quirk);
- "spread evenly": ⌊share⌋ each, the remainder one each to the first prompts in iteration order;
- p̂ per prompt: the success rate of its last visit when that visit drew at least ``window`` samples, otherwise of
  its last ``window`` samples across visits (whole visits, newest first; the oldest visit counted in part, at its
  own rate, since only per-visit counts are kept);
- advantages are plain GRPO over the groups (the paper also clips them to ±5: not done here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dibs.core.sampling.base import Request, RoundTally, StrategyBase

__all__ = ["Knapsack", "knapsack_allocate", "knapsack_value"]


def knapsack_value(n: np.ndarray | float, p: np.ndarray | float) -> np.ndarray:
    """V(N, p) = (1 − p^N − (1 − p)^N) · p (1 − p)².

    >>> round(float(knapsack_value(5, 0.5)), 6)
    0.117188
    """
    n, p = np.asarray(n, dtype=np.float64), np.asarray(p, dtype=np.float64)
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


def _spread(counts: np.ndarray, where: np.ndarray, amount: int) -> None:
    """Add ``amount`` evenly over the positions ``where`` (the remainder one each to the first)."""
    if amount <= 0 or len(where) == 0:
        return
    share, rest = divmod(int(amount), len(where))
    counts[where] += share
    counts[where[:rest]] += 1


def knapsack_allocate(
    p_hat: np.ndarray,
    valid: np.ndarray,
    budget: int,
    *,
    n: int,
    n_low: int,
    n_max: int,
    code_faithful: bool,
) -> np.ndarray:
    """Integer N_i summing to ``budget`` (see the module docstring); ``p_hat`` is ignored where not ``valid``."""
    p_hat, valid = np.asarray(p_hat, dtype=np.float64), np.asarray(valid, dtype=bool)
    count = len(p_hat)
    if budget < n_low * count:
        raise ValueError(f"a budget of {budget} cannot give {count} prompts n_low={n_low} samples each")
    unsolved, solved = valid & (p_hat <= 0.0), valid & (p_hat >= 1.0)
    effective = valid & ~unsolved & ~solved
    counts = np.where(valid, n_low, n).astype(np.int64)
    rest = budget - int(counts.sum())
    if rest < 0:  # the invalid prompts' n alone overspend: uniform
        return _uniform(budget, count)
    if not effective.any():
        if unsolved.any():
            _spread(counts, np.flatnonzero(unsolved), rest)
            return counts
        return _uniform(budget, count)
    eff = np.flatnonzero(effective)
    p = p_hat[eff]
    need = np.floor(np.minimum(n_max, np.log(0.1) / np.log(np.maximum(p, 1.0 - p)))).astype(np.int64)
    if need.sum() < rest:
        receivers = np.flatnonzero(unsolved) if unsolved.any() else np.flatnonzero(~effective)
        if len(receivers):
            _spread(counts, receivers, rest - int(need.sum()))
            rest = int(need.sum())
    extra = np.zeros(len(eff), dtype=np.int64)
    for _ in range(rest):
        size = n_low + extra
        gain = knapsack_value(size + 1, p) - knapsack_value(size, p)
        if code_faithful:  # the code scores "no extra" as 0: the first extra gains V(n_low + 1) in full
            gain = np.where(extra == 0, knapsack_value(size + 1, p), gain)
        gain = np.where(size < n_max, gain, -np.inf)
        if not np.isfinite(gain).any():
            break
        extra[int(np.argmax(gain))] += 1
    counts[eff] += extra
    _spread(counts, eff, budget - int(counts.sum()))
    return counts


def _uniform(budget: int, count: int) -> np.ndarray:
    counts = np.zeros(count, dtype=np.int64)
    _spread(counts, np.arange(count), budget)
    return counts


@dataclass
class Knapsack(StrategyBase):
    """Knapsack-RL as one allocated round per iteration, p̂ from each prompt's earlier visits (the first visit of
    every prompt is uniform). Every setting comes from ``conf/allocation/knapsack.yaml``."""

    n_per_prompt: int  # n: B = n × prompts, and what a not-yet-valid prompt gets
    n_low: int  # the base count of a valid prompt
    n_max: int  # the most one prompt gets
    min_history: int  # samples over its visits before a prompt's p̂ is used
    window: int  # p̂ from the last visit if it drew this many, else from the last this-many samples
    code_faithful: bool  # the reference code's "no extra sample scores 0" quirk

    def __post_init__(self) -> None:
        if not 1 <= self.n_low <= self.n_per_prompt <= self.n_max:
            raise ValueError(
                f"allocation needs 1 <= n_low <= n_per_prompt <= n_max, got n_low={self.n_low}, "
                f"n_per_prompt={self.n_per_prompt}, n_max={self.n_max}"
            )
        if self.min_history < 1 or self.window < 1:
            raise ValueError(f"allocation.min_history and window must be >= 1, got {self.min_history}, {self.window}")
        self.visits: dict[int, list[tuple[int, int]]] = {}  # train prompt -> [(samples, hits)] of its visits
        self._pool = np.zeros(0, dtype=np.int64)

    def max_samples(self, num_prompts: int) -> int:
        return self.n_per_prompt * num_prompts

    def estimate(self, prompt: int) -> tuple[float, bool]:
        """(p̂, valid) of a train prompt from its visits."""
        visits = self.visits.get(prompt, [])
        if sum(m for m, _ in visits) < self.min_history:
            return 0.0, False
        m, h = visits[-1]
        if m >= self.window:
            return h / m, True
        taken, hits = 0.0, 0.0
        for m, h in reversed(visits):
            part = min(m, self.window - taken)
            taken, hits = taken + part, hits + part * h / m
            if taken >= self.window:
                break
        return hits / taken, True

    def begin(self, iteration: int, pool: np.ndarray) -> Request:
        self._pool = np.asarray(pool, dtype=np.int64)
        p_hat, valid = zip(*(self.estimate(int(i)) for i in self._pool)) if len(pool) else ((), ())
        counts = knapsack_allocate(
            np.array(p_hat),
            np.array(valid, dtype=bool),
            self.max_samples(len(pool)),
            n=self.n_per_prompt,
            n_low=self.n_low,
            n_max=self.n_max,
            code_faithful=self.code_faithful,
        )
        return Request(counts)

    def next(self, tally: RoundTally) -> Request | None:
        for i, m, h in zip(self._pool, tally.samples, tally.hits):
            if m > 0:
                self.visits.setdefault(int(i), []).append((int(m), int(h)))
                del self.visits[int(i)][: -max(self.window, self.min_history)]  # older visits are never read
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"index": list(self.visits), "visits": [[list(v) for v in vs] for vs in self.visits.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.visits = {int(i): [tuple(v) for v in vs] for i, vs in zip(state["index"], state["visits"])}
