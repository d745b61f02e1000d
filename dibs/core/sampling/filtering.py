"""Strategies that choose which prompts train from a first look at their samples: Pilot-Commit and DAPO's dynamic
sampling. Both count every sample they draw, the ones of groups they drop included.

Pilot-Commit (arXiv 2605.26606; code databricks/pilot-commit, ``recipe/pc/pc_ray_trainer.py``), synchronous
("PC-sync"): a pilot of ``pilot_samples`` per prompt; a prompt passes when ``pass_low`` ≤ p̂ ≤ ``pass_high``;
the rest of the budget B = ``n_per_prompt`` × prompts is committed to the passing prompts, ⌊rest / |S|⌋ each,
the remainder one each to the highest p̂ (1 − p̂) (ties: lowest position); a passing prompt trains on its pilot
and commit samples together, the others on nothing. With no passing prompt the rest is spread over every prompt
and everything trains. ``evict``: a prompt with p̂ = 1 gets no pilot when it comes back. The code commits a round
after the pilot and trains on stale pilot samples; the kit pilots, filters and commits in one iteration.

DAPO dynamic sampling (arXiv 2503.14476, Eq. 11; verl ``recipe/dapo``, ``filter_groups``): the iteration's prompts
are taken in batches of ``batch_prompts``; each batch gets ``n_per_prompt`` samples per prompt, and the groups
whose rewards are all equal (all accepted or all rejected: GRPO's zero-advantage groups) are dropped; batches
continue until ``train_prompts`` groups are kept or the iteration's prompts run out. The first ``train_prompts``
kept groups train (in prompt order), surplus ones are dropped. Out of prompts, the kit trains on the groups it has
(verl raises an error). Rewards are taken as binary: a group is all-equal when none or all of it is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dibs.core.sampling.base import Request, RoundTally, StrategyBase, keep_all

__all__ = ["DynamicSampling", "PilotCommit"]


@dataclass
class PilotCommit(StrategyBase):
    """Pilot every prompt, commit the rest of the budget to the prompts whose pilot rate is in the band."""

    n_per_prompt: int
    pilot_samples: int
    pass_low: float
    pass_high: float
    evict: bool

    def __post_init__(self) -> None:
        if not 1 <= self.pilot_samples <= self.n_per_prompt:
            raise ValueError(
                f"allocation needs 1 <= pilot_samples <= n_per_prompt, got {self.pilot_samples}, {self.n_per_prompt}"
            )
        if not 0.0 <= self.pass_low <= self.pass_high <= 1.0:
            raise ValueError(f"allocation needs 0 <= pass_low <= pass_high <= 1, got {self.pass_low}, {self.pass_high}")
        self.evicted: set[int] = set()
        self._pool, self._passed, self._round = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), 0

    def max_samples(self, num_prompts: int) -> int:
        return self.n_per_prompt * num_prompts

    def begin(self, iteration: int, pool: np.ndarray) -> Request:
        self._pool, self._round = np.asarray(pool, dtype=np.int64), 0
        live = np.array([int(i) not in self.evicted for i in self._pool], dtype=bool)
        return Request(np.where(live, self.pilot_samples, 0).astype(np.int64), pilot=True)

    def next(self, tally: RoundTally) -> Request | None:
        self._round += 1
        if self._round > 1:
            return None
        p = tally.accept_rate
        drawn = tally.samples > 0
        self._passed = drawn & (p >= self.pass_low) & (p <= self.pass_high)
        if self.evict:
            self.evicted.update(int(i) for i in self._pool[drawn & (p >= 1.0)])
        rest = self.max_samples(len(p)) - int(tally.samples.sum())
        counts = np.zeros(len(p), dtype=np.int64)
        chosen = np.flatnonzero(self._passed) if self._passed.any() else np.arange(len(p))
        share, extra = divmod(max(rest, 0), len(chosen))
        counts[chosen] = share
        order = chosen[np.argsort(-(p[chosen] * (1.0 - p[chosen])), kind="stable")]  # highest variance first
        counts[order[:extra]] += 1
        return Request(counts)

    def keep(self, prompt: int, rewards: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not self._passed.any() or self._passed[prompt]:
            return keep_all(rewards)
        return [np.zeros(len(r), dtype=bool) for r in rewards]

    def state_dict(self) -> dict[str, Any]:
        return {"evicted": sorted(self.evicted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evicted = {int(i) for i in state["evicted"]}


@dataclass
class DynamicSampling(StrategyBase):
    """DAPO's dynamic sampling: batches of prompts until ``train_prompts`` groups with unequal rewards are kept."""

    n_per_prompt: int
    batch_prompts: int
    train_prompts: int

    def __post_init__(self) -> None:
        if min(self.n_per_prompt, self.batch_prompts, self.train_prompts) < 1:
            raise ValueError(
                "allocation.n_per_prompt, batch_prompts and train_prompts must be >= 1, got "
                f"{self.n_per_prompt}, {self.batch_prompts}, {self.train_prompts}"
            )
        self._kept = np.zeros(0, dtype=bool)
        self._next = 0

    @property
    def rows_per_prompt(self) -> int:
        return self.n_per_prompt

    def max_samples(self, num_prompts: int) -> int:
        return self.n_per_prompt * num_prompts

    def begin(self, iteration: int, pool: np.ndarray) -> Request:
        self._kept = np.zeros(len(pool), dtype=bool)
        self._next = 0
        return self._batch(len(pool))

    def _batch(self, num_prompts: int) -> Request | None:
        start, stop = self._next, min(self._next + self.batch_prompts, num_prompts)
        if start >= stop:
            return None
        counts = np.zeros(num_prompts, dtype=np.int64)
        counts[start:stop] = self.n_per_prompt
        self._next = stop
        return Request(counts)

    def next(self, tally: RoundTally) -> Request | None:
        drawn = tally.samples > 0
        unequal = drawn & (tally.hits > 0) & (tally.hits < tally.samples)
        for j in np.flatnonzero(unequal):  # in prompt order, up to train_prompts
            if self._kept.sum() < self.train_prompts:
                self._kept[j] = True
        if self._kept.sum() >= self.train_prompts:
            return None
        return self._batch(len(tally.samples))

    def keep(self, prompt: int, rewards: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [np.full(len(r), bool(self._kept[prompt])) for r in rewards]
