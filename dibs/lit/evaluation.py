"""Held-out evaluation by sampling: Average@k per difficulty level, summed across ranks.

Every rank samples k completions for its slice of the test problems through the same generator and
verifier as the E-step; per-level reward sums and counts are all-reduced, so the numbers do not depend
on the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch

from dibs.core.metrics import level_accuracy, level_sums
from dibs.core.verifier import STATUSES
from dibs.rollout.base import Generator, SamplingParams

__all__ = ["EvalResult", "evaluate", "reduce_sum", "format_summary"]


@dataclass(frozen=True)
class EvalResult:
    accuracy: dict[str, float]  # level -> Average@k, plus "all"
    num_problems: int
    failures: dict[str, int] = field(default_factory=dict)  # verifier statuses that are not a verdict


def reduce_sum(trainer: L.Trainer, values: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (identity on one process)."""
    if trainer.world_size == 1:
        return values
    tensor = torch.as_tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    return trainer.strategy.reduce(tensor, reduce_op="sum").cpu().numpy()


def evaluate(
    trainer: L.Trainer, generator: Generator, verifier, datamodule, *, samples: int, sampling: SamplingParams
) -> EvalResult:
    shard = datamodule.test_shard(trainer.global_rank, trainer.world_size)
    problems = [datamodule.test_problems[i] for i in shard]
    all_levels = sorted({p.level for p in datamodule.test_problems})
    completions = (
        generator.generate([datamodule.test_prompts[i] for i in shard], [samples] * len(shard), sampling)
        if shard
        else []
    )
    texts = [c.text for group in completions for c in group]
    golds = [p.answer for p, group in zip(problems, completions) for _ in group]
    levels = [p.level for p, group in zip(problems, completions) for _ in group]
    result = verifier.score(texts, golds) if texts else None
    rewards = result.rewards if result is not None else np.zeros(0)
    counts = result.counts() if result is not None else {}
    failure_keys = tuple(s for s in STATUSES if s not in ("exact", "verified", "rejected"))
    local = np.concatenate([level_sums(rewards, levels, all_levels).ravel(), [counts.get(k, 0) for k in failure_keys]])
    total = reduce_sum(trainer, local)
    sums = total[: 2 * len(all_levels)].reshape(2, len(all_levels))
    failures = {k: int(v) for k, v in zip(failure_keys, total[2 * len(all_levels) :])}
    return EvalResult(level_accuracy(sums, all_levels), len(datamodule.test_problems), failures)


def format_summary(first: EvalResult, last: EvalResult, *, samples: int, where: dict[str, str]) -> str:
    """The end-of-run table: accuracy per difficulty level for π0 and the final policy."""
    lines = [
        f"Held-out Average@{samples} by difficulty level ({last.num_problems} problems)",
        f"{'level':>8} | {'pi0':>7} | {'final':>7} | {'change':>7}",
        "-" * 40,
    ]
    for level in [lv for lv in first.accuracy if lv != "all"] + ["all"]:
        a, b = first.accuracy.get(level, float("nan")), last.accuracy.get(level, float("nan"))
        lines.append(f"{level:>8} | {100 * a:6.1f}% | {100 * b:6.1f}% | {100 * (b - a):+6.1f}")
    lines.append("")
    lines += [f"{name:>12}: {path}" for name, path in where.items()]
    return "\n".join(lines)
