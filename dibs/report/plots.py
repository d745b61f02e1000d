"""Accuracy-vs-cost PNGs: one line per configuration (mean over seeds) with a mean ± std seed band, overall against
each cost (``acc_vs_<unit>.png``) and per difficulty level against samples (``accuracy_vs_samples_by_level.png``).

Seeds evaluate at different costs, so each seed's curve is interpolated linearly onto a common x grid, from 0 to
the smallest final cost over the configuration's seeds (no extrapolation), before averaging.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dibs.report.events import level_names
from dibs.report.grid import COST_UNITS, Curve, Grid

__all__ = ["AXIS_LABELS", "BAND", "LEVEL_PLOT", "UNIT_NAMES", "common_grid_mean", "plot_all", "plot_levels"]

AXIS_LABELS = {
    "samples": "generated samples (cumulative)",
    "tokens": "generated response tokens (cumulative)",
    "updates": "optimiser updates (cumulative)",
    "wall_s": "wall seconds generating + verifying + training (cumulative)",
}
UNIT_NAMES = {"samples": "samples", "tokens": "tokens", "updates": "updates", "wall_s": "wall seconds"}
BAND = "mean ± 1 sample std over seeds"
LEVEL_PLOT = "accuracy_vs_samples_by_level.png"
POINTS = 100


def common_grid_mean(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x grid (0 → smallest final x: ``POINTS`` points plus the seeds' own evaluation costs, so kinks stay sharp),
    the mean over seeds and the sample std (0 for one seed)."""
    end = min(float(x[-1]) for x in xs)
    if end <= 0:
        grid = np.zeros(1)
    else:
        own = np.concatenate(xs)
        grid = np.union1d(np.linspace(0.0, end, POINTS), own[(own >= 0) & (own <= end)])
    stacked = np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    std = stacked.std(axis=0, ddof=1) if len(xs) > 1 else np.zeros_like(grid)
    return grid, stacked.mean(axis=0), std


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _short_ticks(ax) -> None:
    """x tick labels as 20k / 1.5M, so large counts do not run into each other in narrow panels."""
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _config_lines(ax, grid: Grid, unit: str, series: Callable[[Curve], np.ndarray | None]) -> None:
    """One line per configuration on ``ax``: ``series`` of each run (an accuracy in [0, 1]; None: the run lacks it)
    in % against cumulative ``unit``, the mean over seeds with a ± 1 std band; a single seed: its own curve. The
    colour is the configuration's place in the grid, the same in every plot."""
    colours = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(grid.by_config.items()):
        colour = colours[i % len(colours)]
        pairs = [(r.curve.cost[unit], series(r.curve)) for r in runs]
        xs = [x for x, y in pairs if y is not None]
        ys = [100 * y for _, y in pairs if y is not None]
        if len(xs) == 1:
            ax.plot(xs[0], ys[0], marker="o", markersize=3, color=colour, label=f"{label} (1 seed)")
        elif xs:
            x, mean, std = common_grid_mean(xs, ys)
            ax.plot(x, mean, color=colour, label=f"{label} ({len(xs)} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)


def plot_all(
    grid: Grid, out_dir: Path, target: float | None, budget_unit: str, budget_amount: float
) -> dict[str, Path]:
    """Write ``acc_vs_<unit>.png`` for every cost unit; returns unit -> file."""
    plt = _pyplot()
    files = {}
    for unit in COST_UNITS:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        _config_lines(ax, grid, unit, lambda c: c.acc)
        if target is not None:  # one target for the whole grid
            ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:.1f}%")
        if unit == budget_unit:
            ax.axvline(budget_amount, color="grey", linestyle=":", linewidth=1, label="budget")
        ax.set_xlabel(AXIS_LABELS[unit])
        _short_ticks(ax)
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{grid.name}: held-out accuracy vs {UNIT_NAMES[unit]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"acc_vs_{unit}.png"
        fig.savefig(path)
        plt.close(fig)
        files[unit] = path
    return files


def plot_levels(grid: Grid, out_dir: Path, budget_unit: str, budget_amount: float) -> Path | None:
    """Write ``LEVEL_PLOT``: one subplot per difficulty level (``val/acc_level_<level>``), accuracy against
    cumulative samples (a shared x axis; each subplot its own y range), the lines of ``plot_all`` and one legend.
    Returns the file, or None when no run logs per-level accuracy."""
    levels = level_names(lv for r in grid.runs for lv in r.curve.levels)
    if not levels:
        return None
    plt = _pyplot()
    cols = min(3, len(levels))
    rows = math.ceil(len(levels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.0 * rows + 1.2), dpi=120, sharex=True, squeeze=False, layout="constrained"
    )
    legend = {}
    for ax, level in zip(axes.flat, levels):
        _config_lines(ax, grid, "samples", lambda c, lv=level: c.levels.get(lv))
        if budget_unit == "samples":
            ax.axvline(budget_amount, color="grey", linestyle=":", linewidth=1, label="budget")
        ax.set_title(f"level {level}")
        ax.tick_params(labelbottom=True)  # also above an empty slot of the last row
        _short_ticks(ax)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles))  # one entry per label across the subplots
    for ax in axes.flat[len(levels) :]:
        ax.remove()
    fig.supxlabel(AXIS_LABELS["samples"])
    fig.supylabel("held-out accuracy (%)")
    fig.suptitle(f"{grid.name}: held-out accuracy per difficulty level vs samples")
    fig.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize="small")
    path = out_dir / LEVEL_PLOT
    fig.savefig(path)
    plt.close(fig)
    return path
