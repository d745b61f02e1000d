"""GRESO (arXiv 2506.02177; code Infini-AI-Lab/GRESO, ``verl/trainer/ttis/presampling_selector.py``): skip, before
sampling, prompts whose recent groups were all correct or all wrong, with a probability that tunes itself; then
fill the batch as DAPO's dynamic sampling does.

Per prompt, a history of its groups: all accepted (easy), all rejected (hard) or mixed. z_e = the trailing run of
easy entries, z_h = the trailing run of hard entries (counted only when the last entry is hard). The prompt is
skipped with probability P = 1 − max(p_easy^z_e, 0.01) if z_e ≥ 1, else 1 − max(p_hard^z_h, 0.01) if z_h ≥ 1,
else 0 (new prompts are never skipped). After every iteration but the first, over the groups it sampled, with
e and h their easy and hard fractions and targets e* = α/3 and h* = 2α/3: p_easy moves by −``step`` if e ≥ e*, else
+``step``; p_hard likewise against h*. Both start at 0.5 and stay in [0.05, 0.95].

Batch fill: rounds over the prompts that were not skipped, in order: ``batch_prompts`` of them get ``n_per_prompt``
samples each, groups with all-equal rewards are dropped (and counted); while fewer than ``train_prompts`` groups are
kept, the next round takes est = ⌊1.25 · (train − kept) / (1 − ζ)⌋ prompts (ζ: the last round's all-equal fraction),
at least ``min_batch`` and at most ``batch_prompts``, until the prompts run out. The first ``train_prompts`` kept
groups train.

Choices (docs/reference.md, "Competing strategies"): easy and hard are all-accepted and all-rejected groups (the
code's hard test assumes its 0.1 reward for a wrong answer, which binary rewards never give); the skip draws come
from a generator seeded by (seed, iteration, prompt), the same on every rank; the pre-filter's 32-prompt chunks and
the trim to a multiple of the GPU count are left out (the E-step shards prompts itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dibs.core.sampling.base import Request, RoundTally, StrategyBase

__all__ = ["Greso", "skip_probability"]


def skip_probability(history: Sequence[str], p_easy: float, p_hard: float) -> float:
    """P_skip of a prompt whose groups, oldest first, were ``"easy"``, ``"hard"`` or ``"mixed"``.

    >>> skip_probability(["mixed", "easy", "easy"], 0.5, 0.5)
    0.75
    """

    def trailing(kind: str) -> int:
        run = 0
        for entry in reversed(history):
            if entry != kind:
                break
            run += 1
        return run

    easy, hard = trailing("easy"), trailing("hard")
    if easy >= 1:
        return 1.0 - max(p_easy**easy, 0.01)
    if hard >= 1:
        return 1.0 - max(p_hard**hard, 0.01)
    return 0.0


@dataclass
class Greso(StrategyBase):
    """Skip predictable prompts, then fill ``train_prompts`` groups with unequal rewards. Every setting comes from
    ``conf/allocation/greso.yaml``."""

    n_per_prompt: int
    batch_prompts: int  # B0: prompts of the first round
    min_batch: int  # the fewest prompts of a later round
    train_prompts: int  # groups the M-step trains on
    alpha: float  # the targets of the self-tuning: easy α/3, hard 2α/3
    step: float  # how far p_easy and p_hard move per iteration
    seed: int

    def __post_init__(self) -> None:
        if min(self.n_per_prompt, self.batch_prompts, self.min_batch, self.train_prompts) < 1:
            raise ValueError("allocation.n_per_prompt, batch_prompts, min_batch and train_prompts must be >= 1")
        self.p_easy = self.p_hard = 0.5
        self.history: dict[int, list[str]] = {}
        self._pool = np.zeros(0, dtype=np.int64)
        self._queue: list[int] = []  # positions not skipped and not yet sampled
        self._kept = np.zeros(0, dtype=bool)
        self._counts = {"easy": 0, "hard": 0, "groups": 0}
        self._iteration = 0

    @property
    def rows_per_prompt(self) -> int:
        return self.n_per_prompt

    def max_samples(self, num_prompts: int) -> int:
        return self.n_per_prompt * num_prompts

    def begin(self, iteration: int, pool: np.ndarray) -> Request | None:
        self._pool, self._iteration = np.asarray(pool, dtype=np.int64), iteration
        self._kept = np.zeros(len(pool), dtype=bool)
        self._counts = {"easy": 0, "hard": 0, "groups": 0}
        self._queue = []
        for j, i in enumerate(self._pool):
            u = np.random.default_rng([self.seed, iteration, int(i)]).random()
            if u >= skip_probability(self.history.get(int(i), []), self.p_easy, self.p_hard):
                self._queue.append(j)
        return self._round(self.batch_prompts)

    def _round(self, size: int) -> Request | None:
        chosen, self._queue = self._queue[:size], self._queue[size:]
        if not chosen:
            return None
        counts = np.zeros(len(self._pool), dtype=np.int64)
        counts[chosen] = self.n_per_prompt
        return Request(counts)

    def next(self, tally: RoundTally) -> Request | None:
        drawn = np.flatnonzero(tally.samples > 0)
        easy = tally.hits[drawn] >= tally.samples[drawn]
        hard = tally.hits[drawn] <= 0
        for j, e, h in zip(drawn, easy, hard):
            self.history.setdefault(int(self._pool[j]), []).append("easy" if e else "hard" if h else "mixed")
            if not (e or h) and self._kept.sum() < self.train_prompts:
                self._kept[j] = True
        self._counts["easy"] += int(easy.sum())
        self._counts["hard"] += int(hard.sum())
        self._counts["groups"] += len(drawn)
        missing = self.train_prompts - int(self._kept.sum())
        if missing <= 0:
            self._tune()
            return None
        zv = float((easy | hard).mean()) if len(drawn) else 0.0
        estimate = self.batch_prompts if zv >= 1.0 else int(1.25 * missing / (1.0 - zv))
        request = self._round(max(min(estimate, self.batch_prompts), self.min_batch))
        if request is None:
            self._tune()
        return request

    def _tune(self) -> None:
        """Move p_easy and p_hard towards their targets (not after the first iteration)."""
        groups = self._counts["groups"]
        if self._iteration == 0 or groups == 0:
            return
        easy, hard = self._counts["easy"] / groups, self._counts["hard"] / groups
        self.p_easy += -self.step if easy >= self.alpha / 3 else self.step
        self.p_hard += -self.step if hard >= 2 * self.alpha / 3 else self.step
        self.p_easy, self.p_hard = (float(np.clip(p, 0.05, 0.95)) for p in (self.p_easy, self.p_hard))

    def keep(self, prompt: int, rewards: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [np.full(len(r), bool(self._kept[prompt])) for r in rewards]

    def state_dict(self) -> dict[str, Any]:
        return {"p": [self.p_easy, self.p_hard], "index": list(self.history), "history": list(self.history.values())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p_easy, self.p_hard = (float(p) for p in state["p"])
        self.history = {int(i): list(h) for i, h in zip(state["index"], state["history"])}
