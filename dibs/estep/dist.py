"""The E-step's view of the processes: its rank, the world size, its device and an element-wise sum over ranks
(``dibs.lit.dist.dist_of`` builds one from a Lightning trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = ["Dist"]


@dataclass(frozen=True)
class Dist:
    """Where this process stands among the ranks, and an element-wise sum over them (a collective: every rank
    calls it as often). ``Dist()``: one process."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    reduce: Callable[[np.ndarray], np.ndarray] | None = None

    def sum(self, values: np.ndarray) -> np.ndarray:
        return values if self.world == 1 or self.reduce is None else self.reduce(values)

    def to_global(self, local: np.ndarray, num_prompts: int) -> np.ndarray:
        """This rank's per-prompt values (its prompts sit at positions rank::world) → the global array."""
        out = np.zeros(num_prompts, dtype=np.float64)
        out[self.rank :: self.world] = local
        return self.sum(out)
