"""The E-step's scorer: the training samples' old and reference log-probs computed by the training module.

Old log-probs: the importance ratio π_θ / π_old of RAFT++ and GRPO needs the log-probs of the policy that drew
the samples. The generator's own (``Completion.logprobs``) come from another copy of the weights, another
batch layout and, with other backends, other kernels; recomputing them with the training policy's forward
makes the first update's ratio 1, and the gap between the two is logged (``rollout/logprob_gap_*``): stale
weights in a generator show up there first. Under FSDP2 every forward is a collective, so every rank runs
as many forward calls (a rank with fewer chunks runs dummy ones), as ``dibs.estep.gradnorms`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch

from dibs.core.batching import pad_right
from dibs.estep.samples import Trajectory
from dibs.lit.dist import reduce_sum

__all__ = ["sampler_logprobs_are_trainers", "score_trajectories"]


FULL_PRECISION = ("32-true", "32", "64-true", "64")


def sampler_logprobs_are_trainers(generator: Any, module: L.LightningModule, trainer: L.Trainer) -> bool:
    """True where the generator's log-probs are the training policy's own computation: a backend that runs the
    policy's module class on a copy of its weights refreshed before every E-step (``logprobs_are_trainers``),
    in the policy's dtype, under a trainer that computes in that same precision (no autocast). They then differ
    from a recomputation only by float rounding, and ``algo.recompute_old_logprobs=auto`` skips it."""
    if not getattr(generator, "logprobs_are_trainers", False) or str(trainer.precision) not in FULL_PRECISION:
        return False
    sampler = next(generator.model.parameters()).dtype
    return all(p.dtype == sampler for p in module.policy.parameters())


def score_trajectories(
    trainer: L.Trainer,
    module: Any,
    trajectories: Sequence[Trajectory],
    *,
    rows_per_forward: int,
    pad_id: int,
    replace_old: bool,
) -> tuple[list[Trajectory], dict[str, float]]:
    """The trajectories with the reference's log-probs (when the module keeps one) and, if ``replace_old``,
    the training policy's as old log-probs; and the sampler–trainer gap over all ranks' response tokens.
    A collective: every rank calls it, with or without trajectories."""
    rows = list(trajectories)
    order = sorted(range(len(rows)), key=lambda k: len(rows[k].prompt_ids) + len(rows[k].response_ids))
    chunks = [order[k : k + rows_per_forward] for k in range(0, len(order), rows_per_forward)]
    counts = np.zeros(trainer.world_size)
    counts[trainer.global_rank] = len(chunks)
    rounds = int(reduce_sum(trainer, counts).max())
    device = trainer.strategy.root_device
    dummy = [(torch.tensor([pad_id]), torch.tensor([pad_id]))]
    gap_sum, gap_max, tokens = 0.0, 0.0, 0
    for k in range(rounds):
        chunk = chunks[k] if k < len(chunks) else []
        pairs = [(rows[j].prompt_ids, rows[j].response_ids) for j in chunk] or dummy
        ids, mask = pad_right([torch.cat(pair) for pair in pairs], pad_id)  # [b, L]
        with trainer.precision_plugin.forward_context():  # the precision training_step runs in (bf16 autocast)
            logp, ref = module.score(ids.to(device), mask.to(device), policy=replace_old)  # [b, L-1], None if not asked
        for row, j in enumerate(chunk):
            t = rows[j]
            cols = slice(len(t.prompt_ids) - 1, len(t.prompt_ids) - 1 + len(t.response_ids))  # response targets
            mine = t.old_logprobs
            if replace_old:
                mine = logp[row, cols].float().cpu()  # [T]
                gap = (mine - t.sampler_logprobs).abs()  # [T]
                gap_sum, tokens = gap_sum + float(gap.sum()), tokens + len(gap)
                gap_max = max(gap_max, float(gap.max())) if len(gap) else gap_max
            rows[j] = dataclasses.replace(
                t,
                old_logprobs=mine,
                ref_logprobs=None if ref is None else ref[row, cols].float().cpu(),
            )
    if not replace_old:  # nothing recomputed: no gap to report
        return rows, {}
    local = np.zeros(2 + trainer.world_size)
    local[0], local[1], local[2 + trainer.global_rank] = gap_sum, tokens, gap_max
    total = reduce_sum(trainer, local)
    metrics = {"rollout/logprob_gap_mean": total[0] / max(total[1], 1.0), "rollout/logprob_gap_max": total[2:].max()}
    return rows, metrics
