"""The E-step's distributed handle (``Dist``: rank, world, sums over ranks for its numpy bookkeeping), and the
per-rank parts of a checkpoint (each rank's rollouts and RNG streams) gathered for the one file rank 0 writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import lightning as L
import numpy as np
import torch

__all__ = ["Dist", "gather_per_rank", "pick_own", "reduce_sum"]


@dataclass(frozen=True)
class Dist:
    """Where this process stands among the ranks, and an element-wise sum over them (a collective: every rank
    calls it as often). ``Dist()``: one process."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    reduce: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def of(cls, trainer: L.Trainer) -> Dist:
        device = trainer.strategy.root_device
        return cls(trainer.global_rank, trainer.world_size, device, lambda values: reduce_sum(trainer, values))

    def sum(self, values: np.ndarray) -> np.ndarray:
        return values if self.world == 1 or self.reduce is None else self.reduce(values)

    def to_global(self, local: np.ndarray, num_prompts: int) -> np.ndarray:
        """This rank's per-prompt values (its prompts sit at positions rank::world) → the global array."""
        out = np.zeros(num_prompts, dtype=np.float64)
        out[self.rank :: self.world] = local
        return self.sum(out)


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
