"""The allocation's pictures for TensorBoard: histograms of n_i, p_i and G_i, and n_i against p_i coloured by G_i
(the scalars, ``alloc/*``, come with the E-step's result, ``dibs.estep.step``)."""

from __future__ import annotations

import lightning as L
import numpy as np

from dibs.core.gvm import PromptStats
from dibs.lit.logs import log_step

__all__ = ["log_allocation_images"]


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
    # ``iteration``: the E-step's 0-based index; titled from 1, as every message numbers iterations
    ax.set(xlabel="pilot acceptance rate p_i", ylabel="samples n_i", title=f"allocation, iteration {iteration + 1}")
    fig.tight_layout()
    experiment.add_figure("alloc/n_vs_p", fig, step, close=True)
