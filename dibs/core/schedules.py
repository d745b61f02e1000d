"""Learning-rate multipliers, pure python: a linear warm-up, then constant or cosine decay to a floor.

    factor(s) = min(1, (s + 1) / warmup) · (floor + (1 − floor) · ½ (1 + cos(π · min(s, total) / total)))

with ``total`` = 0 meaning no decay. Used by the SFT warm start and by the EM M-step.

Not transformers' schedules: ``get_cosine_schedule_with_warmup`` and ``get_cosine_with_min_lr_schedule_with_warmup``
start the warm-up at 0 (``s / warmup``: a first update with lr 0), and all its cosine schedules run the cosine over
the steps after the warm-up, where this one multiplies the warm-up by a cosine over all steps;
``get_constant_schedule_with_warmup`` lags one step behind.
Every cached π0 and every reported run was trained with this one; the two differ by up to 0.035 · lr over the
warm start's 800 steps and 0.15 · lr over a 96-update M-step (warm-up 16, floor 0.1).
"""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    >>> warmup_cosine(0, warmup=4, total=0)
    0.25
    >>> warmup_cosine(10, warmup=1, total=10, floor=0.1)
    0.1
    """
    warm = min(1.0, (step + 1) / max(warmup, 1))
    if total <= 0:
        return warm
    decay = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return warm * (floor + (1.0 - floor) * decay)
