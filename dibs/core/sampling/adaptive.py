"""Reinforce-Ada (arXiv 2510.04996; code RLHFlow/Reinforce-Ada, ``verl/trainer/ppo/ray_trainer.py``): sampling in
rounds with successive elimination, a fixed group size for the update, and a baseline from the whole pool.

Rounds of ``round_samples`` (M) for every prompt still active, at most ``max_rounds`` (R). After each round a
prompt leaves when its exit rule holds over everything drawn for it so far:

- ``balance``: at least n//2 accepted and n − n//2 rejected samples (n = ``group_size``);
- ``positive``: at least one accepted sample.

The group it trains on is n of its samples, balanced: a = min(n//2, accepted) accepted ones and
b = min(n − a, rejected) rejected ones, topped up from the accepted, then the rejected, the first drawn of each
first (the authors' order). A prompt still active after R rounds trains on the same balanced pick. Advantages are
A = r − (accepted / drawn) over the prompt's WHOLE pool, not the kept group (``baselines``), and no std division,
so a kept all-accepted group of a prompt that also failed still carries a gradient.

Choices (docs/reference.md, "Competing strategies"): samples per iteration are capped at ``budget_per_prompt`` ×
prompts for equal-cost comparisons (the E-step trims the last round, largest requests first; the authors have no
cap); a sample is accepted when its reward is above 0.5 (their τ = 0.7 gives the same split on binary rewards); the
estimation-based and sequential variants of the paper's v3 are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dibs.core.sampling.base import ACCEPT, Request, RoundTally, StrategyBase

__all__ = ["ReinforceAda", "balanced_pick"]

EXITS = ("balance", "positive")


def balanced_pick(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Bool mask of the ``group_size`` samples a prompt trains on, from its rewards in the order drawn.

    >>> balanced_pick(np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]), 4).astype(int).tolist()
    [1, 1, 0, 1, 1, 0, 0, 0]
    """
    rewards = np.asarray(rewards)
    pos, neg = np.flatnonzero(rewards > ACCEPT), np.flatnonzero(rewards <= ACCEPT)
    a = min(group_size // 2, len(pos))
    b = min(group_size - a, len(neg))
    a = min(group_size - b, len(pos))  # top up from the accepted, then (above) the rejected
    b = min(group_size - a, len(neg))
    mask = np.zeros(len(rewards), dtype=bool)
    mask[pos[:a]] = True
    mask[neg[:b]] = True
    return mask


@dataclass
class ReinforceAda(StrategyBase):
    """Rounds until each prompt's exit rule holds; a balanced group of ``group_size`` trains, with the pool's mean
    as baseline. Every setting comes from ``conf/allocation/reinforce_ada.yaml``."""

    group_size: int  # n: samples a prompt trains on
    round_samples: int  # M: samples per active prompt per round
    max_rounds: int  # R
    exit: str  # balance | positive
    budget_per_prompt: int  # the iteration's cap, per prompt (R x M: no cap)
    pool_baseline = True  # advantages r − the pool's mean (``baselines``); a class attribute, not a setting

    def __post_init__(self) -> None:
        if min(self.group_size, self.round_samples, self.max_rounds, self.budget_per_prompt) < 1:
            raise ValueError(
                "allocation.group_size, round_samples, max_rounds and budget_per_prompt must be >= 1, got "
                f"{self.group_size}, {self.round_samples}, {self.max_rounds}, {self.budget_per_prompt}"
            )
        if self.exit not in EXITS:
            raise ValueError(f"allocation.exit={self.exit!r} is not one of {EXITS}")
        self._drawn = self._hits = np.zeros(0)
        self._active = np.zeros(0, dtype=bool)
        self._rounds = 0

    def max_samples(self, num_prompts: int) -> int:
        return min(self.budget_per_prompt, self.max_rounds * self.round_samples) * num_prompts

    def begin(self, iteration: int, pool: np.ndarray) -> Request:
        count = len(pool)
        self._drawn, self._hits = np.zeros(count), np.zeros(count)
        self._active, self._rounds = np.ones(count, dtype=bool), 0
        return Request(np.full(count, self.round_samples, dtype=np.int64))

    def next(self, tally: RoundTally) -> Request | None:
        self._drawn += tally.samples
        self._hits += tally.hits
        self._rounds += 1
        pos, neg = self._hits, self._drawn - self._hits
        if self.exit == "balance":
            done = (pos >= self.group_size // 2) & (neg >= self.group_size - self.group_size // 2)
        else:
            done = pos >= 1
        self._active &= ~done
        if self._rounds >= self.max_rounds or not self._active.any():
            return None
        return Request(np.where(self._active, self.round_samples, 0).astype(np.int64))

    def keep(self, prompt: int, rewards: Sequence[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(r) for r in rewards]
        mask = balanced_pick(np.concatenate([np.asarray(r, dtype=np.float64) for r in rewards] or [np.zeros(0)]),
                             self.group_size)  # fmt: skip
        return list(np.split(mask, np.cumsum(sizes)[:-1])) if sizes else []

    def baselines(self) -> np.ndarray | None:
        """[P] each prompt's accepted fraction over everything drawn for it this iteration."""
        return np.divide(self._hits, self._drawn, out=np.zeros(len(self._drawn)), where=self._drawn > 0)
