"""The E-step's distributed handle for a trainer (``dist_of``: rank, world, sums over ranks), and the per-rank
parts of a checkpoint (each rank's rollouts and RNG streams) gathered for the one file rank 0 writes."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from dibs.estep.dist import Dist

__all__ = ["dist_of", "gather_per_rank", "pick_own", "reduce_sum"]


def dist_of(trainer: L.Trainer) -> Dist:
    """The E-step's handle on this trainer's processes."""
    device = trainer.strategy.root_device
    return Dist(trainer.global_rank, trainer.world_size, device, lambda values: reduce_sum(trainer, values))


def reduce_sum(trainer: L.Trainer, values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (identity on one process)."""
    if trainer.world_size == 1:
        return values
    tensor = torch.as_tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    return trainer.strategy.reduce(tensor, reduce_op="sum").cpu().numpy()


def gather_per_rank(obj):
    """Every rank's ``obj``, in rank order (``[obj]`` on one process). A collective: every rank must call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def pick_own(per_rank: list, what: str):
    """This rank's entry of a list ``gather_per_rank`` made, refusing a checkpoint of another world size."""
    world, rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if len(per_rank) != world:
        raise RuntimeError(
            f"the checkpoint holds the {what} of {len(per_rank)} processes but this run has {world}: resume with the "
            f"same number of processes (trainer.devices x trainer.num_nodes = {len(per_rank)})"
        )
    return per_rank[rank]
