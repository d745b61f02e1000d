"""Equal-cost stopping: a run's budget in generated samples, generated tokens or optimiser updates.

Methods in a grid are compared at equal cost, not at an equal number of EM iterations: a GVM iteration spends
pilot samples that a uniform one does not. The costs are counted over everything the run generates for
training (pilot included; held-out evaluation excluded, it is measurement):

    samples  completions generated
    tokens   response tokens generated (prompt tokens are not generated)
    updates  optimiser steps taken

The check runs after each iteration's M-step. A sample budget is spent exactly: the E-step that would cross
it is cut to what is left (its last round trimmed, largest requests first), so runs of a grid generate the same
number of samples. Token and update budgets stop a run within one iteration: the iteration that crosses the
budget still trains on what it generated, none is thrown away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["UNITS", "Budget"]

UNITS = ("samples", "tokens", "updates")


@dataclass(frozen=True)
class Budget:
    unit: str | None = None  # one of UNITS; None: no budget, the run stops after its iterations
    amount: int = 0

    def __post_init__(self) -> None:
        if self.unit is not None and (self.unit not in UNITS or self.amount < 1):
            raise ValueError(f"budget.{self.unit}={self.amount}: the unit must be one of {UNITS}, the amount >= 1")

    @classmethod
    def from_config(cls, **node: int | None) -> Budget:
        """From the ``budget`` config node (keys ``samples``, ``tokens``, ``updates``): at most one may be set."""
        unknown = sorted(set(node) - set(UNITS))
        if unknown:
            raise ValueError(f"budget.{unknown[0]} is not a budget: the units are budget.samples, .tokens and .updates")
        given = {k: v for k, v in node.items() if v is not None}
        if len(given) > 1:
            raise ValueError(f"set one budget, not {len(given)}: {given} (budget.samples, .tokens or .updates)")
        if not given:
            return cls()
        ((unit, amount),) = given.items()
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            raise ValueError(f"budget.{unit}={amount!r} must be a positive integer")
        return cls(unit, amount)

    @property
    def enabled(self) -> bool:
        return self.unit is not None

    def spent(self, costs: dict[str, float]) -> float:
        """The cost counted against the budget, from cumulative counters keyed by UNITS."""
        return float(costs[self.unit]) if self.unit else 0.0

    def reached(self, costs: dict[str, float]) -> bool:
        return self.enabled and self.spent(costs) >= self.amount

    def planned_iterations(self, iterations: int, samples_per_iteration: int, updates_per_iteration: int) -> int:
        """Iterations the run is expected to last, the horizon of the learning-rate schedule.

        Exact for samples and updates when every iteration costs the same (a fixed allocation budget plus
        pilot); a token budget cannot be foreseen, so its horizon is the ``iterations`` cap. Never more than
        ``iterations``, which caps every run.

        >>> Budget("samples", 24576).planned_iterations(100, 2048, 32)
        12
        >>> Budget("updates", 100).planned_iterations(100, 2048, 32)   # ceil(100 / 32)
        4
        """
        per = {"samples": samples_per_iteration, "updates": updates_per_iteration}.get(self.unit or "")
        if per is None:
            return iterations
        return min(iterations, math.ceil(self.amount / per))
