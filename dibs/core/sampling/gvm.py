"""GVM's sampling: a pilot round estimates p_i and G_i, the allocation rule (``dibs.core.gvm``) spreads N
samples over the prompts, and a second round draws what the pilot did not already provide.

The pilot and estimate settings (docs/method.md, "GVM's E-step"):

- ``reuse_pilot``: the pilot's samples count towards n_i (min(n_i, N') of them train, stage 2 draws the rest);
  the reference discards them and draws all n_i afresh.
- ``refresh_every`` (r): every prompt is piloted on iterations 1, 1 + r, 1 + 2r, ...; in between only the
  prompts never estimated before, the others reuse their stored estimates.
- ``online``: no pilot for a prompt estimated before; after each iteration its estimates are taken from its
  training samples (p from all of them, G from up to N' accepted ones).
- ``grad``: what G_i is measured on (``GradSettings``).

Estimates are stored per train-pool prompt (identical on every rank) and saved in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dibs.core.gvm import Allocation, GVMRule, PromptStats, Rounding, gvm_allocate
from dibs.core.sampling.base import GradSettings, Request, RoundTally, StrategyBase

__all__ = ["GVM"]


@dataclass
class GVM(StrategyBase):
    """GVM in two rounds: a pilot of ``pilot_samples`` per prompt, then N = ``n_per_prompt`` × prompts
    allocated by Proposition 1. Every setting comes from ``conf/allocation/gvm.yaml``."""

    n_per_prompt: int
    pilot_samples: int
    alpha: float
    beta: float
    filter_threshold: float
    filter_insufficient: float
    rounding: Rounding
    prior: tuple[float, float] | None
    reserve: float
    min_per_prompt: int
    max_per_prompt: int | None
    align: int
    grad_param: str
    grad_reduction: str
    grad_in_generator: bool
    grad_eos: bool
    reuse_pilot: bool
    refresh_every: int
    online: bool

    def __post_init__(self) -> None:
        if self.n_per_prompt < 1 or self.pilot_samples < 1:
            raise ValueError(
                f"allocation.n_per_prompt and allocation.pilot_samples must be >= 1, got {self.n_per_prompt}, "
                f"{self.pilot_samples}"
            )
        if self.refresh_every < 1:
            raise ValueError(f"allocation.refresh_every must be >= 1, got {self.refresh_every}")
        self.rule = GVMRule(
            alpha=self.alpha,
            beta=self.beta,
            filter_threshold=self.filter_threshold,
            filter_insufficient=self.filter_insufficient,
            rounding=self.rounding,
            prior=None if self.prior is None else tuple(self.prior),
            reserve=self.reserve,
            min_per_prompt=self.min_per_prompt,
            max_per_prompt=self.max_per_prompt,
            align=self.align,
        )
        self.grad = GradSettings(self.grad_param, self.grad_reduction, self.grad_in_generator, self.grad_eos)
        self.training_grad_norms = self.pilot_samples if self.online else 0
        self.store: dict[int, tuple[float, float, float]] = {}  # train prompt -> (p, G, samples) last measured
        self._pool = np.zeros(0, dtype=np.int64)
        self._piloted = np.zeros(0, dtype=bool)
        self._kept = np.zeros(0, dtype=np.int64)
        self._round = 0

    def max_samples(self, num_prompts: int) -> int:
        return (self.pilot_samples + self.n_per_prompt) * num_prompts

    def begin(self, iteration: int, pool: np.ndarray) -> Request:
        """The pilot: every prompt on a refresh iteration, else (and always online) only the unestimated ones."""
        self._pool, self._round = np.asarray(pool, dtype=np.int64), 0
        if not self.online and iteration % self.refresh_every == 0:
            self._piloted = np.ones(len(pool), dtype=bool)
        else:
            self._piloted = np.array([int(i) not in self.store for i in self._pool], dtype=bool)
        return Request(np.where(self._piloted, self.pilot_samples, 0).astype(np.int64), pilot=True, grad_norms=True)

    def next(self, tally: RoundTally) -> Request | None:
        self._round += 1
        if self._round > 1:
            return None
        stats = self._merge(tally)
        allocation = self.allocate(stats)
        self._kept = np.minimum(allocation.n, tally.samples.astype(np.int64)) if self.reuse_pilot else 0 * allocation.n
        return Request(allocation.n - self._kept, estimates=stats, allocation=allocation)

    def allocate(self, stats: PromptStats) -> Allocation:
        return gvm_allocate(stats, self.n_per_prompt * len(stats.accept_rate), self.rule)

    def keep(self, prompt: int, rewards: Sequence[np.ndarray]) -> list[np.ndarray]:
        pilot, *rest = rewards
        masks = [np.arange(len(pilot)) < self._kept[prompt]]  # the first min(n_i, N') pilot samples, if reused
        return masks + [np.ones(len(r), dtype=bool) for r in rest]

    def observe_training(self, tally: RoundTally) -> None:
        if not self.online:
            return
        p = tally.accept_rate
        for j, i in enumerate(self._pool):
            if tally.samples[j] > 0:
                self.store[int(i)] = (float(p[j]), float(tally.grad_norm[j]), float(tally.samples[j]))

    def _merge(self, tally: RoundTally) -> PromptStats:
        """The pilot's estimates where a pilot ran (and stored for later), the stored ones elsewhere."""
        p, g, m = tally.accept_rate, tally.grad_norm.copy(), tally.samples.astype(np.float64)
        for j, i in enumerate(self._pool):
            if self._piloted[j]:
                self.store[int(i)] = (float(p[j]), float(g[j]), float(m[j]))
            else:
                p[j], g[j], m[j] = self.store[int(i)]
        return PromptStats(accept_rate=p, grad_norm=g, samples=m)

    def state_dict(self) -> dict[str, Any]:
        return {"index": list(self.store), "values": [list(v) for v in self.store.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store = {int(i): tuple(v) for i, v in zip(state["index"], state["values"])}
