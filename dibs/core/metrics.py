"""Accuracy bookkeeping, pure numpy: per-difficulty-level sums and counts that can be summed across ranks.

Accuracy@k here is Average@k (PAPER.md section 6): the mean verifier score over k samples per problem,
averaged over problems; with k samples for every problem it equals the mean over all samples.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["level_sums", "level_accuracy"]


def level_sums(rewards: np.ndarray, levels: Sequence[str], all_levels: Sequence[str]) -> np.ndarray:
    """[2, len(all_levels)]: row 0 = summed rewards, row 1 = sample counts, per level (summable)."""
    out = np.zeros((2, len(all_levels)), dtype=np.float64)
    column = {level: i for i, level in enumerate(all_levels)}
    for reward, level in zip(rewards, levels):
        out[0, column[level]] += reward
        out[1, column[level]] += 1
    return out


def level_accuracy(sums: np.ndarray, all_levels: Sequence[str]) -> dict[str, float]:
    """Accuracy per level plus ``"all"``; levels with no sample are left out."""
    acc = {lv: float(sums[0, i] / sums[1, i]) for i, lv in enumerate(all_levels) if sums[1, i] > 0}
    total = sums[1].sum()
    if total > 0:
        acc["all"] = float(sums[0].sum() / total)
    return acc
