"""GVM allocation: per-prompt sample counts that minimise the M-step's gradient variance bound under a total
budget N, with the reference's filters and rounding and the kit's fixes (docs/method.md, "Allocation").

Proposition 1 of the GVM paper minimises  Σ_i G_i² / (p_i n_i) · 1 / (1 + α / p_i^β)  subject to Σ_i n_i = N:

    w_i = G_i / sqrt(p_i + α / p_i^(β−1))        (w_i = 0 when p_i == 0 or G_i == 0)
    x_i = N · w_i / Σ_l w_l                       (continuous), then integers with Σ n_i == N exactly

The reference behaviour (``em/stage_2_calc_sample_size.py`` of RLHFlow/GVM) is what ``conf/allocation/gvm.yaml``
sets: raw pilot rates, ``filter_threshold`` and ``filter_insufficient`` applied to the normalised ratios in that
order, and largest-remainder rounding (``np.round``, then ±1 on the largest residuals). Options of ``GVMRule``:

- ``rounding="low_p_first"``: the paper's appendix rule; floor, then the remaining samples one each to the
  prompts with the lowest acceptance rate.
- ``prior=(a, b)``: a Beta(a, b) prior on p_i, so p̃_i = (k_i + a) / (m_i + a + b) from k_i accepted of m_i
  pilot samples. A prompt the pilot never solved then keeps a weight, provided it has a gradient norm: its
  G_i, unmeasurable without an accepted sample, is imputed as the mean G of the solved prompts.
- ``reserve``: a fraction of N spread evenly over the unsolved prompts (exploration), the rest by
  Proposition 1.
- ``min_per_prompt`` / ``max_per_prompt``: a floor and a cap; the continuous allocation is
  clip(λ · w_i, floor, cap) with λ found by bisection so the total stays N (water-filling).
- ``align``: make the total a multiple of ``align`` (e.g. the world size) by taking samples away, never by
  adding them as the reference does.

When every weight is zero (nothing solved in the pilot, under the reference rule), the reference divides by
zero; here the budget is spread uniformly and ``Allocation.fallback`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "Allocation",
    "GVMRule",
    "PromptStats",
    "gini",
    "gvm_allocate",
    "gvm_weights",
    "round_to_budget",
    "variance_bound",
]

Rounding = Literal["largest_remainder", "low_p_first"]
ROUNDINGS = ("largest_remainder", "low_p_first")


@dataclass(frozen=True)
class PromptStats:
    """Per-prompt estimates, one entry per prompt of the iteration (global, identical on every rank)."""

    accept_rate: np.ndarray  # [P] float in [0, 1]
    grad_norm: np.ndarray  # [P] float >= 0
    samples: np.ndarray | None = None  # [P] how many samples each rate was measured on (None: unknown)


def gvm_weights(p: np.ndarray, g: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Proposition 1's unnormalised weights w_i = G_i / sqrt(p_i + α / p_i^(β−1)); 0 where p_i or G_i is 0.

    >>> gvm_weights(np.array([0.25, 0.0, 0.5]), np.array([2.0, 1.0, 0.0]), alpha=0.0, beta=2.0).round(6).tolist()
    [4.0, 0.0, 0.0]
    """
    p, g = np.asarray(p, dtype=np.float64), np.asarray(g, dtype=np.float64)
    live = (p > 0) & (g > 0)
    w = np.zeros_like(p)
    w[live] = g[live] / np.sqrt(p[live] + alpha / np.power(p[live], beta - 1.0))
    return w


def variance_bound(n: np.ndarray, p: np.ndarray, g: np.ndarray, alpha: float, beta: float) -> float:
    """The objective Σ_i G_i² / (p_i n_i) · 1 / (1 + α / p_i^β) over the prompts that contribute (p, G > 0).

    A contributing prompt given no sample makes the bound infinite.
    """
    n, p, g = (np.asarray(a, dtype=np.float64) for a in (n, p, g))
    live = (p > 0) & (g > 0)
    if np.any(n[live] <= 0):
        return float("inf")
    pl = p[live]
    return float(np.sum(g[live] ** 2 / (pl * n[live]) / (1.0 + alpha / np.power(pl, beta))))


def gini(n: np.ndarray) -> float:
    """Gini coefficient of the allocation: 0 when every prompt gets the same, → 1 when one gets everything.

    >>> gini(np.array([4, 4, 4, 4]))
    0.0
    >>> gini(np.array([0, 0, 0, 8]))    # mean |x_i − x_j| / (2 · mean) = (2·3·8/16) / (2·2) = 0.75
    0.75
    """
    x = np.asarray(n, dtype=np.float64)
    if x.size == 0 or x.sum() == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).mean() / (2.0 * x.mean()))


def _water_fill(w: np.ndarray, total: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """x_i = clip(λ · w_i, lo_i, hi_i) with Σ x_i == total (bisection on λ); lo ≤ hi, Σ lo ≤ total ≤ Σ hi."""

    def filled(lam: float) -> np.ndarray:
        return np.clip(lam * w, lo, hi)

    lam_lo, lam_hi = 0.0, 1.0
    while filled(lam_hi).sum() < total and lam_hi < 1e300:
        lam_hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        lam_lo, lam_hi = (mid, lam_hi) if filled(mid).sum() < total else (lam_lo, mid)
    x = filled(lam_hi)
    short = total - x.sum()
    if short > 1e-9 * max(total, 1.0):  # the weighted prompts are all capped: fill the others evenly up to their caps
        room = np.where(w > 0, 0.0, hi - x)
        x = x + room * min(1.0, short / room.sum())
    return x


def round_to_budget(
    x: np.ndarray,
    total: int,
    rule: Rounding,
    p: np.ndarray | None = None,
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
) -> np.ndarray:
    """Integers n_i near the continuous x_i with Σ n_i == total exactly, lo_i ≤ n_i ≤ hi_i.

    ``largest_remainder`` (the reference): n = round(x) (numpy's half-to-even), then +1 to the largest
    residuals x − n or −1 to the smallest until the sum is right. ``low_p_first`` (the paper's appendix):
    n = floor(x), then one more each to the prompts with x > 0 in increasing order of p, cycling.
    """
    x = np.asarray(x, dtype=np.float64)
    lo = np.zeros(len(x), dtype=np.int64) if lo is None else np.asarray(lo, dtype=np.int64)
    hi = np.full(len(x), np.iinfo(np.int64).max // 4, dtype=np.int64) if hi is None else np.asarray(hi, np.int64)
    if rule == "largest_remainder":
        n = np.clip(np.round(x).astype(np.int64), lo, hi)
        while (error := total - int(n.sum())) != 0:
            residual = x - n
            if error > 0:
                order = [i for i in np.argsort(-residual, kind="stable") if n[i] < hi[i]]
            else:
                order = [i for i in np.argsort(residual, kind="stable") if n[i] > lo[i]]
            if not order:
                raise ValueError(f"cannot reach a total of {total} within the per-prompt bounds")
            n[order[: abs(error)]] += int(np.sign(error))
        return n
    if rule == "low_p_first":
        if p is None:
            raise ValueError("rounding='low_p_first' needs the acceptance rates p")
        n = np.clip(np.floor(x + 1e-9).astype(np.int64), lo, hi)
        order = np.lexsort((-(x - n), np.asarray(p, dtype=np.float64)))  # lowest p first; ties: largest residual
        candidates = [i for i in order if x[i] > lo[i] + 1e-12]  # prompts given more than their floor
        if not candidates:
            candidates = list(range(len(x)))
        while (left := total - int(n.sum())) > 0:
            open_ = [i for i in candidates if n[i] < hi[i]]
            if not open_:
                raise ValueError(f"cannot reach a total of {total} within the per-prompt caps")
            n[open_[:left]] += 1
        if left < 0:  # the floors overshot (x below a floor): take back from the largest
            return round_to_budget(n.astype(np.float64), total, "largest_remainder", lo=lo, hi=hi)
        return n
    raise ValueError(f"rounding={rule!r} is not 'largest_remainder' or 'low_p_first'")


@dataclass(frozen=True)
class GVMRule:
    """The allocation rule's settings (no defaults here: ``conf/allocation/gvm.yaml`` holds them)."""

    alpha: float
    beta: float
    filter_threshold: float  # off at 1 (and at 0, the reference script's default): n_i = 0 when p_i > threshold
    filter_insufficient: float  # off at 0: n_i = 0 when p_i · share_i · N < value
    rounding: Rounding
    prior: tuple[float, float] | None  # Beta(a, b) pseudo-counts on p_i
    reserve: float  # fraction of N spread over the prompts the pilot never solved
    min_per_prompt: int
    max_per_prompt: int | None
    align: int  # the total made a multiple of this by removing samples

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding={self.rounding!r} is not 'largest_remainder' or 'low_p_first'")
        if self.prior is not None:
            if len(self.prior) != 2 or min(self.prior) <= 0:
                raise ValueError(f"prior={self.prior!r} must be two positive Beta pseudo-counts (a, b)")
            object.__setattr__(self, "prior", (float(self.prior[0]), float(self.prior[1])))
        if self.align < 1 or not 0.0 <= self.reserve <= 1.0 or self.min_per_prompt < 0:
            raise ValueError(
                f"bad allocation settings: align={self.align}, reserve={self.reserve}, "
                f"min_per_prompt={self.min_per_prompt}"
            )


@dataclass(frozen=True)
class Allocation:
    n: np.ndarray  # [P] int64, Σ n == total
    weights: np.ndarray  # [P] the Proposition 1 weights after filters (unnormalised)
    p: np.ndarray  # [P] the acceptance rates used (smoothed when a prior is set)
    g: np.ndarray  # [P] the gradient norms used (imputed for unsolved prompts when a prior is set)
    budget: int  # N asked for
    total: int  # Σ n (== budget unless align trimmed it)
    fallback: bool  # every weight was zero: the budget was spread uniformly
    alpha: float  # the rule's α and β, with which ``variance_bound`` reads this allocation
    beta: float


def gvm_allocate(stats: PromptStats, budget: int, rule: GVMRule) -> Allocation:
    """The GVM allocation of ``budget`` samples over the prompts of ``stats`` (see the module docstring)."""
    p_raw = np.asarray(stats.accept_rate, dtype=np.float64)
    g = np.asarray(stats.grad_norm, dtype=np.float64).copy()
    count = len(p_raw)
    if count == 0:
        raise ValueError("no prompt to allocate samples to")
    if budget < 0:
        raise ValueError(f"bad allocation settings: budget={budget}")
    align, min_per_prompt, max_per_prompt = rule.align, rule.min_per_prompt, rule.max_per_prompt
    cap = max_per_prompt if max_per_prompt is not None else budget
    aligned = budget - budget % align
    if min_per_prompt * count > aligned or cap * count < aligned or cap < min_per_prompt:
        raise ValueError(
            f"no allocation of {aligned} samples over {count} prompts fits min_per_prompt={min_per_prompt} and "
            f"max_per_prompt={max_per_prompt}"
        )
    solved = p_raw > 0
    p = p_raw
    if rule.prior is not None:
        a, b = rule.prior
        m = np.asarray(stats.samples if stats.samples is not None else np.ones(count), dtype=np.float64)
        p = (p_raw * m + a) / (m + a + b)
        if np.any(solved & (g > 0)):
            g[~solved] = g[solved & (g > 0)].mean()  # no accepted sample, no measured gradient: the solved mean
    w = gvm_weights(p, g, rule.alpha, rule.beta)
    # the reference's filters, in its order, on the ratios normalised once
    ratio = w / w.sum() if w.sum() > 0 else w
    if 0.0 < rule.filter_threshold < 1.0:  # off at 1 (and at 0, the reference script's default)
        ratio = np.where(p <= rule.filter_threshold, ratio, 0.0)
    if rule.filter_insufficient > 0:
        ratio = np.where(p * ratio * budget >= rule.filter_insufficient, ratio, 0.0)
    w = np.where(ratio > 0, w, 0.0)

    total = aligned  # aligned by taking away, never by adding
    lo = np.full(count, min_per_prompt, dtype=np.float64)
    hi = np.full(count, cap, dtype=np.float64)
    fallback = not np.any(w > 0)
    reserved = np.zeros(count)
    if rule.reserve > 0 and np.any(~solved) and not fallback:
        share = rule.reserve * total / np.count_nonzero(~solved)
        reserved[~solved] = np.minimum(share, hi[~solved])
    rest = total - reserved.sum()
    if fallback:
        x = np.full(count, total / count)
    else:
        scaled = w / w.max()  # only the ratios matter; keeps the bisection away from float limits
        x = reserved + _water_fill(scaled, rest, np.maximum(lo - reserved, 0.0), hi - reserved)
    n = round_to_budget(x, total, rule.rounding, p=p, lo=lo.astype(np.int64), hi=hi.astype(np.int64))
    return Allocation(
        n=n, weights=w, p=p, g=g, budget=budget, total=total, fallback=fallback, alpha=rule.alpha, beta=rule.beta
    )
