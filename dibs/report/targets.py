"""The report's target accuracy and baselines: which accuracy "cost to reach the target" means (a value, a rule
written in the grid before the runs, or the highest every run reaches, chosen after the fact), and which
configuration each one is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dibs.report.grid import SEED_AXIS, Curve, Grid, ReportError, format_value

__all__ = ["ACC_TOL", "TARGET_RULES", "Target", "first_reaching", "match_baselines", "resolve_target"]

# TensorBoard stores scalars as float32: an accuracy of exactly 0.7 reads back as 0.69999999, a cost of 250 exactly.
ACC_TOL = 1e-6


@dataclass
class Target:
    value: float | None  # None when each configuration has its own (``per_configuration``)
    rule: str
    per_configuration: dict[str, float | None] | None = None

    def of(self, label: str) -> float | None:
        return self.per_configuration.get(label) if self.per_configuration is not None else self.value


def first_reaching(curve: Curve, target: float) -> int | None:
    """Index of the first evaluation with accuracy >= target, or None."""
    hit = np.nonzero(curve.acc >= target - ACC_TOL)[0]
    return int(hit[0]) if hit.size else None


TARGET_RULES = ("baseline_final",)  # grid.target may name a rule instead of a value


def resolve_target(
    grid: Grid, finals: dict[str, dict[str, Any]], target: float | None, baselines: dict[str, str | None] | None = None
) -> Target:
    if target is not None:
        return Target(float(target), "given with target=")
    grid_cfg = grid.runs[0].config.get("grid")
    if isinstance(grid_cfg, dict) and grid_cfg.get("target") is not None:
        rule = grid_cfg["target"]
        if rule == "baseline_final":
            named = sorted({b for b in (baselines or {}).values() if b is not None})
            if not named:
                raise ReportError("grid.target=baseline_final needs a baseline configuration; none matches")
            means = {b: float(finals[b]["final_acc"]["mean"]) for b in named}
            head = "pre-registered in the grid (`grid.target: baseline_final`): the mean final accuracy of the baseline"
            if len(named) == 1:
                return Target(means[named[0]], f"{head} `{named[0]}` over its seeds, {100 * means[named[0]]:.1f}%")
            per = {label: means.get(b) if b is not None else None for label, b in (baselines or {}).items()}
            listed = "; ".join(f"`{b}` {100 * v:.1f}%" for b, v in means.items())
            return Target(None, f"{head} that each configuration is compared with, over its seeds: {listed}", per)
        if isinstance(rule, str):
            raise ReportError(f"grid.target={rule!r} is neither an accuracy in (0, 1] nor one of {TARGET_RULES}")
        return Target(float(rule), "`grid.target` in the runs' config")
    # the highest accuracy that every run reaches, so that every seed has a cost to reach it and the speed-ups
    # are defined: the lowest of the runs' best evaluations
    worst = min(grid.runs, key=lambda r: float(np.max(r.curve.acc)))
    best = float(np.max(worst.curve.acc))
    rule = (
        f"the highest accuracy every run reaches: the best evaluation of {worst.name}, {100 * best:.1f}%; chosen "
        "from the results, after the fact: set `grid.target` or give target= to fix it in advance"
    )
    return Target(best, rule)


def match_baselines(grid: Grid, spec: str, source: str) -> dict[str, str | None]:
    """Each configuration's baseline. ``spec`` is a configuration label, or some of its ``axis=value`` pairs
    (``algo=raft`` in a grid that also sweeps ``allocation.n_per_prompt``): a configuration is then compared
    with the one that has the spec's values on those axes and its own values on the others."""
    if spec in grid.by_config:
        return {label: spec for label in grid.configurations}
    config_axes = [a for a in grid.axes if a != SEED_AXIS]
    pairs = [part.strip().split("=", 1) for part in spec.split(",") if part.strip()]
    wanted = {key.strip(): value.strip() for key, value in (p for p in pairs if len(p) == 2)}
    if len(wanted) != len(pairs) or not set(wanted) <= set(config_axes) or not wanted:
        raise ReportError(
            f"baseline {spec!r} (from {source}) is neither a configuration of the grid nor axis=value pairs of its "
            f"axes ({', '.join(config_axes) or 'none'}); the configurations are: "
            f"{', '.join(repr(c) for c in grid.configurations)}"
        )
    values = {
        label: {a: format_value(runs[0].axis_values[a]) for a in config_axes} for label, runs in grid.by_config.items()
    }
    matched: dict[str, str | None] = {}
    for label, own in values.items():
        target = {**own, **wanted}
        matched[label] = next((other for other, theirs in values.items() if theirs == target), None)
    if not any(matched[label] == label for label in matched):
        raise ReportError(
            f"baseline {spec!r} (from {source}) matches no configuration of the grid: "
            f"{', '.join(repr(c) for c in grid.configurations)}"
        )
    return matched
