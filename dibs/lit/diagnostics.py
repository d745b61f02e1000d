"""The allocation's pictures: histograms of n_i, p_i and G_i, and n_i against p_i coloured by G_i, sent to every
logger that can hold them (``dibs.lit.loggers``; the scalars, ``alloc/*``, come with the E-step's result,
``dibs.estep.step``)."""

from __future__ import annotations

import lightning as L
import numpy as np

from dibs.core.gvm import PromptStats
from dibs.lit.loggers import holders, log_figure, log_histogram
from dibs.lit.logs import log_step

__all__ = ["log_allocation_images"]


def log_allocation_images(trainer: L.Trainer, stats: PromptStats, n: np.ndarray, iteration: int) -> None:
    """Histograms of n_i, p_i and G_i and a scatter of n_i against p_i coloured by G_i (rank zero only; the figure
    is drawn only when a logger can hold it)."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    step = log_step(trainer)
    p, g = stats.accept_rate, stats.grad_norm
    log_histogram(trainer.loggers, "alloc/n", n, step)
    log_histogram(trainer.loggers, "alloc/p", p, step)
    log_histogram(trainer.loggers, "alloc/G", g, step)
    if not holders(trainer.loggers, "figure"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    points = ax.scatter(p, n, c=g, s=10, cmap="viridis")
    fig.colorbar(points, ax=ax, label="G_i")
    # ``iteration``: the E-step's 0-based index; titled from 1, as every message numbers iterations
    ax.set(xlabel="pilot acceptance rate p_i", ylabel="samples n_i", title=f"allocation, iteration {iteration + 1}")
    fig.tight_layout()
    log_figure(trainer.loggers, "alloc/n_vs_p", fig, step)
