"""GVM allocation diagnostics for TensorBoard: how uneven the allocation is, what it buys against uniform at
the same budget, and how well the pilot predicted stage 2's acceptance."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np

from dibs.core.allocation import PromptStats
from dibs.core.gvm import gini, variance_bound
from dibs.lit.logs import log_step

__all__ = ["allocation_metrics", "log_allocation_images"]


def allocation_metrics(allocator: Any, stats: PromptStats, n: np.ndarray, realised: np.ndarray) -> dict[str, float]:
    """Scalars of one allocation; ``realised`` = (predicted accepted, accepted, drawn) over stage 2's fresh samples."""
    alpha, beta = getattr(allocator, "alpha", 1e-3), getattr(allocator, "beta", 2.0)
    p, g = stats.accept_rate, stats.grad_norm
    uniform = np.full(len(n), n.sum() / max(len(n), 1))
    bound, base = variance_bound(n, p, g, alpha, beta), variance_bound(uniform, p, g, alpha, beta)
    predicted, hits, fresh = realised
    return {
        "alloc/zero_frac": float(np.mean(n == 0)),
        "alloc/gini": gini(n),
        "alloc/variance_vs_uniform": bound / base if base > 0 else float("nan"),
        "alloc/max_n": float(n.max()),
        "alloc/pilot_unsolved_frac": float(np.mean(p == 0)),
        "alloc/predicted_accept": predicted / fresh if fresh else float("nan"),
        "alloc/realised_accept": hits / fresh if fresh else float("nan"),
    }


def log_allocation_images(trainer: L.Trainer, stats: PromptStats, n: np.ndarray, iteration: int) -> None:
    """Histograms of n_i, p_i and G_i and a scatter of n_i against p_i coloured by G_i (rank zero only)."""
    experiment = getattr(trainer.logger, "experiment", None) if trainer.is_global_zero else None
    if experiment is None or not hasattr(experiment, "add_histogram"):
        return
    step = log_step(trainer)
    p, g = stats.accept_rate, stats.grad_norm
    experiment.add_histogram("alloc/n", n, step)
    experiment.add_histogram("alloc/p", p, step)
    experiment.add_histogram("alloc/G", g, step)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    points = ax.scatter(p, n, c=g, s=10, cmap="viridis")
    fig.colorbar(points, ax=ax, label="G_i")
    ax.set(xlabel="pilot acceptance rate p_i", ylabel="samples n_i", title=f"allocation, iteration {iteration}")
    fig.tight_layout()
    experiment.add_figure("alloc/n_vs_p", fig, step, close=True)
