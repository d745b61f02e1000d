"""The E-step's training side (step 4 of ``dibs.lit.estep``): each sample's advantage within its prompt's
group, the samples the M-step trains on, and their old and reference log-probs computed by the training module.

Groups: a prompt's group is all of its kept samples in the iteration (every round's samples the strategy keeps,
e.g. GVM's reused pilot samples within n_i plus stage 2's), of whatever size the strategy gave it. Prompts are
sharded by rank, so a group never spans ranks and the advantages need no communication.

Old log-probs: the importance ratio π_θ / π_old of RAFT++ and GRPO needs the log-probs of the policy that drew
the samples. The generator's own (``Completion.logprobs``) come from another copy of the weights, another
batch layout and, with other backends, other kernels; recomputing them with the training policy's forward
makes the first update's ratio 1, and the gap between the two is logged (``rollout/logprob_gap_*``): stale
weights in a generator show up there first. Under FSDP2 every forward is a collective, so every rank runs
as many forward calls (a rank with fewer chunks runs dummy ones), as ``dibs.lit.estimates`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch

from dibs.core.batching import pad_right
from dibs.core.losses import equal_reward_groups
from dibs.lit.datamodule import Trajectory
from dibs.lit.dist import reduce_sum
from dibs.rollout.base import Completion

__all__ = ["build_trajectories", "select_training", "score_trajectories"]


def build_trajectories(
    samples: Sequence[tuple[int, Sequence[int], Completion]],
    rewards: np.ndarray,
    advantages: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[list[Trajectory], list[bool]]:
    """One trajectory per (train-pool index, prompt ids, completion), with its group's advantage (the algorithm's
    rule, ``dibs.core.losses.ALGORITHMS``) and the sampler's log-probs as old ones; and, per sample, whether its
    group (≥ 2 samples) has all-equal rewards (A = 0 for GRPO and Dr.GRPO)."""
    reward = torch.as_tensor(rewards, dtype=torch.float32)  # [S]
    group = torch.tensor([i for i, _, _ in samples], dtype=torch.long)  # [S]
    advantage = advantages(reward, group).tolist()
    equal = equal_reward_groups(reward, group).tolist()
    trajectories = [
        Trajectory(torch.as_tensor(ids), c.token_ids, c.logprobs, a, float(r), i, c.logprobs)
        for (i, ids, c), a, r in zip(samples, advantage, reward.tolist())
    ]
    return trajectories, equal


def select_training(
    trajectories: Sequence[Trajectory], equal: Sequence[bool], *, keep_rejected: bool, filter_equal_groups: bool
) -> tuple[list[Trajectory], np.ndarray]:
    """The samples the M-step trains on, and this rank's counts [training samples, training samples with a
    non-zero advantage, equal-reward groups, samples in them]. ``keep_rejected=False`` keeps A != 0 only
    (RAFT: the accepted samples); ``filter_equal_groups`` drops the groups whose rewards are all equal."""
    train = [
        t
        for t, e in zip(trajectories, equal)
        if (keep_rejected or t.advantage != 0) and not (filter_equal_groups and e)
    ]
    equal_groups = {t.group for t, e in zip(trajectories, equal) if e}
    counts = [len(train), sum(t.advantage != 0 for t in train), len(equal_groups), sum(equal)]
    return train, np.array(counts, dtype=np.float64)


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
            logp, ref = module.score(ids.to(device), mask.to(device))  # [b, L-1] each, ref None without KL
        for row, j in enumerate(chunk):
            t = rows[j]
            cols = slice(len(t.prompt_ids) - 1, len(t.prompt_ids) - 1 + len(t.response_ids))  # response targets
            mine = logp[row, cols].float().cpu()  # [T]
            gap = (mine - t.sampler_logprobs).abs()  # [T]
            gap_sum, tokens = gap_sum + float(gap.sum()), tokens + len(gap)
            gap_max = max(gap_max, float(gap.max())) if len(gap) else gap_max
            rows[j] = dataclasses.replace(
                t,
                old_logprobs=mine if replace_old else t.old_logprobs,
                ref_logprobs=None if ref is None else ref[row, cols].float().cpu(),
            )
    local = np.zeros(2 + trainer.world_size)
    local[0], local[1], local[2 + trainer.global_rank] = gap_sum, tokens, gap_max
    total = reduce_sum(trainer, local)
    metrics = {"rollout/logprob_gap_mean": total[0] / max(total[1], 1.0), "rollout/logprob_gap_max": total[2:].max()}
    return rows, metrics
