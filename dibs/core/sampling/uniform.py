"""Strategies that look at no estimate: RAFT's uniform best-of-n, and sampling until a prompt is solved."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dibs.core.sampling.base import Request, RoundTally, StrategyBase

__all__ = ["Uniform", "UntilSolved"]


@dataclass
class Uniform(StrategyBase):
    """n samples for every prompt, in one round: RAFT's best-of-n (and GRPO's group of n)."""

    n_per_prompt: int

    def __post_init__(self) -> None:
        if self.n_per_prompt < 1:
            raise ValueError(f"allocation.n_per_prompt must be >= 1, got {self.n_per_prompt}")

    @property
    def rows_per_prompt(self) -> int:
        return self.n_per_prompt

    def max_samples(self, num_prompts: int) -> int:
        return self.n_per_prompt * num_prompts

    def begin(self, iteration: int, pool: np.ndarray) -> Request:
        return Request(np.full(len(pool), self.n_per_prompt, dtype=np.int64))

    def next(self, tally: RoundTally) -> Request | None:
        return None


@dataclass
class UntilSolved(StrategyBase):
    """Rounds of ``per_round`` samples for every prompt not yet solved ``solved_at`` times, each prompt at most
    ``max_per_prompt`` samples: best-of-n that stops early on the prompts it has solved (every sample trains)."""

    per_round: int
    solved_at: int
    max_per_prompt: int

    def __post_init__(self) -> None:
        if min(self.per_round, self.solved_at, self.max_per_prompt) < 1:
            raise ValueError(
                "allocation.per_round, allocation.solved_at and allocation.max_per_prompt must be >= 1, got "
                f"{self.per_round}, {self.solved_at}, {self.max_per_prompt}"
            )
        self._drawn = self._hits = np.zeros(0)

    def max_samples(self, num_prompts: int) -> int:
        return self.max_per_prompt * num_prompts

    def begin(self, iteration: int, pool: np.ndarray) -> Request:
        self._drawn, self._hits = np.zeros(len(pool), dtype=np.int64), np.zeros(len(pool), dtype=np.int64)
        return Request(np.full(len(pool), min(self.per_round, self.max_per_prompt), dtype=np.int64))

    def next(self, tally: RoundTally) -> Request | None:
        self._drawn += tally.samples.astype(np.int64)
        self._hits += tally.hits.astype(np.int64)
        open_ = (self._hits < self.solved_at) & (self._drawn < self.max_per_prompt)
        counts = np.where(open_, np.minimum(self.per_round, self.max_per_prompt - self._drawn), 0)
        return Request(counts.astype(np.int64)) if counts.sum() else None
