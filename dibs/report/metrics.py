"""The numbers of the report, from a loaded grid: final metrics, accuracy at budget fractions (overall and per
difficulty level), mean accuracy over the run per level, cost to a target, E-step diagnostics.

Pure numpy on ``Curve`` arrays, so the rules (step function at fractions, its area over the budget, first crossing
of the target, speed-up as a ratio of means, a run's E-step numbers) are each one small function the tests pin down.
The target and the baselines it is compared with are resolved in ``dibs.report.targets``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dibs.report.events import ALLOC_TAGS, SAMPLING_TAGS, level_names
from dibs.report.grid import COST_UNITS, Curve, Grid, ReportError, Run
from dibs.report.targets import ACC_TOL, Target, first_reaching, match_baselines, resolve_target

__all__ = [
    "Budget",
    "Target",
    "acc_at_fraction",
    "compute",
    "estep_numbers",
    "first_reaching",
    "match_baselines",
    "mean_over_run",
    "resolve_budget",
    "resolve_target",
    "stat",
]

COST_RTOL = 1e-6  # as ACC_TOL (dibs.report.targets): float32 scalars


def stat(values: list[float]) -> dict[str, Any]:
    """Mean and sample std (ddof=1; None for one value) of per-seed values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


@dataclass
class Budget:
    unit: str
    amount: float
    source: str  # one line for the report: where the amount came from


def resolve_budget(grid: Grid) -> Budget:
    """The runs' ``budget`` node (at most one unit set, the same unit in every run); else the largest final samples."""
    found = {}
    for run in grid.runs:
        node = run.config.get("budget") or {}
        if not isinstance(node, dict):
            raise ReportError(f"run {run.path}: 'budget' in resolved_config.yaml is not a mapping: {node!r}")
        set_ = {k: v for k, v in node.items() if v is not None and k in ("samples", "tokens", "updates")}
        if len(set_) > 1:
            raise ReportError(f"run {run.path}: budget sets more than one unit ({', '.join(set_)}); at most one")
        if set_:
            found[run.name] = next(iter(set_.items()))
    if found and len(found) < len(grid.runs):
        without = next(r.name for r in grid.runs if r.name not in found)
        raise ReportError(f"run {without} has no budget while run {next(iter(found))} has one: not comparable")
    if not found:
        amount = max(float(r.curve.cost["samples"][-1]) for r in grid.runs)
        return Budget("samples", amount, "no budget set in the runs' config: the largest final cost/samples of a run")
    units = {unit for unit, _ in found.values()}
    if len(units) > 1:
        names = ", ".join(f"{name}: {unit}" for name, (unit, _) in list(found.items())[:4])
        raise ReportError(f"the runs' budgets are in different units ({names}): not comparable")
    amounts = {float(amount) for _, amount in found.values()}
    (unit,) = units
    if len(amounts) > 1:
        return Budget(unit, max(amounts), f"`budget.{unit}` differs across runs; fractions refer to the largest")
    return Budget(unit, amounts.pop(), f"`budget.{unit}` in the runs' config")


def _series(curve: Curve, level: str | None) -> np.ndarray:
    """The overall accuracy, or that of one difficulty level."""
    return curve.acc if level is None else curve.levels[level]


def acc_at_fraction(curve: Curve, unit: str, threshold: float, level: str | None = None) -> float | None:
    """Accuracy (overall, or of ``level``) at the LAST evaluation whose cumulative cost is <= threshold (a step
    function); None if none is."""
    cost = curve.cost[unit]
    within = np.nonzero(cost <= threshold * (1 + COST_RTOL) + 1e-9)[0]
    return float(_series(curve, level)[within[-1]]) if within.size else None


def mean_over_run(curve: Curve, unit: str, end: float, level: str | None = None) -> float:
    """The area under the step function of ``acc_at_fraction`` from 0 to ``end`` (each evaluation holds until the
    next, the last until ``end``; evaluations past ``end`` are cut off), divided by ``end``."""
    if end <= 0:
        return math.nan
    width = np.diff(np.clip(np.append(curve.cost[unit], end), 0.0, end))
    held = width > 0  # an evaluation past the end (its accuracy NaN or not) has no weight
    return float(np.sum(_series(curve, level)[held] * width[held]) / end)


def mean_curve_reach(runs: list[Run], unit: str, target: float) -> float | None:
    """The least cost at which the mean over seeds of ``acc_at_fraction`` (each seed's last evaluation at or
    below that cost) reaches ``target``: read at every cost where some seed evaluated. None if it never does.
    Defined even when single seeds miss a target that their mean meets (a baseline's own mean final accuracy)."""
    costs = np.unique(np.concatenate([r.curve.cost[unit] for r in runs]))
    for x in costs:
        accs = [acc_at_fraction(r.curve, unit, float(x)) for r in runs]
        if all(a is not None for a in accs) and float(np.mean(accs)) >= target - ACC_TOL:
            return float(x)
    return None


def _finite_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.mean(finite)) if finite.size else None


def estep_numbers(curve: Curve) -> dict[str, Any]:
    """One run's E-step numbers: generated samples (its final ``cost/samples``), the pilot's share of them (its last
    ``pilot/samples_cum`` / that; 0 without a pilot), accepted training samples per iteration (the mean over
    iterations of ``rollout/accept_rate`` × ``rollout/samples``), and the mean over iterations of each ``alloc/*``
    scalar it logs. Means skip NaN (a prediction over no fresh sample); None where the run logs nothing to average."""
    it = curve.iterations
    total = float(curve.cost["samples"][-1])
    pilot = it.get("pilot/samples_cum", np.zeros(0))
    pilot = pilot[np.isfinite(pilot)]
    last_pilot = float(pilot[-1]) if pilot.size else 0.0
    share = 0.0 if last_pilot == 0 else last_pilot / total if total > 0 else None
    accepted = (
        _finite_mean(it["rollout/accept_rate"] * it["rollout/samples"])
        if "rollout/accept_rate" in it and "rollout/samples" in it
        else None
    )
    return {
        "generated_samples": total,
        "pilot_share": share,
        "accepted_per_iteration": accepted,
        "alloc": {tag: _finite_mean(it[tag]) for tag in ALLOC_TAGS if tag in it},
        "sampling": {tag: _finite_mean(it[tag]) for tag in SAMPLING_TAGS if tag in it},
    }


def compute(
    grid: Grid,
    *,
    target: float | None = None,
    baseline: str | None = None,
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
) -> dict[str, Any]:
    """Every number of the report, as a JSON-ready mapping (report.json is this)."""
    if target is not None and not 0 < target <= 1:
        hint = " (a percentage? give e.g. 0.2 for 20%)" if target > 1 else ""
        raise ReportError(f"target is an accuracy in (0, 1]; got {target}{hint}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise ReportError(f"fractions must be in (0, 1]; got {list(fractions)}")
    grid_cfg = grid.runs[0].config.get("grid") if isinstance(grid.runs[0].config.get("grid"), dict) else {}
    baseline_spec, baseline_source = (
        (baseline, "baseline=")
        if baseline is not None
        else (grid_cfg["baseline"], "`grid.baseline`")
        if grid_cfg.get("baseline")
        else (grid.configurations[0], "the first configuration")
    )
    baselines = match_baselines(grid, baseline_spec, baseline_source)
    budget = resolve_budget(grid)

    finals: dict[str, dict[str, Any]] = {}
    for label, runs in grid.by_config.items():
        curves = [r.curve for r in runs]
        levels = level_names(lv for c in curves for lv in c.levels)
        finals[label] = {
            "seeds": [r.seed for r in runs],
            "runs": [r.name for r in runs],
            "pi0_acc": stat([c.acc[0] for c in curves]),
            "final_acc": stat([c.acc[-1] for c in curves]),
            "gain": stat([c.acc[-1] - c.acc[0] for c in curves]),
            "levels": {lv: stat([c.levels[lv][-1] for c in curves if lv in c.levels]) for lv in levels},
            "cost": {u: stat([c.cost[u][-1] for c in curves]) for u in COST_UNITS},
        }

    def at_fractions(runs: list[Run], level: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "fraction": f,
                "threshold": f * budget.amount,
                "acc": stat([acc_at_fraction(r.curve, budget.unit, f * budget.amount, level) for r in runs]),
            }
            for f in fractions
        ]

    # per difficulty level, on the axis of the fractions: the same step function, and its mean over the budget
    per_level: dict[str, Any] = {
        "unit": budget.unit,
        "span": budget.amount,
        "levels": [],
        "fractions": {},
        "mean_over_run": {},
    }
    for lv in level_names(name for r in grid.runs for name in r.curve.levels):
        having = {label: [r for r in runs if lv in r.curve.levels] for label, runs in grid.by_config.items()}
        per_level["levels"].append(lv)
        per_level["fractions"][lv] = {label: at_fractions(runs, lv) for label, runs in having.items()}
        per_level["mean_over_run"][lv] = {
            label: stat([mean_over_run(r.curve, budget.unit, budget.amount, lv) for r in runs])
            for label, runs in having.items()
        }

    # E-step diagnostics: per run, then over seeds; the alloc/* columns only if some run logs them
    per_run = {r.name: estep_numbers(r.curve) for r in grid.runs}
    logged = [tag for tag in ALLOC_TAGS if any(tag in n["alloc"] for n in per_run.values())]
    sampled = [tag for tag in SAMPLING_TAGS if any(tag in n["sampling"] for n in per_run.values())]
    estep: dict[str, Any] = {"alloc_tags": logged, "sampling_tags": sampled, "configurations": {}}
    for label, runs in grid.by_config.items():
        numbers = [per_run[r.name] for r in runs]
        estep["configurations"][label] = {
            **{
                key: stat([n[key] for n in numbers])
                for key in ("generated_samples", "pilot_share", "accepted_per_iteration")
            },
            "alloc": {tag: stat([n["alloc"].get(tag) for n in numbers]) for tag in logged},
            "sampling": {tag: stat([n["sampling"].get(tag) for n in numbers]) for tag in sampled},
        }

    goal = resolve_target(grid, finals, target, baselines)
    reach: dict[str, dict[str, Any]] = {}
    for label, runs in grid.by_config.items():
        per_seed = []
        for r in runs:
            i = None if goal.of(label) is None else first_reaching(r.curve, goal.of(label))
            per_seed.append(
                {
                    "seed": r.seed,
                    "run": r.name,
                    "reached": i is not None,
                    "step": None if i is None else int(r.curve.steps[i]),
                    "at_pi0": i == 0,
                    "cost": None if i is None else {u: float(r.curve.cost[u][i]) for u in COST_UNITS},
                }
            )
        hits = [s["cost"] for s in per_seed if s["reached"]]
        reach[label] = {
            "reached": len(hits),
            "n": len(per_seed),
            "per_seed": per_seed,
            "cost": {u: stat([h[u] for h in hits]) for u in COST_UNITS},
        }
    for label, runs in grid.by_config.items():  # the seed-mean step curve: where it first reaches the target
        value = goal.of(label)
        reach[label]["target"] = value
        reach[label]["mean_curve"] = None if value is None else mean_curve_reach(runs, budget.unit, value)
    for label, row in reach.items():
        row["baseline"] = baselines[label]
        base_at = reach[baselines[label]]["mean_curve"] if baselines[label] in reach else None
        mine_at = row["mean_curve"]
        row["mean_curve_ratio"] = mine_at / base_at if mine_at is not None and base_at else None
        row["speedup"], row["speedup_note"] = {}, None
        base = reach.get(baselines[label]) if baselines[label] is not None else None
        if base is None:
            row["speedup_note"] = f"no configuration matches the baseline {baseline_spec!r} on the other axes"
        elif base["reached"] < base["n"]:
            row["speedup_note"] = f"baseline {base['reached']}/{base['n']} seeds reached"
        elif row["reached"] < row["n"]:
            row["speedup_note"] = f"{row['reached']}/{row['n']} seeds reached"
        for u in COST_UNITS:
            mine = row["cost"][u]["mean"]
            theirs = base["cost"][u]["mean"] if base is not None else None
            ok = row["speedup_note"] is None and mine and theirs  # zero: the target was met at π0
            row["speedup"][u] = theirs / mine if ok else None
        if row["speedup_note"] is None and any(v is None for v in row["speedup"].values()):
            row["speedup_note"] = "zero cost (target met at π0)"

    return {
        "grid": grid.name,
        "grid_dir": str(grid.root),
        "axes": grid.axes,
        "axes_source": grid.axes_source,
        "commands": grid.commands,
        "n_runs": len(grid.runs),
        "seeds": grid.seeds,
        "configurations": grid.configurations,
        "runs": [
            {
                "run": r.name,
                "configuration": r.label,
                "seed": r.seed,
                "axis_values": r.axis_values,
                "evaluations": len(r.curve.steps),
                "steps": r.curve.steps.tolist(),
                "acc": r.curve.acc.tolist(),
                "cost": {u: r.curve.cost[u].tolist() for u in COST_UNITS},
            }
            for r in grid.runs
        ],
        "budget": {"unit": budget.unit, "amount": budget.amount, "source": budget.source},
        "target": {"value": goal.value, "rule": goal.rule, "per_configuration": goal.per_configuration},
        "baseline": {"configuration": baseline_spec, "source": baseline_source, "per_configuration": baselines},
        "final": finals,
        "fractions": {label: at_fractions(runs) for label, runs in grid.by_config.items()},
        "per_level": per_level,
        "target_cost": reach,
        "estep": estep,
    }
