"""The rollout callback: the E-step of every EM iteration, held-out evaluation and HF exports.

Hook order: Lightning reloads the train dataloader BEFORE ``on_train_epoch_start``, so the E-step for epoch
k runs in ``on_train_epoch_end`` of epoch k − 1, where the epoch-end checkpoint (``dibs.lit.checkpoints``) then
holds its rollouts. The first E-step runs when the DataModule is asked for a dataloader whose rollouts are
missing (``EMDataModule.rollout_fn``); a resumed run finds them in its checkpoint (``on_fit_start`` comes before
the loop state is restored, and under FSDP strategies before the weights too, so ``train.py`` tells the callback
it resumes).
Each E-step: push the policy's weights into the generator, allocate n_i per prompt, sample, verify, turn
rewards into advantages by prompt group (``algo.loss``: RAFT's or GRPO's), recompute the old (and reference)
log-probs with the training module (``dibs.lit.scoring``) and hand the training samples to the DataModule.

Costs (``dibs.core.budget``): cumulative generated samples, response tokens, optimiser updates and the
seconds spent generating, verifying and training are logged as ``cost/*`` at every evaluation, at the same
step as ``val/*``, so accuracy can be plotted against any of them. With a budget, the run stops after the
iteration whose generation reached it.

The module runs past 350 lines because ``_e_step`` is one sequence (pilot, allocation, stage 2, verification,
scoring, costs, metrics) whose intermediate counts feed the logged metrics; the parts that stand alone live in
``dibs.lit.estimates``, ``dibs.lit.scoring``, ``dibs.lit.diagnostics``, ``dibs.lit.evaluation`` (held-out
evaluation), ``dibs.lit.weights`` (weight gathering and exports) and ``dibs.lit.logs`` (messages, memory).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch

from dibs.core.allocation import Allocator
from dibs.core.budget import Budget
from dibs.core.verifier import STATUSES, VerifyResult
from dibs.lit.diagnostics import allocation_metrics, log_allocation_images
from dibs.lit.dist import reduce_sum
from dibs.lit.estimates import PilotStats, to_global
from dibs.lit.evaluation import EvalPlan, EvalResult, eval_seed, evaluate, format_summary, val_metrics
from dibs.lit.logs import info, log_step, peak_memory, warn
from dibs.lit.scoring import ADVANTAGES, build_trajectories, score_trajectories, select_training
from dibs.lit.weights import export_policy, iter_full_tensors
from dibs.rollout.base import Completion, Generator, SamplingParams, check_logprob_gap

__all__ = ["RolloutCallback"]


class RolloutCallback(L.Callback):
    def __init__(
        self,
        generator: Generator,
        verifier: Any,
        allocator: Allocator,
        tokenizer: Any,
        *,
        sampling: SamplingParams,
        evaluation: EvalPlan | None = None,
        loss: str = "raftpp",
        keep_rejected: bool = True,
        recompute_old_logprobs: bool = True,
        filter_equal_groups: bool = False,
        text_samples: int = 3,
        export_dir: str | None = None,
        seed: int = 0,
        budget: Budget | None = None,
        grad_token_budget: int = 16384,
    ) -> None:
        if loss not in ADVANTAGES:
            raise ValueError(f"algo.loss={loss!r} is not one of {sorted(ADVANTAGES)}")
        if loss in ("grpo", "drgrpo") and not keep_rejected:
            raise ValueError(
                f"algo.keep_rejected=false with algo.loss={loss}: GRPO's negative advantages live on the rejected "
                "samples, so they are always kept; set algo.keep_rejected=true"
            )
        if getattr(generator, "logprob_check_threshold", None) is not None and not recompute_old_logprobs:
            raise ValueError(
                "the generator's log-prob self-check compares its log-probs with the trainer's, which only "
                "algo.recompute_old_logprobs=true computes: set it (the default of every algo)"
            )
        self.generator, self.verifier, self.allocator, self.tokenizer = generator, verifier, allocator, tokenizer
        self.loss, self.filter_equal_groups = loss, filter_equal_groups
        self.recompute_old_logprobs = recompute_old_logprobs
        self.sampling, self.evaluation = sampling, evaluation
        self.keep_rejected, self.text_samples, self.export_dir, self.seed = (
            keep_rejected,
            text_samples,
            export_dir,
            seed,
        )
        self.budget = budget or Budget()
        # Cumulative, all ranks: generated samples and response tokens, accepted samples, and the seconds this
        # rank spent in E-steps and M-steps (evaluation, exports and checkpoints excluded).
        self.totals = {"samples": 0, "tokens": 0, "accepted": 0, "wall_s": 0.0}
        self.pilot = PilotStats(
            allocator, grad_token_budget, generator
        )  # p_i, G_i measurement and the per-prompt store
        self.evals: list[EvalResult] = []
        self._train_started = 0.0
        self._pushed_at = -1  # global step of the weights the generator holds
        self.resumed = False  # set by train.py before fit when it resumes from a checkpoint

    # ---- hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm.prompts_per_iteration < trainer.world_size:  # a rank without prompts would stall the others
            raise ValueError(
                f"prompts_per_iteration={dm.prompts_per_iteration} is below the {trainer.world_size} "
                "processes: every rank needs at least one prompt"
            )
        if hasattr(self.generator, "to"):  # the generator's copy was made before Lightning placed the policy
            self.generator.to(trainer.strategy.root_device)
        dm.rollout_fn = lambda iteration: self._e_step(trainer, iteration)
        if self.resumed:  # told by train.py: under FSDP strategies trainer.ckpt_path is not set yet here
            info("resuming: the pi0 evaluation and the costs so far come from the checkpoint")
        elif self.evaluation and self.evaluation.before_training:
            self._evaluate(trainer, iteration=0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed in the middle of an iteration gets no on_train_epoch_start: start the M-step's clock and
        # free the generator's memory here (a fresh epoch's hook below does both again).
        self.generator.sleep()
        self._train_started = time.perf_counter()

    def exclude_from_train_time(self, seconds: float) -> None:
        """A checkpoint saved during the M-step: its seconds are not training time."""
        self._train_started += seconds

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.generator.sleep()  # a colocated engine gives its accelerator memory back for the M-step
        self._train_started = time.perf_counter()
        info(f"iteration {trainer.current_epoch + 1}: M-step, {trainer.num_training_batches} updates")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        train_s = time.perf_counter() - self._train_started
        self.totals["wall_s"] += train_s
        self._log(trainer, {"time/train_s": train_s, **peak_memory(trainer.strategy.root_device, "m_step")})
        iteration, stop = trainer.current_epoch + 1, self.budget.reached(self.costs(trainer))  # alike on all ranks
        if self.evaluation and self.evaluation.due(iteration, last=stop or iteration >= trainer.max_epochs):
            self._evaluate(trainer, iteration)
        self._export(trainer, iteration)
        if stop:
            info(
                f"budget reached after iteration {trainer.current_epoch + 1}: "
                f"{self.budget.spent(self.costs(trainer)):.0f} {self.budget.unit} >= {self.budget.amount}"
            )
            trainer.should_stop = True
        elif trainer.current_epoch + 1 < trainer.max_epochs:
            self._e_step(trainer, trainer.current_epoch + 1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and len(self.evals) >= 2:
            where = {
                "tensorboard": trainer.logger.log_dir if trainer.logger else "-",
                "checkpoints": str(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else "-",
                "hf policy": str(self.export_dir or "-"),
            }
            print("\n" + format_summary(self.evals[0], self.evals[-1], where=where))

    def state_dict(self) -> dict[str, Any]:
        return {
            "totals": dict(self.totals),
            "evals": [e.__dict__ for e in self.evals],
            "prompt_stats": self.pilot.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals.update(state["totals"])
        if any("scores" not in e for e in state["evals"]):
            raise RuntimeError(
                "this checkpoint was written by an older dibs (evaluations without per-benchmark scores): it "
                "cannot be resumed by this version; start the run again"
            )
        self.evals = [EvalResult(**e) for e in state["evals"]]
        self.pilot.load(state.get("prompt_stats", {"index": [], "values": []}))

    def costs(self, trainer: L.Trainer) -> dict[str, float]:
        """Cumulative costs so far, in the units of ``dibs.core.budget`` plus wall seconds."""
        return {
            "samples": self.totals["samples"],
            "tokens": self.totals["tokens"],
            "updates": trainer.global_step,  # optimiser steps taken (a skipped iteration takes none)
            "wall_s": self.totals["wall_s"],
        }

    # ---- E-step ------------------------------------------------------------------------------
    def _e_step(self, trainer: L.Trainer, iteration: int) -> None:
        if self.budget.reached(self.costs(trainer)):  # a run resumed from the checkpoint its budget stopped
            info(f"budget already reached ({self.budget.spent(self.costs(trainer)):.0f} {self.budget.unit}): done")
            trainer.should_stop = True  # the fit loop ends before the epoch starts; no sample is generated
            return
        info(f"iteration {iteration + 1}: E-step")
        self._push_weights(trainer)  # timed on its own into wall_s
        e_started = time.perf_counter()
        dm, rank, world = trainer.datamodule, trainer.global_rank, trainer.world_size
        indices = dm.iteration_prompts(iteration, rank, world)
        num_prompts = len(dm.iteration_prompts(iteration))
        prompts = [dm.train_prompts[i] for i in indices]
        answers = [dm.train_problems[i].answer for i in indices]
        torch.manual_seed(self.seed * 1_000_003 + iteration * 1_009 + rank)
        started = time.perf_counter()
        pilot_n = self.allocator.pilot_samples
        self.pilot.grad_s = 0.0
        pilot: list[list[Completion]] = [[] for _ in indices]
        pilot_rewards: list[list[float]] = [[] for _ in indices]
        pilot_status: list[list[str]] = [[] for _ in indices]
        stats = None
        if pilot_n > 0:  # stage 1: N' samples per prompt → p_i, G_i → one global allocation
            need = self.pilot.needs_pilot(iteration, indices)
            pilot = self.generator.generate(
                prompts, [pilot_n if x else 0 for x in need], self.sampling, **self.pilot.generate_kwargs("pilot")
            )
            scored = self.verifier.score(
                [c.text for g in pilot for c in g], [a for a, g in zip(answers, pilot) for _ in g]
            )
            pilot_rewards = _regroup(scored.rewards, pilot)
            pilot_status = _regroup(scored.status, pilot)
            fresh_stats = self.pilot.measure(trainer, dm, indices, pilot, pilot_rewards, num_prompts)
            piloted = to_global(trainer, np.array(need, dtype=np.float64), num_prompts) > 0
            stats = self.pilot.merge(dm.iteration_prompts(iteration), piloted, fresh_stats)
        global_n = self.allocator.allocate(num_prompts, stats)
        if world > 1:  # one global allocation: every rank must hold the same one
            summed = reduce_sum(trainer, global_n.astype(np.float64))
            if not np.array_equal(summed, world * global_n.astype(np.float64)):
                raise RuntimeError(f"iteration {iteration}: the ranks computed different allocations")
        n_local = global_n[rank::world]  # same slicing as the prompts
        reuse = pilot_n > 0 and getattr(self.allocator, "reuse_pilot", False)
        kept = [min(int(n), len(g)) if reuse else 0 for n, g in zip(n_local, pilot)]  # pilot samples within n_i
        fresh = [int(n) - k for n, k in zip(n_local, kept)]
        stage2 = (
            self.generator.generate(prompts, fresh, self.sampling, **self.pilot.generate_kwargs("stage2"))
            if sum(fresh)
            else [[] for _ in prompts]
        )
        generated = time.perf_counter()
        scored2 = self.verifier.score(
            [c.text for g in stage2 for c in g], [a for a, g in zip(answers, stage2) for _ in g]
        )
        rewards2, status2 = _regroup(scored2.rewards, stage2), _regroup(scored2.status, stage2)
        flat, rewards, statuses = [], [], []
        groups: list[list[Completion]] = []  # this iteration's training samples of each prompt
        group_rewards: list[list[float]] = []
        for j, i in enumerate(indices):
            chosen = [*zip(pilot[j], pilot_rewards[j], pilot_status[j])][: kept[j]]
            chosen += [*zip(stage2[j], rewards2[j], status2[j])]
            groups.append([c for c, _, _ in chosen])
            group_rewards.append([r for _, r, _ in chosen])
            flat += [(i, c) for c, _, _ in chosen]
            rewards += group_rewards[-1]
            statuses += [st for _, _, st in chosen]
        result = VerifyResult(np.asarray(rewards, dtype=np.float32), tuple(statuses))
        if pilot_n > 0 and getattr(self.allocator, "online", False):
            self.pilot.online_update(trainer, dm, indices, groups, group_rewards, num_prompts, iteration)
        verified = time.perf_counter()
        pilot_flat = [c for g in pilot for c in g]
        gen_samples = len(pilot_flat) + sum(len(g) for g in stage2)  # everything generated, pilot included
        gen_tokens = sum(len(c.token_ids) for c in pilot_flat) + sum(len(c.token_ids) for g in stage2 for c in g)
        cost = reduce_sum(
            trainer,
            np.array([gen_samples, gen_tokens, len(pilot_flat), sum(len(c.token_ids) for c in pilot_flat)], np.float64),
        )
        trajectories, equal = build_trajectories(dm.train_prompts, flat, result.rewards, self.loss)
        train, train_counts = select_training(
            trajectories, equal, keep_rejected=self.keep_rejected, filter_equal_groups=self.filter_equal_groups
        )
        counts = result.counts()
        local = np.array(
            [
                len(flat),
                sum(len(c.token_ids) for _, c in flat),
                int((result.rewards > 0.5).sum()),
                sum(c.finish_reason == "length" for _, c in flat),
                *train_counts,
            ]
            + [counts[s] for s in STATUSES]
        )
        total = reduce_sum(trainer, local.astype(np.float64))
        samples, tokens, n_accepted, truncated, n_train, n_signal, equal_groups, equal_samples = (
            int(x) for x in total[:8]
        )
        gen_samples, gen_tokens, pilot_samples, pilot_tokens = (int(x) for x in cost)
        if stats is not None:
            fresh_hits = sum(sum(r > 0.5 for r in group) for group in rewards2)
            predicted = sum(f * p for f, p in zip(fresh, stats.accept_rate[rank::world]))
            realised = reduce_sum(trainer, np.array([predicted, fresh_hits, sum(fresh)], np.float64))
            self._log(trainer, allocation_metrics(self.allocator, stats, global_n, realised))
            log_allocation_images(trainer, stats, global_n, iteration)
        skip = n_signal == 0  # the same global count on every rank
        scoring: dict[str, float] = {}
        if skip:
            warn(
                f"iteration {iteration}: no training sample has a non-zero advantage ({n_accepted} of {samples} "
                "accepted): the M-step is skipped and the run continues with the next iteration"
            )
        elif self.recompute_old_logprobs or getattr(trainer.lightning_module, "reference", None) is not None:
            scored_at = time.perf_counter()
            train, scoring = score_trajectories(
                trainer,
                trainer.lightning_module,
                train,
                rows_per_forward=trainer.lightning_module.hparams.micro_batch_size or dm.rows_per_update,
                pad_id=dm.pad_id,
                replace_old=self.recompute_old_logprobs,
            )
            scoring["time/scoring_s"] = time.perf_counter() - scored_at
            self._check_logprobs(scoring)
        dm.set_trajectories(iteration, train, skip, total_samples=n_train, world_size=world)
        for key, value in (("samples", gen_samples), ("tokens", gen_tokens), ("accepted", n_accepted)):
            self.totals[key] += value
        self.totals["pilot_samples"] = self.totals.get("pilot_samples", 0) + pilot_samples
        self.totals["pilot_tokens"] = self.totals.get("pilot_tokens", 0) + pilot_tokens
        self.totals["wall_s"] += time.perf_counter() - e_started
        metrics = {
            "rollout/samples": samples,
            "rollout/tokens": tokens,
            "rollout/accept_rate": n_accepted / samples,
            "rollout/truncated_frac": truncated / samples,
            "rollout/mean_response_tokens": tokens / samples,
            "rollout/train_samples": n_train,  # what the M-step trains on (keep_rejected, filter_equal_groups)
            "rollout/equal_reward_groups": equal_groups,  # prompts whose >= 2 samples all got the same reward
            "rollout/equal_reward_samples": equal_samples,
            "rollout/equal_reward_frac": equal_samples / samples,  # the budget spent where GRPO's A = 0
            "train/updates_per_iteration": 0 if skip else dm.updates,
            "rollout/samples_cum": self.totals["samples"],  # generated, pilot included
            "rollout/tokens_cum": self.totals["tokens"],
            "rollout/generated_samples": gen_samples,
            "rollout/generated_tokens": gen_tokens,
            "pilot/samples": pilot_samples,
            "pilot/tokens": pilot_tokens,
            "pilot/samples_cum": self.totals["pilot_samples"],
            "pilot/tokens_cum": self.totals["pilot_tokens"],
            "stage2/samples": gen_samples - pilot_samples,
            "stage2/tokens": gen_tokens - pilot_tokens,
            "stage2/samples_cum": self.totals["samples"] - self.totals["pilot_samples"],
            "stage2/tokens_cum": self.totals["tokens"] - self.totals["pilot_tokens"],
            "time/generation_s": generated - started,
            "time/verification_s": verified - generated,
            # G_i measured on the training policy, 0 when the generator measures it; already within generation_s
            # (pilot) and verification_s (online updates)
            "time/grad_norms_s": self.pilot.grad_s,
            "iteration": iteration,
        }
        metrics.update({f"reward/{s}": int(v) for s, v in zip(STATUSES, total[8:])})
        metrics.update(scoring)
        metrics.update(peak_memory(trainer.strategy.root_device, "e_step"))
        self._log(trainer, metrics)
        self._log_texts(trainer, dm, flat, result, iteration)

    # ---- helpers -----------------------------------------------------------------------------
    def _check_logprobs(self, scoring: dict[str, float]) -> None:
        """Stop on a sampler whose log-probs drift from the trainer's (stale weights): the gap over every rank's
        training tokens, the same number on all ranks, against the backend's threshold where it sets one."""
        threshold = getattr(self.generator, "logprob_check_threshold", None)
        if threshold is not None and "rollout/logprob_gap_mean" in scoring:
            check_logprob_gap(scoring["rollout/logprob_gap_mean"], threshold)

    def _push_weights(self, trainer: L.Trainer) -> None:
        """Wake the generator, and load the policy's current weights into it once per optimiser step count:
        streamed one gathered tensor at a time, which the generator may send on in buckets."""
        self.generator.wake()
        if self._pushed_at != trainer.global_step:
            started = time.perf_counter()
            self.generator.load_weights(iter_full_tensors(trainer.lightning_module.policy))
            self._pushed_at = trainer.global_step
            if trainer.global_step > 0:  # a cost of training, whether the E-step or an evaluation pushes first
                self.totals["wall_s"] += time.perf_counter() - started

    def _evaluate(self, trainer: L.Trainer, iteration: int) -> None:
        """Evaluate the current policy; seeded by (seed, iteration) so ``python -m dibs.evaluate`` on this
        iteration's export draws the same samples."""
        plan = self.evaluation
        info(f"{'pi0' if iteration == 0 else f'iteration {iteration}'}: evaluation")
        self._push_weights(trainer)
        torch.manual_seed(eval_seed(self.seed, iteration, trainer.global_rank))
        started = time.perf_counter()
        result = evaluate(
            self.generator,
            self.verifier,
            plan.benchmarks,
            samples=plan.samples,
            pass_k=plan.pass_k,
            sampling=plan.sampling,
            averages=plan.averages,
            iteration=iteration,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            device=trainer.strategy.root_device,
        )
        self.evals.append(result)
        metrics = val_metrics(result)
        metrics["time/eval_s"] = time.perf_counter() - started
        metrics.update(peak_memory(trainer.strategy.root_device, "eval"))
        metrics.update({f"cost/{k}": v for k, v in self.costs(trainer).items()})
        self._log(trainer, metrics)
        label = "pi0" if iteration == 0 else f"iteration {iteration}"
        scores = ", ".join(f"{name} {100 * s[f'avg@{plan.samples}']:.1f}%" for name, s in result.scores.items())
        info(f"held-out Average@{plan.samples} ({label}): {scores}")

    def _export(self, trainer: L.Trainer, iteration: int) -> None:
        if self.export_dir:  # every rank: a collective under FSDP2
            export_policy(
                trainer.lightning_module.policy,
                self.tokenizer,
                Path(self.export_dir) / f"iter_{iteration:03d}",
                {"iteration": iteration, "global_step": trainer.global_step, "seed": self.seed},
                write=trainer.is_global_zero,
            )

    def _log(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        if trainer.logger is not None:
            trainer.logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=log_step(trainer))

    def _log_texts(self, trainer: L.Trainer, dm, flat: list[tuple[int, Completion]], result, iteration: int) -> None:
        if not (
            trainer.is_global_zero and trainer.logger is not None and hasattr(trainer.logger.experiment, "add_text")
        ):
            return
        rows = []
        for (i, c), reward, status in list(zip(flat, result.rewards, result.status))[: self.text_samples]:
            p = dm.train_problems[i]
            rows.append(
                f"**{p.uid}** (level {p.level}, gold `{p.answer}`, reward {reward:.0f}, {status})\n\n"
                f"    {p.problem}\n\n    {c.text}"
            )
        trainer.logger.experiment.add_text("rollout/samples", "\n\n---\n\n".join(rows), log_step(trainer))


def _regroup(values: Sequence[Any], groups: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """A flat list cut back into the shape of ``groups``."""
    out, start = [], 0
    for group in groups:
        out.append(list(values[start : start + len(group)]))
        start += len(group)
    return out
