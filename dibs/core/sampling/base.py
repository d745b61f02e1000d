"""The sampling-strategy interface: how an iteration's sampling budget is spread over its prompts, in rounds.

An E-step (``dibs.estep.step``) asks a strategy for a first round of samples, draws them, verifies them and shows
the strategy what came back; the strategy answers with the next round or with ``None`` (stop). Every sample of
every round is counted; the E-step also stops when the strategy's ``max_samples`` for the iteration (or what is
left of a sample budget) is spent, trimming a round that would overshoot, largest requests first
(``fit_to_budget``). Every round drawn is shown to ``next``, the one that spends the cap included, so the
strategy's bookkeeping (kept groups, visit histories) sees all of them; a request made after the cap is not
drawn. Then the strategy says, for each prompt, which of its samples the M-step trains on (``keep``).

Everything a strategy sees is global: one entry per prompt of the iteration, summed over ranks
(``RoundTally``), so every rank takes the same decision without further communication. Strategies are pure
(numpy only); what needs the model (gradient norms G_i) is measured by the E-step when a ``Request`` asks for it.

    begin(iteration, pool)  ->  Request (round 1)
    next(tally of round k)  ->  Request (round k + 1) | None
    keep(prompt, rewards of every round)  ->  which samples train
    observe_training(tally of the training samples)    (estimates kept for later iterations, e.g. GVM online)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from dibs.core.gvm import Allocation, PromptStats

__all__ = ["GradSettings", "Request", "RoundTally", "Strategy", "StrategyBase", "fit_to_budget", "keep_all"]

ACCEPT = 0.5  # a sample is accepted (a "hit") when its reward is above this


@dataclass(frozen=True)
class GradSettings:
    """How the E-step measures a prompt's gradient norm G_i (``docs/method.md``, "Gradient norms")."""

    param: str  # lm_head | embed_tokens | all | none (G_i = 1 where solved)
    reduction: str  # sum (−Σ_t log π, the reference) | mean (per token)
    in_generator: bool  # lm_head: from the generator's own log-prob pass where the backend offers it
    eos: bool  # the final EOS token's term counts (the reference re-tokenises the text and has none)

    def __post_init__(self) -> None:
        if self.param not in ("embed_tokens", "lm_head", "all", "none"):
            raise ValueError(f"grad_param={self.param!r} is not 'lm_head', 'embed_tokens', 'all' or 'none'")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"grad_reduction={self.reduction!r} is not 'sum' or 'mean'")


@dataclass(frozen=True)
class Request:
    """One round: how many more samples each prompt of the iteration gets (global, [P] int)."""

    counts: np.ndarray
    pilot: bool = False  # drawn to estimate (logged under pilot/*); whether they train is ``keep``'s choice
    grad_norms: bool = False  # the E-step measures G_i on this round's accepted samples (``RoundTally.grad_norm``)
    estimates: PromptStats | None = None  # what the strategy knew when it asked (diagnostics)
    allocation: Allocation | None = None  # the allocation this round carries out (diagnostics)


@dataclass(frozen=True)
class RoundTally:
    """What a round (or the training samples) gave, per prompt of the iteration, summed over ranks."""

    samples: np.ndarray  # [P] drawn
    hits: np.ndarray  # [P] accepted (reward > 0.5)
    reward_sum: np.ndarray  # [P]
    grad_norm: np.ndarray | None = None  # [P] mean G over the measured accepted samples (0: none); None: not asked

    @property
    def accept_rate(self) -> np.ndarray:
        return np.divide(self.hits, self.samples, out=np.zeros(len(self.samples)), where=self.samples > 0)


class Strategy(Protocol):
    rows_per_prompt: int  # rows per prompt of a mini-batch under update_accounting=reference (verl's rollout.n)
    grad: GradSettings | None  # how G_i is measured when a request asks for it (None: never asked)
    training_grad_norms: int  # G_i over up to this many accepted training samples per prompt (0: not asked)
    pool_baseline: bool  # advantages are r − baselines()[prompt] (the mean of everything drawn), not the algo's

    def max_samples(self, num_prompts: int) -> int:
        """The most samples an iteration of ``num_prompts`` prompts generates (every round, pilots included)."""
        ...

    def begin(self, iteration: int, pool: np.ndarray) -> Request | None:
        """The first round (None: nothing to sample); ``pool`` [P]: the train-pool index of each prompt."""
        ...

    def next(self, tally: RoundTally) -> Request | None:
        """The next round after seeing ``tally``, or None to stop."""
        ...

    def keep(self, prompt: int, rewards: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Which samples of prompt ``prompt`` (its position in the iteration) train: a bool mask per round,
        given the rewards of its samples in each round. Local to the rank that holds the prompt."""
        ...

    def baselines(self) -> np.ndarray:
        """[P] per prompt, the baseline of ``pool_baseline`` strategies (asked after the rounds)."""
        ...

    def observe_training(self, tally: RoundTally) -> None:
        """The training samples' tally (with G_i when ``training_grad_norms`` > 0), after ``keep``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def keep_all(rewards: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.ones(len(r), dtype=bool) for r in rewards]


class StrategyBase:
    """What most strategies share: no gradient norms, no pool baseline, one row per sample, every sample trains,
    nothing observed after the rounds and nothing kept across iterations. A strategy overrides what it does."""

    grad: GradSettings | None = None
    training_grad_norms: int = 0
    pool_baseline: bool = False
    rows_per_prompt: int = 1

    def keep(self, prompt: int, rewards: Sequence[np.ndarray]) -> list[np.ndarray]:
        return keep_all(rewards)

    def baselines(self) -> np.ndarray:
        raise RuntimeError(f"{type(self).__name__} sets no pool baseline (pool_baseline is false)")

    def observe_training(self, tally: RoundTally) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def fit_to_budget(counts: np.ndarray, remaining: int) -> np.ndarray:
    """``counts`` trimmed to sum to at most ``remaining``: one sample at a time from the largest request
    (the later prompts first among equals), so a trimmed round stays as even as it can.

    >>> fit_to_budget(np.array([4, 1, 3]), 5).tolist()
    [2, 1, 2]
    """
    counts = np.asarray(counts, dtype=np.int64).copy()
    excess = int(counts.sum()) - max(int(remaining), 0)
    while excess > 0:
        top = counts.max()
        at_top = np.flatnonzero(counts == top)
        below = counts[counts < top].max(initial=0)
        # every prompt at the top comes down to `below`, or as far as the excess allows, last positions first
        step = min(excess, len(at_top) * int(top - below))
        full, extra = divmod(step, len(at_top))
        counts[at_top] -= full
        if extra:
            counts[at_top[len(at_top) - extra :]] -= 1
        excess -= step
    return counts
