"""The E-step of one EM iteration, read top to bottom (docs/architecture.md, "The E-step"):

1. seed the sampler by (seed, iteration, rank);
2. rounds: the sampling strategy asks for samples per prompt; they are generated, verified, tallied over ranks
   (and their accepted samples' gradient norms measured when the strategy asks); the strategy sees the tally
   and asks for the next round, until it stops or its ``max_samples`` for the iteration is spent;
3. the strategy picks, per prompt, the samples that train; their tally goes back to it (online estimates);
4. advantages by prompt group (the algorithm's rule), the samples the M-step trains on (``keep_rejected``,
   ``filter_equal_groups``), and their old and reference log-probs from the training module (``scorer``);
5. one result: the training samples, every count and cost, the allocation and its estimates.

It takes what it needs explicitly: the generator, the verifier, the strategy, a ``Dist`` handle (rank, world,
sums over ranks), a ``GradNormMeter`` and a scorer. Prompts are sharded by rank (a rank holds positions
rank::world of the iteration's prompts); every decision is taken on global tallies, so all ranks agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dibs.core.gvm import Allocation, PromptStats, gini, variance_bound
from dibs.core.losses import Algorithm
from dibs.core.sampling import Request, RoundTally, Strategy, fit_to_budget
from dibs.core.sampling.base import ACCEPT
from dibs.core.verifier import STATUSES
from dibs.estep.dist import Dist
from dibs.estep.gradnorms import GradNormMeter
from dibs.estep.samples import IterationPrompts, Trajectory, build_trajectories, select_training
from dibs.rollout.base import Completion, SamplingParams, check_logprob_gap

__all__ = ["EStep", "EStepResult", "Round", "check_keep_rejected"]

Scorer = Callable[[list[Trajectory]], tuple[list[Trajectory], dict[str, float]]]


@dataclass
class Round:
    request: Request
    counts: np.ndarray  # [P] drawn (the request, trimmed to the iteration's remaining samples)
    completions: list[list[Completion]]  # this rank's prompts
    rewards: list[np.ndarray]
    statuses: list[list[str]]
    tally: RoundTally


@dataclass
class EStepResult:
    iteration: int
    rounds: list[Round]
    training: list[Trajectory]  # this rank's training samples
    samples: list[tuple[int, Completion]]  # this rank's kept samples (train-pool index, completion), in group order
    rewards: np.ndarray  # their rewards
    statuses: tuple[str, ...]
    skip: bool  # no training sample with a non-zero advantage anywhere: the M-step is skipped
    counts: dict[str, int]  # all ranks: kept samples, training samples, rewards, truncation, verifier statuses
    metrics: dict[str, float] = field(default_factory=dict)  # per-iteration scalars (rollout/*, pilot/*, ...)
    allocation: Allocation | None = None
    estimates: PromptStats | None = None


def check_keep_rejected(algorithm: Algorithm, keep_rejected: bool, strategy: Strategy | None = None) -> None:
    """Settings the E-step cannot run with, refused before any work."""
    if algorithm.needs_rejected and not keep_rejected:
        raise ValueError(
            f"algo.keep_rejected=false with algo.loss={algorithm.name}: its negative advantages live on the "
            "rejected samples, so they are always kept; set algo.keep_rejected=true"
        )
    if strategy is not None and strategy.pool_baseline and not (algorithm.needs_rejected and keep_rejected):
        raise ValueError(
            f"allocation={type(strategy).__name__} sets advantages r - (the mean of everything drawn), negative on "
            f"rejected samples: it needs algo=grpo or drgrpo (not {algorithm.name}) and algo.keep_rejected=true"
        )


class EStep:
    def __init__(
        self,
        generator: Any,
        verifier: Any,
        strategy: Strategy,
        *,
        algorithm: Algorithm,
        sampling: SamplingParams,
        keep_rejected: bool,
        filter_equal_groups: bool,
        seed: int,
        dist: Dist,
        grad_norms: GradNormMeter | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        check_keep_rejected(algorithm, keep_rejected, strategy)
        self.generator, self.verifier, self.strategy = generator, verifier, strategy
        self.algorithm, self.sampling, self.seed, self.dist = algorithm, sampling, seed, dist
        self.keep_rejected, self.filter_equal_groups = keep_rejected, filter_equal_groups
        self.grad_norms, self.scorer = grad_norms, scorer
        self.wants_head_norms = grad_norms is not None and grad_norms.from_generator

    def run(self, iteration: int, prompts: IterationPrompts, limit: int | None = None) -> EStepResult:
        """``limit``: the most samples this E-step may generate (all ranks), below the strategy's own cap; what is
        left of a sample budget, so a run spends it exactly."""
        d, strategy = self.dist, self.strategy
        num_prompts = len(prompts.pool)
        torch.manual_seed(self.seed * 1_000_003 + iteration * 1_009 + d.rank)
        times = {"generation": 0.0, "verification": 0.0}
        grad_before = self.grad_norms.seconds if self.grad_norms is not None else 0.0
        cap = strategy.max_samples(num_prompts) if limit is None else min(strategy.max_samples(num_prompts), limit)
        drawn, rounds, idle = 0, [], 0
        request: Request | None = strategy.begin(iteration, prompts.pool)
        while request is not None:
            counts = fit_to_budget(request.counts, cap - drawn)
            idle = idle + 1 if counts.sum() == 0 else 0  # a round of nothing tells the strategy nothing new
            if idle > 1:
                raise RuntimeError(
                    f"iteration {iteration + 1}: the sampling strategy {type(strategy).__name__} asked for no sample "
                    "twice in a row; it would never stop"
                )
            rounds.append(self._round(request, counts, prompts, times))
            drawn += int(counts.sum())
            # every round is shown to the strategy, the one that spends the cap included (its bookkeeping: the
            # kept groups, the visit history); what it asks for after the cap is not drawn
            request = strategy.next(rounds[-1].tally)
            request = request if drawn < cap else None

        # the samples that train, prompt by prompt, round by round
        kept: list[list[tuple[Completion, float, str]]] = []
        for j, position in enumerate(range(d.rank, num_prompts, d.world)):
            masks = strategy.keep(position, [r.rewards[j] for r in rounds])
            kept.append(
                [
                    (c, float(rw), st)
                    for r, mask in zip(rounds, masks)
                    for c, rw, st, k in zip(r.completions[j], r.rewards[j], r.statuses[j], mask)
                    if k
                ]
            )
        strategy.observe_training(self._training_tally(kept, prompts, num_prompts))  # G_i: time/grad_norms_s

        samples = [
            (int(prompts.pool[p]), c)
            for p, group in zip(range(d.rank, num_prompts, d.world), kept)
            for c, _, _ in group
        ]
        rewards = np.asarray([rw for group in kept for _, rw, _ in group], dtype=np.float32)
        statuses = tuple(st for group in kept for _, _, st in group)
        ids_of = dict(zip(prompts.pool[d.rank :: d.world].tolist(), prompts.token_ids))
        baseline = None
        if strategy.pool_baseline:  # the pool's mean per prompt, by train-pool index
            baseline = dict(zip(prompts.pool.tolist(), strategy.baselines().tolist()))
        trajectories, equal = build_trajectories(
            [(i, ids_of[i], c) for i, c in samples], rewards, self.algorithm.advantages, baseline
        )
        training, train_counts = select_training(
            trajectories, equal, keep_rejected=self.keep_rejected, filter_equal_groups=self.filter_equal_groups
        )
        counts = self._counts(samples, rewards, statuses, train_counts)
        skip = counts["signal"] == 0  # the same global count on every rank
        metrics: dict[str, float] = {}
        if not skip and self.scorer is not None:
            scored_at = time.perf_counter()
            training, metrics = self.scorer(training)
            metrics["time/scoring_s"] = time.perf_counter() - scored_at
            threshold = getattr(self.generator, "logprob_check_threshold", None)
            if threshold is not None and "rollout/logprob_gap_mean" in metrics:
                check_logprob_gap(metrics["rollout/logprob_gap_mean"], threshold)
        metrics.update(self._metrics(rounds, counts, times))
        metrics["time/grad_norms_s"] = (self.grad_norms.seconds if self.grad_norms is not None else 0.0) - grad_before
        planned = next((r for r in rounds if r.request.allocation is not None), None)
        if planned is not None:
            metrics.update(self._allocation_metrics(planned))
        return EStepResult(
            iteration,
            rounds,
            training,
            samples,
            rewards,
            statuses,
            skip,
            counts,
            metrics,
            planned.request.allocation if planned is not None else None,
            planned.request.estimates if planned is not None else None,
        )

    # ---- one round -----------------------------------------------------------------------------
    def _round(self, request: Request, counts: np.ndarray, prompts: IterationPrompts, times: dict) -> Round:
        d = self.dist
        local = counts[d.rank :: d.world]
        started = time.perf_counter()
        if local.sum():
            extra = {"head_grad_norms": True} if self.wants_head_norms and self._wants_norms(request) else {}
            groups = self.generator.generate(prompts.token_ids, [int(n) for n in local], self.sampling, **extra)
        else:
            groups = [[] for _ in prompts.token_ids]
        generated = time.perf_counter()
        scored = self.verifier.score(
            [c.text for g in groups for c in g], [a for a, g in zip(prompts.answers, groups) for _ in g]
        )
        rewards = [np.asarray(r, dtype=np.float64) for r in _regroup(scored.rewards, groups)]
        statuses = _regroup(scored.status, groups)
        times["generation"] += generated - started
        times["verification"] += time.perf_counter() - generated
        num_prompts = len(counts)
        grad = None
        if request.grad_norms:
            accepted = [[c for c, r in zip(g, rs) if r > ACCEPT] for g, rs in zip(groups, rewards)]
            grad = d.to_global(self._meter().per_prompt(prompts.token_ids, accepted), num_prompts)
        tally = RoundTally(
            samples=d.to_global(np.array([len(g) for g in groups], dtype=np.float64), num_prompts),
            hits=d.to_global(np.array([float((r > ACCEPT).sum()) for r in rewards]), num_prompts),
            reward_sum=d.to_global(np.array([float(r.sum()) for r in rewards]), num_prompts),
            grad_norm=grad,
        )
        return Round(request, counts, groups, rewards, statuses, tally)

    def _wants_norms(self, request: Request) -> bool:
        """The generator's closed-form G_i: for a round that measures it, and for every round when the strategy
        measures its training samples later (any round's samples may train)."""
        return request.grad_norms or self.strategy.training_grad_norms > 0

    def _meter(self) -> GradNormMeter:
        if self.grad_norms is None:
            raise RuntimeError("the sampling strategy asked for gradient norms but the E-step has no GradNormMeter")
        return self.grad_norms

    def _training_tally(self, kept, prompts: IterationPrompts, num_prompts: int) -> RoundTally:
        d, cap = self.dist, self.strategy.training_grad_norms
        grad = None
        if cap > 0:  # G_i from up to `cap` accepted training samples per prompt
            accepted = [[c for c, rw, _ in group if rw > ACCEPT][:cap] for group in kept]
            grad = d.to_global(self._meter().per_prompt(prompts.token_ids, accepted), num_prompts)
        return RoundTally(
            samples=d.to_global(np.array([len(g) for g in kept], dtype=np.float64), num_prompts),
            hits=d.to_global(np.array([float(sum(rw > ACCEPT for _, rw, _ in g)) for g in kept]), num_prompts),
            reward_sum=d.to_global(np.array([float(sum(rw for _, rw, _ in g)) for g in kept]), num_prompts),
            grad_norm=grad,
        )

    # ---- counts and metrics ----------------------------------------------------------------------
    def _counts(self, samples, rewards: np.ndarray, statuses, train_counts: np.ndarray) -> dict[str, int]:
        by_status = dict.fromkeys(STATUSES, 0)
        for s in statuses:
            by_status[s] += 1
        local = np.array(
            [
                len(samples),
                sum(len(c.token_ids) for _, c in samples),
                int((rewards > ACCEPT).sum()),
                sum(c.finish_reason == "length" for _, c in samples),
                *train_counts,
            ]
            + [by_status[s] for s in STATUSES]
        )
        total = self.dist.sum(local.astype(np.float64))
        names = ("samples", "tokens", "accepted", "truncated", "train", "signal", "equal_groups", "equal_samples")
        counts = {name: int(x) for name, x in zip(names, total[:8])}
        counts.update({f"status/{s}": int(v) for s, v in zip(STATUSES, total[8:])})
        return counts

    def _metrics(self, rounds: list[Round], counts: dict[str, int], times: dict) -> dict[str, float]:
        def drawn(pilot: bool) -> tuple[int, int]:
            chosen = [r for r in rounds if r.request.pilot == pilot]
            tokens = sum(len(c.token_ids) for r in chosen for g in r.completions for c in g)
            return sum(int(r.counts.sum()) for r in chosen), tokens

        (pilot_samples, pilot_tokens_local), (other_samples, other_tokens_local) = drawn(True), drawn(False)
        tokens = self.dist.sum(np.array([pilot_tokens_local, other_tokens_local], dtype=np.float64))
        samples = counts["samples"]

        def per(value: float) -> float:  # a strategy may keep nothing (every group dropped)
            return value / samples if samples else float("nan")

        metrics = {
            "rollout/samples": samples,
            "rollout/tokens": counts["tokens"],
            "rollout/accept_rate": per(counts["accepted"]),
            "rollout/truncated_frac": per(counts["truncated"]),
            "rollout/mean_response_tokens": per(counts["tokens"]),
            "rollout/train_samples": counts["train"],  # what the M-step trains on (keep_rejected, filter_equal_groups)
            "rollout/equal_reward_groups": counts["equal_groups"],  # prompts whose >= 2 samples got one reward
            "rollout/equal_reward_samples": counts["equal_samples"],
            "rollout/equal_reward_frac": per(counts["equal_samples"]),  # the kept samples where GRPO's A = 0
            "rollout/generated_samples": pilot_samples + other_samples,  # everything generated, pilot included
            "rollout/generated_tokens": int(tokens.sum()),
            "pilot/samples": pilot_samples,
            "pilot/tokens": int(tokens[0]),
            "stage2/samples": other_samples,
            "stage2/tokens": int(tokens[1]),
            "time/generation_s": times["generation"],
            "time/verification_s": times["verification"],
        }
        metrics.update({f"reward/{s}": counts[f"status/{s}"] for s in STATUSES})
        # how the strategy spread the iteration's samples over its prompts (every round, pilots included)
        per_prompt = np.sum([r.counts for r in rounds], axis=0) if rounds else np.zeros(1)
        metrics["sampling/zero_sample_frac"] = float(np.mean(per_prompt == 0))
        metrics["sampling/samples_per_prompt"] = float(np.mean(per_prompt))
        metrics["sampling/max_per_prompt"] = float(np.max(per_prompt))
        metrics["sampling/rounds"] = len(rounds)
        return metrics

    def _allocation_metrics(self, planned: Round) -> dict[str, float]:
        """How uneven the allocation is, what it buys against uniform at the same total (the variance bound with
        the p_i and G_i it was computed on), and how well the estimates predicted the round's acceptance."""
        a, stats, d = planned.request.allocation, planned.request.estimates, self.dist
        fresh = [int(n) for n in planned.counts[d.rank :: d.world]]
        predicted = sum(f * p for f, p in zip(fresh, stats.accept_rate[d.rank :: d.world]))
        hits = sum(int((r > ACCEPT).sum()) for r in planned.rewards)
        predicted, hits, drawn = d.sum(np.array([predicted, hits, sum(fresh)], np.float64))
        if d.world > 1 and not np.array_equal(d.sum(a.n.astype(np.float64)), d.world * a.n.astype(np.float64)):
            raise RuntimeError("the ranks computed different allocations")
        n = a.n
        uniform = np.full(len(n), n.sum() / max(len(n), 1))
        bound = variance_bound(n, a.p, a.g, a.alpha, a.beta)
        base = variance_bound(uniform, a.p, a.g, a.alpha, a.beta)
        return {
            "alloc/zero_frac": float(np.mean(n == 0)),
            "alloc/gini": gini(n),
            "alloc/variance_vs_uniform": bound / base if base > 0 else float("nan"),
            "alloc/max_n": float(n.max()),
            "alloc/pilot_unsolved_frac": float(np.mean(stats.accept_rate == 0)),
            "alloc/predicted_accept": predicted / drawn if drawn else float("nan"),
            "alloc/realised_accept": hits / drawn if drawn else float("nan"),
        }


def _regroup(values: Sequence[Any], groups: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """A flat list cut back into the shape of ``groups``."""
    out, start = [], 0
    for group in groups:
        out.append(list(values[start : start + len(group)]))
        start += len(group)
    return out
