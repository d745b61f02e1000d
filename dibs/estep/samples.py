"""What an E-step works on and hands over: the iteration's prompts (``IterationPrompts``), and the training
samples (``Trajectory``) with their advantages by prompt group and the choice of which ones train.

Groups: a prompt's group is all of its kept samples in the iteration (every round's samples the strategy keeps,
e.g. GVM's reused pilot samples within n_i plus the second round's), of whatever size the strategy gave it.
Prompts are sharded by rank, so a group never spans ranks and the advantages need no communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from dibs.core.losses import equal_reward_groups
from dibs.rollout.base import Completion

__all__ = [
    "IterationPrompts",
    "Trajectory",
    "build_trajectories",
    "pack_trajectories",
    "select_training",
    "unpack_trajectories",
]

_TENSORS = ("prompt_ids", "response_ids", "old_logprobs", "sampler_logprobs", "ref_logprobs")
_SCALARS = ("advantage", "reward", "group")


@dataclass(frozen=True)
class Trajectory:
    prompt_ids: torch.Tensor  # [Lp] int64
    response_ids: torch.Tensor  # [T] int64
    old_logprobs: torch.Tensor  # [T] float32, log π_old of each response token (trainer's or sampler's)
    advantage: float
    reward: float
    group: int  # the prompt's index in the train pool: GRPO's group
    sampler_logprobs: torch.Tensor | None = None  # [T] float32, the generator's log-probs
    ref_logprobs: torch.Tensor | None = None  # [T] float32, the frozen reference's (KL), when kept


@dataclass(frozen=True)
class IterationPrompts:
    """An iteration's prompts as an E-step sees them."""

    pool: np.ndarray  # [P] train-pool index of every prompt of the iteration (global, the same on all ranks)
    token_ids: Sequence[Sequence[int]]  # this rank's prompts (positions rank::world)
    answers: Sequence[str]  # their gold answers


def build_trajectories(
    samples: Sequence[tuple[int, Sequence[int], Completion]],
    rewards: np.ndarray,
    advantages: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    baseline: dict[int, float] | None = None,
) -> tuple[list[Trajectory], list[bool]]:
    """One trajectory per (train-pool index, prompt ids, completion), with its group's advantage and the sampler's
    log-probs as old ones; and, per sample, whether its group (≥ 2 samples) has all-equal rewards (A = 0 for GRPO
    and Dr.GRPO). The advantage is the algorithm's rule (``dibs.core.losses.ALGORITHMS``), or r − ``baseline`` of
    the sample's prompt when the strategy gives one (Reinforce-Ada's mean over everything drawn for the prompt)."""
    reward = torch.as_tensor(rewards, dtype=torch.float32)  # [S]
    group = torch.tensor([i for i, _, _ in samples], dtype=torch.long)  # [S]
    if baseline is None:
        advantage = advantages(reward, group).tolist()
    else:
        advantage = (reward - torch.tensor([baseline[i] for i, _, _ in samples], dtype=torch.float32)).tolist()
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


def pack_trajectories(trajectories: Sequence[Trajectory]) -> dict[str, torch.Tensor]:
    """Trajectories as a few flat tensors (one per field, with each row's length; a field a row lacks has a
    presence flag): what a checkpoint stores, since ``torch.save`` pays per tensor and an iteration holds
    thousands of small ones. ``unpack_trajectories`` gives back equal trajectories, bit for bit."""
    rows = list(trajectories)
    packed: dict[str, torch.Tensor] = {"count": torch.tensor(len(rows))}
    for name in _TENSORS:
        values = [getattr(t, name) for t in rows]
        present = torch.tensor([v is not None for v in values], dtype=torch.bool)
        kept = [v for v in values if v is not None]
        packed[f"{name}.present"] = present
        packed[f"{name}.lengths"] = torch.tensor([len(v) for v in kept], dtype=torch.long)
        packed[f"{name}.values"] = torch.cat(kept) if kept else torch.zeros(0)
    packed["advantage"] = torch.tensor([t.advantage for t in rows], dtype=torch.float64)
    packed["reward"] = torch.tensor([t.reward for t in rows], dtype=torch.float64)
    packed["group"] = torch.tensor([t.group for t in rows], dtype=torch.long)
    return packed


def unpack_trajectories(packed: dict[str, torch.Tensor]) -> list[Trajectory]:
    count = int(packed["count"])
    fields: dict[str, list] = {}
    for name in _TENSORS:
        pieces = iter(torch.split(packed[f"{name}.values"], packed[f"{name}.lengths"].tolist()))
        fields[name] = [next(pieces) if p else None for p in packed[f"{name}.present"].tolist()]
    advantage, reward, group = (packed[k].tolist() for k in _SCALARS)
    return [
        Trajectory(
            **{name: fields[name][i] for name in _TENSORS}, advantage=advantage[i], reward=reward[i], group=group[i]
        )
        for i in range(count)
    ]
