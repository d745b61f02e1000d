"""Per-prompt sample budgets: the allocator interface and RAFT's uniform best-of-n.

An allocator turns per-prompt statistics from a pilot (acceptance rate p_i, gradient norm G_i; PAPER.md
section 3) into integer sample counts n_i with Σ n_i == budget exactly. The uniform allocator needs no
pilot: n_i = n for every prompt (RAFT's best-of-n, PAPER.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["PromptStats", "Allocator", "UniformAllocator"]


@dataclass(frozen=True)
class PromptStats:
    """Pilot statistics, one entry per prompt of the iteration (global, identical on every rank)."""

    accept_rate: np.ndarray  # [P] float in [0, 1]
    grad_norm: np.ndarray  # [P] float >= 0
    samples: np.ndarray | None = None  # [P] how many samples each rate was measured on (None: unknown)


class Allocator(Protocol):
    pilot_samples: int  # N' samples per prompt drawn before allocating (0: no pilot)

    def budget(self, num_prompts: int) -> int:
        """Total stage-2 samples N for an iteration of ``num_prompts`` prompts."""
        ...

    def allocate(self, num_prompts: int, stats: PromptStats | None = None) -> np.ndarray:
        """Integer n_i >= 0, shape [num_prompts], summing to exactly ``budget(num_prompts)`` (or, when the
        allocator aligns totals to a multiple, to the largest such multiple not above it)."""
        ...


@dataclass(frozen=True)
class UniformAllocator:
    """n samples for every prompt: RAFT's best-of-n."""

    n_per_prompt: int = 4
    pilot_samples: int = field(default=0, init=False)  # no pilot: the allocation does not look at statistics

    def __post_init__(self) -> None:
        if self.n_per_prompt < 1:
            raise ValueError(f"n_per_prompt must be >= 1, got {self.n_per_prompt}")

    def budget(self, num_prompts: int) -> int:
        return self.n_per_prompt * num_prompts

    def allocate(self, num_prompts: int, stats: PromptStats | None = None) -> np.ndarray:
        del stats  # uniform allocation ignores pilot statistics by definition
        return np.full(num_prompts, self.n_per_prompt, dtype=np.int64)
