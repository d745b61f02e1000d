"""Accuracy-vs-cost PNGs: one line per configuration (mean over seeds) with a mean ± std seed band.

Seeds evaluate at different costs, so each seed's curve is interpolated linearly onto a common x grid, from 0 to
the smallest final cost over the configuration's seeds (no extrapolation), before averaging.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dibs.report.grid import COST_UNITS, Grid

__all__ = ["AXIS_LABELS", "BAND", "UNIT_NAMES", "common_grid_mean", "plot_all"]

AXIS_LABELS = {
    "samples": "generated samples (cumulative)",
    "tokens": "generated response tokens (cumulative)",
    "updates": "optimiser updates (cumulative)",
    "wall_s": "wall seconds generating + verifying + training (cumulative)",
}
UNIT_NAMES = {"samples": "samples", "tokens": "tokens", "updates": "updates", "wall_s": "wall seconds"}
BAND = "mean ± 1 sample std over seeds"
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


def plot_all(grid: Grid, out_dir: Path, target: float, budget_unit: str, budget_amount: float) -> dict[str, Path]:
    """Write ``acc_vs_<unit>.png`` for every cost unit; returns unit -> file."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; before pyplot is imported
    import matplotlib.pyplot as plt

    files = {}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for unit in COST_UNITS:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for i, (label, runs) in enumerate(grid.by_config.items()):
            colour = colours[i % len(colours)]
            xs = [r.curve.cost[unit] for r in runs]
            ys = [100 * r.curve.acc for r in runs]
            if len(runs) == 1:
                ax.plot(xs[0], ys[0], marker="o", markersize=3, color=colour, label=f"{label} (1 seed)")
                continue
            x, mean, std = common_grid_mean(xs, ys)
            ax.plot(x, mean, color=colour, label=f"{label} ({len(runs)} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:.1f}%")
        if unit == budget_unit:
            ax.axvline(budget_amount, color="grey", linestyle=":", linewidth=1, label="budget")
        ax.set_xlabel(AXIS_LABELS[unit])
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
