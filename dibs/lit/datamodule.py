"""The EM DataModule: re-samples the iteration's prompts every epoch and serves its trajectories.

Every rank draws the same global prompts for the iteration (``pool_sampling``: a random subset seeded by the
iteration, or the iteration's shard of the once-shuffled pool, ``dibs.data.pools``) and keeps its own slice
(``prompts_for``). Its ``source`` (the rollout callback, given at construction) runs the E-step and hands back the
trajectories before the epoch starts: at the previous epoch's end, or when ``train_dataloader()`` finds them
missing (the first epoch, a resumed run). One batch = one optimiser update. ``update_accounting``:

- ``fixed`` (default): exactly ``updates_per_iteration`` batches of ``batch_size`` sequences, whatever the
  number of samples, so every method gets the same number of optimiser updates per iteration.
- ``reference``: one pass over the iteration's training samples in mini-batches of ``batch_size ×
  rows_per_prompt`` sequences per rank, as the reference's verl runs (``ppo_mini_batch_size`` prompts ×
  ``rollout.n`` rows); the number of updates follows the number of samples, so a method that draws more
  samples also makes more updates.
  Every rank runs the same number, ceil(all ranks' samples / (mini-batch × ranks)), each cutting its own
  samples into that many near-equal batches.
- ``per_sample``: one update of ``batch_size`` sequences per ``samples_per_update`` generated samples (pilots,
  discarded and refilled samples included), counted cumulatively: an iteration makes
  ``floor(C_k / K) - floor(C_{k-1} / K)`` updates, C_k the samples generated up to iteration k. Two runs that
  generate the same samples make the same updates, however differently their strategies spend them per
  iteration: equal samples and equal updates at once (the allocation arena). An iteration may make none.

A rank left without a sample for a batch (it has none to train on, or fewer than the updates) gets a
placeholder: one dummy row whose ``row_mask`` and ``response_mask`` are 0, so it runs the forward and backward
the other ranks' collectives wait for and adds nothing to the loss or its normaliser.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Protocol, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from transformers import PreTrainedTokenizerBase

from dibs.core.batching import pad_right
from dibs.core.budget import Budget
from dibs.core.sampling import Strategy
from dibs.data.pools import POOL_MODES, iteration_indices
from dibs.data.prompts import PromptTemplate, encode_prompts_cached
from dibs.data.records import Problem
from dibs.estep.samples import IterationPrompts, Trajectory, pack_trajectories, unpack_trajectories
from dibs.lit.dist import gather_per_rank, pick_own
from dibs.lit.logs import info, warn

__all__ = [
    "UPDATE_ACCOUNTING",
    "EMDataModule",
    "RolloutSource",
    "check_update_accounting",
    "collate_trajectories",
    "schedule_horizon",
]


UPDATE_ACCOUNTING = ("fixed", "reference", "per_sample")


class RolloutSource(Protocol):
    def rollouts(self, trainer: L.Trainer, iteration: int) -> None:
        """Run ``iteration``'s E-step and hand its trajectories to ``set_trajectories``."""


class _Batches:
    """The iteration's batches of indices, from ``start`` on; its length is always the whole iteration's, which
    Lightning's batch counters (restored from a mid-iteration checkpoint) count against."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches, self.start = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[self.start :])


class ResumableLoader(DataLoader):
    """The iteration's DataLoader, resumable mid-iteration (Lightning's ``state_dict``/``load_state_dict``
    protocol for data loaders): a checkpoint saved after k updates records k, and the restored loader serves
    the remaining batches only, so no update is made twice."""

    def __init__(self, datamodule: EMDataModule, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dm, self.iteration = datamodule, datamodule.iteration

    def state_dict(self) -> dict[str, int]:
        trainer = self._dm.trainer
        served = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        return {"iteration": self.iteration, "served": int(served)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("iteration") == self.iteration:  # a later iteration's loader starts at its first batch
            self.batch_sampler.start = int(state["served"])


def _placeholder(pad_id: int) -> Trajectory:
    one = torch.tensor([pad_id])
    return Trajectory(one, one, torch.zeros(1), 0.0, 0.0, -1, None, torch.zeros(1))


def collate_trajectories(
    items: Sequence[Trajectory], pad_id: int, skip: bool = False, idle: bool = False
) -> dict[str, Any]:
    """Right-padded prompt+response rows; response-aligned tensors are shifted to the [B, L−1] targets.
    No items: one placeholder row of weight 0 (``row_mask`` 0, see the module docstring)."""
    real = len(items) > 0
    items = items if real else [_placeholder(pad_id)]
    ids, mask = pad_right([torch.cat([t.prompt_ids, t.response_ids]) for t in items], pad_id)  # [B, L]
    response_mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)  # [B, L-1]
    old_logprobs = torch.zeros(ids.shape[0], ids.shape[1] - 1)  # [B, L-1]
    with_ref = all(t.ref_logprobs is not None for t in items)
    ref_logprobs = torch.zeros(ids.shape[0], ids.shape[1] - 1)  # [B, L-1]
    for row, t in enumerate(items):
        cols = slice(len(t.prompt_ids) - 1, len(t.prompt_ids) - 1 + len(t.response_ids))  # response targets
        response_mask[row, cols] = float(real)
        old_logprobs[row, cols] = t.old_logprobs
        if with_ref:
            ref_logprobs[row, cols] = t.ref_logprobs
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "response_mask": response_mask,
        "old_logprobs": old_logprobs,
        "advantages": torch.tensor([t.advantage for t in items], dtype=torch.float32),  # [B]
        "rewards": torch.tensor([t.reward for t in items], dtype=torch.float32),  # [B]
        "group": torch.tensor([t.group for t in items], dtype=torch.long),  # [B]
        "row_mask": torch.full((len(items),), float(real)),  # [B] 1: a training sample, 0: a placeholder
        "skip": skip or idle,
        "idle": idle,  # not an update slot at all: an iteration that makes none (update_accounting=per_sample)
    }
    if with_ref:
        batch["ref_logprobs"] = ref_logprobs
    return batch


class EMDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: Sequence[Problem],
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: PromptTemplate,
        prompts_per_iteration: int,
        pool_sampling: str,
        batch_size: int,
        updates_per_iteration: int,
        update_accounting: str,
        samples_per_update: int,
        rows_per_prompt: int,
        max_prompt_tokens: int,
        seed: int,
        source: RolloutSource | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if update_accounting not in UPDATE_ACCOUNTING:
            raise ValueError(f"update_accounting={update_accounting!r} is not one of {UPDATE_ACCOUNTING}")
        if update_accounting == "per_sample" and samples_per_update < 1:
            raise ValueError(f"samples_per_update={samples_per_update} must be >= 1 under update_accounting=per_sample")
        if pool_sampling not in POOL_MODES:
            raise ValueError(f"pool_sampling={pool_sampling!r} is not one of {POOL_MODES}")
        self.train_problems, self.train_prompts, self.dropped = encode_prompts_cached(
            train, tokenizer, template, max_prompt_tokens=max_prompt_tokens, cache_dir=cache_dir
        )  # self.dropped: reported by train.py; never silently lost
        if not self.train_problems:
            raise ValueError(f"no training prompt left after filtering ({len(self.dropped)} over max_prompt_tokens)")
        self.pool_sampling = pool_sampling
        self.pad_id = tokenizer.pad_token_id
        self.prompts_per_iteration = prompts_per_iteration
        self.batch_size = batch_size
        self.updates_per_iteration = updates_per_iteration
        self.update_accounting = update_accounting
        self.samples_per_update = samples_per_update
        self.rows_per_update = batch_size * (rows_per_prompt if update_accounting == "reference" else 1)
        self.seed = seed
        self.iteration = -1  # the iteration whose trajectories are held
        self.trajectories: list[Trajectory] = []
        self.skip_updates = False
        self.updates = updates_per_iteration  # optimiser updates (batches) of the held iteration
        self.source = source  # runs an E-step when the trajectories of the epoch about to run are missing

    def iteration_prompts(self, iteration: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Indices into the train pool of this rank's prompts for ``iteration`` (same draw on all ranks): a
        random subset, or the iteration's shard (``pool_sampling``, ``dibs.data.pools``)."""
        count = min(self.prompts_per_iteration, len(self.train_problems))
        chosen = iteration_indices(len(self.train_problems), count, iteration, mode=self.pool_sampling, seed=self.seed)
        return [int(i) for i in chosen[rank::world_size]]

    def prompts_for(self, iteration: int, rank: int = 0, world_size: int = 1) -> IterationPrompts:
        """The iteration's prompts for an E-step on this rank."""
        pool = np.asarray(self.iteration_prompts(iteration), dtype=np.int64)  # drawn once, sliced per rank
        mine = pool[rank::world_size].tolist()
        return IterationPrompts(
            pool=pool,
            token_ids=[self.train_prompts[i] for i in mine],
            answers=[self.train_problems[i].gold for i in mine],
        )

    def set_trajectories(
        self,
        iteration: int,
        trajectories: list[Trajectory],
        skip_updates: bool,
        *,
        total_samples: int | None = None,
        world_size: int = 1,
        generated: tuple[int, int] | None = None,
    ) -> None:
        """This rank's training samples (may be empty); ``total_samples``: all ranks' (None: this rank's);
        ``generated``: the run's cumulative generated samples before and after this E-step (all ranks)."""
        total = len(trajectories) if total_samples is None else total_samples
        if self.update_accounting == "reference":
            self.updates = max(1, math.ceil(total / (self.rows_per_update * world_size)))
        elif self.update_accounting == "per_sample":
            if generated is None:
                raise ValueError("update_accounting=per_sample needs the cumulative samples generated (generated=)")
            before, after = generated
            self.updates = after // self.samples_per_update - before // self.samples_per_update
        else:
            self.updates = self.updates_per_iteration
        self.iteration, self.trajectories, self.skip_updates = iteration, trajectories, skip_updates

    def train_dataloader(self) -> DataLoader:
        # The epoch about to run. Not ``current_epoch``: a checkpoint saved at an epoch's end restores the ended
        # epoch there until the loop resets, after this call; ``processed`` already counts it.
        epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else self.iteration
        if self.iteration != epoch and self.source is not None:
            self.source.rollouts(self.trainer, epoch)  # the first epoch (later ones run at the previous epoch's end)
        if self.iteration < 0:
            raise RuntimeError("train_dataloader() called before an E-step filled the trajectories")
        return ResumableLoader(
            self,
            self.trajectories,
            batch_sampler=_Batches(self._batches()),
            # An iteration without updates still yields one idle placeholder: Lightning ends a fit at an epoch
            # without batches. It takes no optimiser step and no schedule slot.
            collate_fn=partial(
                collate_trajectories, pad_id=self.pad_id, skip=self.skip_updates, idle=self.updates == 0
            ),
        )

    def _batches(self) -> list[list[int]]:
        """Indices of the trajectories in each of the iteration's ``updates`` batches ([] → placeholder)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.iteration)
        if self.update_accounting == "reference":  # one pass, near-equal consecutive chunks of a permutation
            order = torch.randperm(len(self.trajectories), generator=generator)
            return [chunk.tolist() for chunk in torch.tensor_split(order, self.updates)]
        if self.updates == 0:
            return [[]]  # the idle placeholder (train_dataloader)
        if not self.trajectories:
            return [[] for _ in range(self.updates)]
        # Without replacement; cycles through fresh permutations when updates × batch > samples.
        sampler = RandomSampler(self.trajectories, num_samples=self.updates * self.batch_size, generator=generator)
        return list(BatchSampler(sampler, self.batch_size, drop_last=False))

    def state_dict(self) -> dict[str, Any]:
        # Plain dicts of tensors: checkpoints stay loadable with torch.load(weights_only=True). Every rank holds its
        # own slice of the rollouts and the checkpoint is written by rank 0: the slices are gathered (a collective).
        own = {
            "iteration": self.iteration,
            "skip_updates": self.skip_updates,
            "updates": self.updates,
            "packed": pack_trajectories(self.trajectories),  # a few flat tensors: fast to save and load
        }
        return {"per_rank": gather_per_rank(own)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "per_rank" not in state:
            raise RuntimeError(
                "this checkpoint was written by an older dibs (the rollouts of one process only): it cannot be "
                "resumed by this version; start the run again"
            )
        own = pick_own(state["per_rank"], "rollouts")
        self.iteration, self.skip_updates, self.updates = own["iteration"], own["skip_updates"], own["updates"]
        if "packed" in own:
            self.trajectories = unpack_trajectories(own["packed"])
        else:  # written before rollouts were packed: one dict of tensors per trajectory
            self.trajectories = [Trajectory(**t) for t in own["trajectories"]]


def check_update_accounting(update_accounting: str, lr_schedule: str, budget: Budget | None = None) -> None:
    """Under ``update_accounting=reference`` the number of updates per iteration follows the samples drawn, so
    a cosine schedule would have no known end: refused (the paper's schedule is constant). Under ``per_sample``
    the run's updates are ``budget.samples // samples_per_update``: a cosine schedule needs that budget."""
    if update_accounting not in UPDATE_ACCOUNTING:
        raise ValueError(f"update_accounting={update_accounting!r} is not one of {UPDATE_ACCOUNTING}")
    if update_accounting == "per_sample" and lr_schedule == "cosine" and (budget is None or budget.unit != "samples"):
        raise ValueError(
            "update_accounting=per_sample makes one update per samples_per_update generated samples, so "
            "algo.lr_schedule=cosine ends where the sample budget does: set budget.samples, or "
            "algo.lr_schedule=constant"
        )
    if update_accounting == "reference" and lr_schedule == "cosine":
        raise ValueError(
            "update_accounting=reference makes the number of optimiser updates per iteration depend on the "
            "samples drawn, so algo.lr_schedule=cosine has no known horizon: set algo.lr_schedule=constant "
            "(the paper's) or update_accounting=fixed"
        )


def schedule_horizon(
    budget: Budget,
    strategy: Strategy,
    iterations: int,
    updates_per_iteration: int,
    prompts: int,
    *,
    update_accounting: str,
) -> int:
    """Iterations the learning-rate schedule spans: ``iterations``, or fewer when a budget ends the run sooner.

    Warns when the ``iterations`` cap will stop a run before it spends its budget. Under
    ``update_accounting=reference`` only a constant schedule runs (``check_update_accounting``), which reads no
    horizon, and the updates an iteration makes are not known beforehand: ``iterations``.
    """
    if not budget.enabled or update_accounting != "fixed":
        return iterations
    per_iteration = {
        "samples_per_iteration": strategy.max_samples(prompts),
        "updates_per_iteration": updates_per_iteration,
    }
    needed = budget.planned_iterations(10**9, **per_iteration)
    if budget.unit != "tokens" and needed > iterations:
        warn(
            f"budget.{budget.unit}={budget.amount} needs {needed} iterations but iterations={iterations} caps "
            "the run: it will stop short of its budget"
        )
    horizon = budget.planned_iterations(iterations, **per_iteration)
    unforeseen = " (the iterations cap: a token budget cannot be foreseen)" if budget.unit == "tokens" else ""
    info(f"budget: {budget.amount} {budget.unit}; the learning-rate schedule spans {horizon} iterations{unforeseen}")
    return horizon
