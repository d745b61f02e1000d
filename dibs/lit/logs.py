"""Console/file messages of the kit (the "dibs" logger, written by rank 0 only; Hydra captures it), and the
per-phase accelerator memory the callback logs."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["info", "log_step", "peak_memory", "warn"]

_log = logging.getLogger("dibs")


def log_step(trainer) -> int:
    """The step of every point the kit logs: Lightning's count of batches run (updates, or update slots an
    iteration skipped), so an iteration without an update still gets steps of its own, and a point is logged at
    the same step whether or not the run was resumed."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


@rank_zero_only
def info(message: str) -> None:
    _log.info(message)


@rank_zero_only
def warn(message: str) -> None:
    _log.warning(message)


def peak_memory(device: torch.device, phase: str) -> dict[str, float]:
    """On a CUDA device: the phase's peak of torch's allocations (then reset, so each phase has its own) and the
    memory in use on the whole device (an engine's own pool included), in GiB; nothing elsewhere."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return {f"memory/{phase}_peak_gib": peak / 2**30, f"memory/{phase}_device_used_gib": (total - free) / 2**30}
