"""The EM DataModule: re-samples the iteration's prompts every epoch and serves its trajectories.

Every rank draws the same global prompt subset (seeded by the iteration) and keeps its own slice. The
rollout callback fills in the trajectories before the epoch starts: in the previous epoch's
``on_train_epoch_end``, or through ``rollout_fn`` when ``train_dataloader()`` finds them missing (the first
epoch, a resumed run). The loader yields exactly ``updates_per_iteration`` batches, whatever the
number of samples, so every method gets the same number of optimiser updates per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers import PreTrainedTokenizerBase

from dibs.core.batching import pad_right
from dibs.data.prompts import PromptTemplate, encode_prompts
from dibs.data.records import Problem

__all__ = ["Trajectory", "collate_trajectories", "EMDataModule"]


@dataclass(frozen=True)
class Trajectory:
    prompt_ids: torch.Tensor  # [Lp] int64
    response_ids: torch.Tensor  # [T] int64
    old_logprobs: torch.Tensor  # [T] float32, log π_old of each response token
    advantage: float
    reward: float


def collate_trajectories(items: Sequence[Trajectory], pad_id: int, skip: bool = False) -> dict[str, Any]:
    """Right-padded prompt+response rows; response-aligned tensors are shifted to the [B, L−1] targets."""
    ids, mask = pad_right([torch.cat([t.prompt_ids, t.response_ids]) for t in items], pad_id)  # [B, L]
    response_mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)  # [B, L-1]
    old_logprobs = torch.zeros(ids.shape[0], ids.shape[1] - 1)  # [B, L-1]
    for row, t in enumerate(items):
        start = len(t.prompt_ids) - 1  # target column of the first response token
        response_mask[row, start : start + len(t.response_ids)] = 1.0
        old_logprobs[row, start : start + len(t.response_ids)] = t.old_logprobs
    advantages = torch.tensor([t.advantage for t in items], dtype=torch.float32)  # [B]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "response_mask": response_mask,
        "old_logprobs": old_logprobs,
        "advantages": advantages,
        "skip": skip,
    }


class EMDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: Sequence[Problem],
        test: Sequence[Problem],
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: PromptTemplate,
        prompts_per_iteration: int,
        batch_size: int,
        updates_per_iteration: int,
        max_prompt_tokens: int = 512,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_problems, self.train_prompts, dropped = encode_prompts(
            train, tokenizer, template, max_prompt_tokens=max_prompt_tokens
        )
        self.test_problems, self.test_prompts, dropped_test = encode_prompts(
            test, tokenizer, template, max_prompt_tokens=max_prompt_tokens
        )
        self.dropped = dropped + dropped_test  # reported by train.py; never silently lost
        if not self.train_problems:
            raise ValueError(f"no training prompt left after filtering ({len(dropped)} over max_prompt_tokens)")
        self.pad_id = tokenizer.pad_token_id
        self.prompts_per_iteration = prompts_per_iteration
        self.batch_size = batch_size
        self.updates_per_iteration = updates_per_iteration
        self.seed = seed
        self.iteration = -1  # the iteration whose trajectories are held
        self.trajectories: list[Trajectory] = []
        self.skip_updates = False
        self.rollout_fn: Callable[[int], None] | None = None  # set by the rollout callback: runs an E-step

    def iteration_prompts(self, iteration: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Indices into the train pool of this rank's prompts for ``iteration`` (same draw on all ranks)."""
        rng = np.random.default_rng([self.seed, iteration])
        count = min(self.prompts_per_iteration, len(self.train_problems))
        chosen = rng.choice(len(self.train_problems), size=count, replace=False)
        return [int(i) for i in chosen[rank::world_size]]

    def test_shard(self, rank: int = 0, world_size: int = 1) -> list[int]:
        return list(range(len(self.test_problems)))[rank::world_size]

    def set_trajectories(self, iteration: int, trajectories: list[Trajectory], skip_updates: bool) -> None:
        if not trajectories:
            raise ValueError(f"iteration {iteration}: no trajectory to train on (no sample was generated)")
        self.iteration, self.trajectories, self.skip_updates = iteration, trajectories, skip_updates

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else self.iteration
        if self.iteration != epoch and self.rollout_fn is not None:
            self.rollout_fn(epoch)  # first epoch, or a resumed run whose checkpoint lacks this epoch's rollouts
        if not self.trajectories:
            raise RuntimeError("train_dataloader() called before an E-step filled the trajectories")
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.iteration)
        # Without replacement; cycles through fresh permutations when updates × batch > samples.
        sampler = RandomSampler(
            self.trajectories, num_samples=self.updates_per_iteration * self.batch_size, generator=generator
        )
        return DataLoader(
            self.trajectories,
            batch_size=self.batch_size,
            sampler=sampler,  # type: ignore[arg-type]
            collate_fn=lambda items: collate_trajectories(items, self.pad_id, self.skip_updates),
        )

    def state_dict(self) -> dict[str, Any]:
        # Plain dicts of tensors: checkpoints stay loadable with torch.load(weights_only=True).
        return {
            "iteration": self.iteration,
            "skip_updates": self.skip_updates,
            "trajectories": [dict(t.__dict__) for t in self.trajectories],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration, self.skip_updates = state["iteration"], state["skip_updates"]
        self.trajectories = [Trajectory(**t) for t in state["trajectories"]]
