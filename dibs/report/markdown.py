"""report.md: the numbers of ``metrics.compute`` as GitHub-flavoured Markdown tables, ready to paste into a paper.

Every table states its rule underneath (what a cost counts, which evaluation a fraction reads, how the target was
chosen), so a table copied out of the report still says what it measures. One renderer per section, in order.
"""

from __future__ import annotations

from typing import Any

from dibs.report.cells import UNIT_TITLES, amount, cost, pct, table
from dibs.report.estep_table import ALLOC_COLUMNS, estep_section
from dibs.report.events import level_names
from dibs.report.grid import COST_UNITS, Grid, format_value
from dibs.report.plots import BAND, UNIT_NAMES

__all__ = ["ALLOC_COLUMNS", "COST_DEFINITION", "SETTINGS", "render"]

COST_DEFINITION = (
    "Costs are cumulative per run at each evaluation: *samples* = generated samples (the allocation pilot included, "
    "evaluation excluded); *tokens* = generated response tokens; *updates* = optimiser updates; *wall* = seconds "
    "spent generating, verifying and training (evaluation and checkpointing excluded)."
)
# Key settings printed under "held equal" when every run has them and they agree (axes are left out).
SETTINGS = (
    "iterations",
    "prompts_per_iteration",
    "batch_size",
    "updates_per_iteration",
    "eval.samples",
    "eval.benchmarks",
    "max_prompt_tokens",
    "algo.loss",
    "algo.lr",
    "allocation._target_",
    "allocation.n_per_prompt",
    "data.source._target_",
    "model.path",
    "model.hidden_size",
    "model.tiny.hidden_size",
    "model.tiny.num_hidden_layers",
    "rollout.sampling.temperature",
    "rollout.sampling.max_new_tokens",
    "warmstart.steps",
)


# ---- sections ---------------------------------------------------------------------------------------------------
def _held_equal(grid: Grid) -> list[str]:
    out = []
    for key in SETTINGS:
        if any(key == a or key.startswith(a + ".") for a in grid.axes):
            continue
        values = [r.flat.get(key, KeyError) for r in grid.runs]
        if values[0] is not KeyError and all(v == values[0] for v in values):
            out.append(f"`{key}`={format_value(values[0])}")
    return out


def _header(grid: Grid, data: dict[str, Any]) -> list[str]:
    budget, seeds = data["budget"], data["seeds"]
    lines = [
        f"# Grid report: {grid.name}",
        "",
        f"- Grid folder: `{grid.root}`",
        f"- {data['n_runs']} runs, {len(grid.configurations)} configurations, {len(seeds)} seeds "
        f"({', '.join(str(s) for s in seeds)})",
        f"- Declared axes: {', '.join(f'`{a}`' for a in grid.axes) or 'none'} (from {grid.axes_source})",
    ]
    for axis, keys in grid.preset_keys.items():
        listed = ", ".join(f"`{k}`" for k in keys) or "nothing"
        lines.append(f"- Set by the `{axis}` axis (a preset), constant within each configuration: {listed}")
    for command, path in zip(grid.commands, grid.multiruns):
        where = f" (sweep `{path.parent.relative_to(grid.root)}`)" if len(grid.commands) > 1 else ""
        lines.append(f"- Reproduce: `{command}`{where}")
    lines += [
        f"- Budget: {amount(budget['amount'], budget['unit'])} {budget['unit']} per run ({budget['source']}).",
        f"- {COST_DEFINITION}",
        "- Accuracy: held-out `val/acc` (Average@k; the mean over the benchmarks when several are evaluated), in %; "
        "cells are mean ± sample std "
        "(ddof = 1) over seeds, the mean alone for a single seed.",
    ]
    held = _held_equal(grid)
    if held:
        lines.append(f"- Held equal: {', '.join(held)}")
    return lines


def _final(grid: Grid, data: dict[str, Any]) -> list[str]:
    finals = data["final"]
    levels = level_names(lv for f in finals.values() for lv in f["levels"])
    header = ["Configuration", "Seeds", "π0 acc (%)", "Final acc (%)", "Gain (pp)"]
    header += [f"Level {lv} (%)" for lv in levels] + [UNIT_TITLES[u] for u in COST_UNITS]
    rows = []
    for label in grid.configurations:
        f = finals[label]
        row = [label, str(len(f["seeds"])), pct(f["pi0_acc"]), pct(f["final_acc"]), pct(f["gain"], sign=True)]
        row += [pct(f["levels"][lv]) if lv in f["levels"] else "–" for lv in levels]
        row += [cost(f["cost"][u], u) for u in COST_UNITS]
        rows.append(row)
    return [
        "## Final metrics",
        "",
        *table(header, rows),
        "",
        "π0 is each run's first evaluation (the initial policy, all costs 0); final is its last evaluation; gain is "
        "final − π0 per seed, in percentage points; the cost columns are the final cumulative costs.",
        *_short_runs(grid, data),
    ]


def _short_runs(grid: Grid, data: dict[str, Any]) -> list[str]:
    """A warning for runs that stopped before spending the budget: crashed, still running or capped."""
    unit, budget = data["budget"]["unit"], data["budget"]["amount"]
    short = [
        f"{r.name} ({amount(r.curve.cost[unit][-1], unit)})"
        for r in grid.runs
        if r.curve.cost[unit][-1] < budget * (1 - 1e-6)
    ]
    if not short:
        return []
    return [
        "",
        f"**Warning:** {len(short)} run(s) ended before spending the budget of {amount(budget, unit)} {unit} (crashed, "
        f"still running, or stopped by the `iterations` cap): {', '.join(short[:5])}. Their final is their last "
        "evaluation, at a lower cost than the others'.",
    ]


def _fraction_header(data: dict[str, Any], unit: str) -> list[str]:
    """``Configuration`` and one column per budget fraction, naming its threshold."""
    first = data["fractions"][next(iter(data["fractions"]))]
    return ["Configuration"] + [f"{100 * e['fraction']:g}% (≤ {amount(e['threshold'], unit)} {unit})" for e in first]


def _fractions(grid: Grid, data: dict[str, Any]) -> list[str]:
    unit = data["budget"]["unit"]
    rows = [[label] + [pct(e["acc"]) for e in data["fractions"][label]] for label in grid.configurations]
    lines = [
        "## Accuracy at fractions of the budget",
        "",
        *table(_fraction_header(data, unit), rows),
        "",
        f"Held-out accuracy (%) of each seed at its LAST evaluation whose cumulative {unit} are ≤ the fraction × the "
        "budget (a step function: no interpolation between evaluations), then mean ± std over seeds.",
    ]
    budget = data["budget"]["amount"]
    over = [r.name for r in grid.runs if float(r.curve.cost[unit][-1]) > budget * (1 + 1e-6)]
    if over:
        lines.append(
            f"{len(over)} run(s) end above the budget (the iteration that reaches it is completed): "
            f"{', '.join(over[:5])}; their 100% column reads the last evaluation within it."
        )
    return lines


def _per_level(grid: Grid, data: dict[str, Any]) -> list[str]:
    """Per difficulty level: the plot against samples, then a table of accuracy at the budget fractions and the mean
    accuracy over the run, on the budget's axis (named in the heading when it is not samples)."""
    per = data["per_level"]
    if not per["levels"]:
        return []
    unit, span = per["unit"], per["span"]
    lines = [f"## Accuracy per difficulty level vs {unit}" + ("" if unit == "samples" else " (the budget's unit)"), ""]
    if per.get("plot"):
        lines += [
            f"![Held-out accuracy per difficulty level vs samples]({per['plot']})",
            "",
            f"*Held-out accuracy (%) per difficulty level vs cumulative samples ({grid.name}), one subplot per level "
            "with its own y range: line = mean over seeds after linear interpolation onto a common x grid (0 to the "
            f"configuration's smallest final cost), shaded = {BAND} (a single seed: its own curve, no band).*",
            "",
        ]
    lines += [
        f"Cells: `val/acc_level_<level>` (%) read by the rule of the fractions table (each seed's LAST evaluation "
        f"whose cumulative {unit} are ≤ the fraction × the budget), then mean ± std over seeds. Mean over run: the "
        f"area under a seed's step-function accuracy–{unit} curve from 0 to the budget ({amount(span, unit)} {unit}; "
        "a run that ended short holds its last evaluation), divided by that span, then mean ± std over seeds.",
    ]
    header = [*_fraction_header(data, unit), "Mean over run"]
    for lv in per["levels"]:
        fractions, means = per["fractions"][lv], per["mean_over_run"][lv]
        rows = [[label, *(pct(e["acc"]) for e in fractions[label]), pct(means[label])] for label in grid.configurations]
        lines += ["", f"### Level {lv}", "", *table(header, rows)]
    return lines


def _target(grid: Grid, data: dict[str, Any]) -> list[str]:
    tgt, base = data["target"], data["baseline"]["configuration"]
    reach = data["target_cost"]
    partial = len(set(data["baseline"]["per_configuration"].values())) > 1  # one baseline per value of other axes
    unit = data["budget"]["unit"]
    rows, speed_rows, mean_rows = [], [], []
    for label in grid.configurations:
        r = reach[label]
        rows.append([label, f"{r['reached']}/{r['n']}", *(cost(r["cost"][u], u) for u in COST_UNITS)])
        at, ratio = r.get("mean_curve"), r.get("mean_curve_ratio")
        share = f"{100 * at / data['budget']['amount']:.0f}%" if at is not None and data["budget"]["amount"] else "–"
        mean_rows.append(
            [
                label,
                f"{at:,.0f}" if at is not None else "not reached",
                share,
                f"{ratio:.2f}" if ratio is not None else "n/a",
            ]
        )
        speed = [r["speedup"][u] for u in COST_UNITS]
        row = [label, *(f"{v:.2f}×" if v is not None else "n/a" for v in speed), r["speedup_note"] or ""]
        speed_rows.append(row if not partial else [row[0], r["baseline"] or "–", *row[1:]])
    lines = [
        "## Cost to reach the target",
        "",
        (
            f"Target: {100 * tgt['value']:.1f}% held-out accuracy ({tgt['rule']})."
            if tgt["value"] is not None
            else f"Target: per configuration ({tgt['rule']})."
        ),
        "",
        *table(["Configuration", "Seeds reached", *(UNIT_TITLES[u] for u in COST_UNITS)], rows),
        "",
        "A seed's cost is its cumulative cost at its first evaluation with `val/acc` ≥ the target; mean ± std over "
        f"the seeds that reached it. {COST_DEFINITION}",
        "",
        f"Speed-up vs the baseline `{base}` ({data['baseline']['source']}"
        + ("; each configuration against the one with these values and its own on the other axes" if partial else "")
        + "): baseline mean cost / configuration mean cost, a ratio of means (> 1: the configuration needs less); "
        "n/a unless every seed of both reached the target. With few seeds, compare it with the spread of the costs "
        "above.",
        "",
        *(
            table(
                ["Configuration", "Baseline", *(UNIT_TITLES[u] for u in COST_UNITS), "Note"],
                speed_rows,
                align="llrrrrl",
            )
            if partial
            else table(["Configuration", *(UNIT_TITLES[u] for u in COST_UNITS), "Note"], speed_rows, align="lrrrrl")
        ),
    ]
    lines += [
        "",
        f"### On the mean curve ({UNIT_NAMES.get(unit, unit)})",
        "",
        *table(
            ["Configuration", f"{UNIT_TITLES.get(unit, unit)} to the target", "Of the budget", "Ratio to baseline"],
            mean_rows,
            align="lrrr",
        ),
        "",
        "The mean over seeds of each seed's accuracy at its last evaluation at or below a cost (the rule of the "
        "fractions table), read at every cost where some seed evaluated: the first cost where that mean reaches the "
        "target. Defined when single seeds miss a target their mean meets (the baseline's own mean final accuracy); "
        "ratio = this cost / the baseline's (< 1: fewer).",
    ]
    at_pi0 = [s["run"] for r in reach.values() for s in r["per_seed"] if s["at_pi0"]]
    if at_pi0:
        lines += ["", f"Note: the target is met at π0 (zero cost) by {len(at_pi0)} run(s): {', '.join(at_pi0[:5])}."]
    return lines


def _plots(grid: Grid, data: dict[str, Any], plots: dict[str, str]) -> list[str]:
    lines = ["## Accuracy vs cost", ""]
    for unit, name in plots.items():
        lines += [
            f"![Held-out accuracy vs {UNIT_NAMES[unit]}]({name})",
            "",
            f"*Held-out accuracy (%) vs cumulative {UNIT_NAMES[unit]} ({grid.name}): line = mean over seeds after "
            "linear interpolation onto a common x grid (0 to the configuration's smallest final cost), shaded = "
            f"{BAND} (a single seed: its own curve, no band); dashed = the target.*",
            "",
        ]
    return lines[:-1]


def _runs(grid: Grid, data: dict[str, Any]) -> list[str]:
    unit = data["budget"]["unit"]
    rows = [
        [
            f"`{r.name}`",
            r.label,
            str(r.seed),
            str(len(r.curve.steps)),
            f"{100 * r.curve.acc[0]:.1f}",
            f"{100 * r.curve.acc[-1]:.1f}",
            amount(float(r.curve.cost[unit][-1]), unit),
        ]
        for r in grid.runs
    ]
    header = ["Run", "Configuration", "Seed", "Evaluations", "π0 acc (%)", "Final acc (%)", f"Final {unit}"]
    return ["## Runs", "", *table(header, rows, align="ll")]


def render(grid: Grid, data: dict[str, Any], plots: dict[str, str]) -> str:
    """The whole report; ``plots`` maps a cost unit to its PNG's path relative to report.md."""
    parts = [_header(grid, data), _final(grid, data), _fractions(grid, data), _per_level(grid, data)]
    parts += [_target(grid, data), _plots(grid, data, plots), estep_section(grid, data), _runs(grid, data)]
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"
