"""The rollout callback: the Lightning side of the EM loop's E-step, held-out evaluation and HF exports.

Hook order: Lightning reloads the train dataloader BEFORE ``on_train_epoch_start``, so the E-step for epoch
k runs in ``on_train_epoch_end`` of epoch k − 1, where the epoch-end checkpoint (``dibs.lit.checkpoints``) then
holds its rollouts; the DataModule asks for the first one (or for one a resumed run lacks) when it builds a
dataloader. Both go through ``rollouts``, the one place an E-step starts: it checks the budget, pushes the
policy's weights into the generator, runs ``dibs.estep.step.EStep`` on the iteration's prompts, hands the
training samples to the DataModule and logs the result. ``on_fit_start`` comes before the loop state is restored
(under FSDP strategies before the weights too), so ``train.py`` tells the callback when it resumes.

Costs (``dibs.core.budget``): cumulative generated samples, response tokens, optimiser updates and the
seconds spent generating, verifying and training are logged as ``cost/*`` (``dibs.core.tags``) at every
evaluation, at the same step as ``val/*``, so accuracy can be plotted against any of them. With a budget, the
run stops after the iteration whose generation reached it.

Over 350 lines on purpose: it is one Lightning callback whose hooks share the loop's state (costs, evaluations,
the weights the generator holds); the E-step, scoring, evaluation, the π0 evaluation cache and exports already
live in their own modules, and what stays here is the order in which the hooks call them.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from dibs.core.budget import Budget
from dibs.core.losses import Algorithm
from dibs.core.sampling import Strategy
from dibs.core.tags import COST
from dibs.estep.gradnorms import GradNormMeter
from dibs.estep.step import EStep, EStepResult, check_keep_rejected
from dibs.lit.diagnostics import log_allocation_images
from dibs.lit.dist import dist_of
from dibs.lit.eval_cache import eval_key, load_eval, save_eval
from dibs.lit.evaluation import EvalPlan, EvalResult, eval_seed, evaluate, format_summary, val_metrics
from dibs.lit.export import ExportOptions, export_iteration
from dibs.lit.loggers import holders, log_text, logger_locations
from dibs.lit.logs import info, log_step, peak_memory, warn
from dibs.lit.scoring import sampler_logprobs_are_trainers, score_trajectories
from dibs.lit.weights import iter_full_tensors
from dibs.rollout.base import Generator, SamplingParams

__all__ = ["RolloutCallback"]


class RolloutCallback(L.Callback):
    def __init__(
        self,
        generator: Generator,
        verifier: Any,
        strategy: Strategy,
        tokenizer: Any,
        *,
        algorithm: Algorithm,
        sampling: SamplingParams,
        keep_rejected: bool,
        recompute_old_logprobs: bool | str,
        filter_equal_groups: bool,
        seed: int,
        evaluation: EvalPlan | None = None,
        export_dir: str | None = None,
        export: ExportOptions | None = None,
        card: dict[str, Any] | None = None,
        budget: Budget | None = None,
        text_samples: int = 3,
        grad_token_budget: int = 16384,
        eval_cache: str | None = None,
        template_note: str = "the run's prompt template",
    ) -> None:
        if recompute_old_logprobs not in (True, False, "auto"):
            raise ValueError(f"algo.recompute_old_logprobs={recompute_old_logprobs!r} is not true, false or auto")
        if getattr(generator, "logprob_check_threshold", None) is not None and recompute_old_logprobs is False:
            raise ValueError(
                "the generator's log-prob self-check compares its log-probs with the trainer's, which only "
                "algo.recompute_old_logprobs=true (or auto) computes: set it"
            )
        check_keep_rejected(algorithm, keep_rejected, strategy)  # before any work, not when the fit starts
        self.generator, self.verifier, self.strategy, self.tokenizer = generator, verifier, strategy, tokenizer
        self.algorithm, self.sampling, self.seed = algorithm, sampling, seed
        self.e_step_options = dict(keep_rejected=keep_rejected, filter_equal_groups=filter_equal_groups)
        self.recompute_old_logprobs = recompute_old_logprobs
        self.evaluation, self.export_dir, self.text_samples = evaluation, export_dir, text_samples
        # which iterations are exported and kept (dibs.lit.export; None: all), the run's facts for the model card
        self.export, self.card = export or ExportOptions(every=1, keep_last=None), card or {}
        self.grad_token_budget = grad_token_budget
        self.eval_cache = Path(eval_cache) if eval_cache else None  # π0's evaluation, reused (dibs.lit.eval_cache)
        self.budget = budget or Budget()
        # Cumulative, all ranks: generated samples and response tokens (pilots included), accepted samples, and
        # the seconds this rank spent in E-steps and M-steps (evaluation, exports and checkpoints excluded).
        self.totals = {"samples": 0, "tokens": 0, "accepted": 0, "wall_s": 0.0, "pilot_samples": 0, "pilot_tokens": 0}
        self.totals["samples_before"] = 0  # generated samples before the held iteration's E-step
        self.evals: list[EvalResult] = []
        self.acceptance: dict[int, tuple[int, int]] = {}  # iteration (0-based) -> (accepted, generated), the bar's
        self.estep: EStep | None = None  # built in on_fit_start, once the processes and the policy exist
        self._train_started = 0.0
        self._pushed_at = -1  # global step of the weights the generator holds
        self.resumed = False  # set by train.py before fit when it resumes from a checkpoint
        # what the prompts look like (train.py: `template=<name>` and its text), named when nothing is accepted
        self.template_note, self._warned_nothing_accepted = template_note, False

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
        self.estep = self._build_e_step(trainer, pl_module)
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
        last = stop or iteration >= trainer.max_epochs
        spent = (self.totals["samples_before"], self.totals["samples"])  # this iteration's E-step, cumulative
        if self.evaluation and self.evaluation.due(iteration, last, spent):
            self._evaluate(trainer, iteration)
        self._export(trainer, iteration, last)
        if stop:
            info(
                f"budget reached after iteration {iteration}: "
                f"{self.budget.spent(self.costs(trainer)):.0f} {self.budget.unit} >= {self.budget.amount}"
            )
            trainer.should_stop = True
        elif iteration < trainer.max_epochs:
            self.rollouts(trainer, iteration)  # the next iteration's, so this iteration's checkpoint holds them

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and len(self.evals) >= 2:
            where = {
                **logger_locations(trainer.loggers),  # every logger's folder, file or store
                "checkpoints": str(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else "-",
                "hf policy": str(self.export_dir or "-"),
            }
            print("\n" + format_summary(self.evals[0], self.evals[-1], where=where))

    def state_dict(self) -> dict[str, Any]:
        return {
            "totals": dict(self.totals),
            "evals": [e.__dict__ for e in self.evals],
            "strategy": self.strategy.state_dict(),
            "acceptance": {k: list(v) for k, v in self.acceptance.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals.update(state["totals"])
        if "samples_before" not in state["totals"]:  # an older checkpoint: no extra evaluation on resume
            self.totals["samples_before"] = self.totals["samples"]
        if any("scores" not in e for e in state["evals"]) or "strategy" not in state:
            raise RuntimeError(
                "this checkpoint was written by an older dibs (before per-benchmark scores and sampling strategies):"
                " it cannot be resumed by this version; start the run again"
            )
        self.evals = [EvalResult(**e) for e in state["evals"]]
        self.acceptance = {int(k): (int(a), int(g)) for k, (a, g) in state.get("acceptance", {}).items()}
        self.strategy.load_state_dict(state["strategy"])

    def costs(self, trainer: L.Trainer) -> dict[str, float]:
        """Cumulative costs so far, in the units of ``dibs.core.budget`` plus wall seconds."""
        return {
            "samples": self.totals["samples"],
            "tokens": self.totals["tokens"],
            "updates": trainer.global_step,  # optimiser steps taken (a skipped iteration takes none)
            "wall_s": self.totals["wall_s"],
        }

    # ---- E-step ------------------------------------------------------------------------------
    def _build_e_step(self, trainer: L.Trainer, module: L.LightningModule) -> EStep:
        dm, dist = trainer.datamodule, dist_of(trainer)
        grad = self.strategy.grad
        meter = None
        if grad is not None:
            meter = GradNormMeter(
                grad,
                policy=module.policy,
                dist=dist,
                token_budget=self.grad_token_budget,
                pad_id=dm.pad_id,
                generator=self.generator,
            )
        scorer = None
        recompute = self.recompute_old_logprobs
        if recompute == "auto":
            recompute = not sampler_logprobs_are_trainers(self.generator, module, trainer)
            if not recompute:
                info(
                    "old log-probs: the sampler's own (the policy's weights, precision and backend); "
                    "algo.recompute_old_logprobs=true recomputes and checks them"
                )
        if recompute or getattr(module, "reference", None) is not None:
            scorer = partial(
                score_trajectories,
                trainer,
                module,
                rows_per_forward=module.hparams.micro_batch_size or dm.rows_per_update,
                pad_id=dm.pad_id,
                replace_old=recompute,
            )
        return EStep(
            self.generator,
            self.verifier,
            self.strategy,
            algorithm=self.algorithm,
            sampling=self.sampling,
            seed=self.seed,
            dist=dist,
            grad_norms=meter,
            scorer=scorer,
            **self.e_step_options,
        )

    def rollouts(self, trainer: L.Trainer, iteration: int) -> None:
        """Run the E-step of ``iteration`` (0-based) and hand its training samples to the DataModule."""
        if self.budget.reached(self.costs(trainer)):  # a run resumed from the checkpoint its budget stopped
            info(f"budget already reached ({self.budget.spent(self.costs(trainer)):.0f} {self.budget.unit}): done")
            trainer.should_stop = True  # the fit loop ends before the epoch starts; no sample is generated
            return
        info(f"iteration {iteration + 1}: E-step")
        self._push_weights(trainer)  # timed on its own into wall_s
        started = time.perf_counter()
        dm = trainer.datamodule
        before = self.totals["samples_before"] = self.totals["samples"]
        # a sample budget is spent exactly: the E-step that would cross it is cut to what is left
        limit = self.budget.amount - before if self.budget.unit == "samples" else None
        result = self.estep.run(iteration, dm.prompts_for(iteration, trainer.global_rank, trainer.world_size), limit)
        if result.skip:
            warn(
                f"iteration {iteration + 1}: no training sample has a non-zero advantage ({result.counts['accepted']} "
                f"of {result.counts['samples']} accepted): the M-step is skipped and the run continues"
            )
        generated = result.metrics
        dm.set_trajectories(
            iteration,
            result.training,
            result.skip,
            total_samples=result.counts["train"],
            world_size=trainer.world_size,
            generated=(before, before + int(generated["rollout/generated_samples"])),
        )
        self.totals["samples"] += generated["rollout/generated_samples"]
        self.totals["tokens"] += generated["rollout/generated_tokens"]
        self.totals["accepted"] += result.counts["accepted"]
        if self.totals["accepted"] == 0 and not self._warned_nothing_accepted:
            self._warned_nothing_accepted = True
            warn(
                f"iteration {iteration + 1}: not one of the {result.counts['samples']} samples generated so far was "
                f"accepted (reward 0 for every one). The prompts use {self.template_note}: a model not trained on "
                "that format may never state an answer the verifier reads. Check `template=` (data=jsonl selects "
                "template=paper) against the model's training format, and the answers' format in the data"
            )
        self.totals["pilot_samples"] += generated["pilot/samples"]
        self.totals["pilot_tokens"] += generated["pilot/tokens"]
        self.totals["wall_s"] += time.perf_counter() - started
        accepted = int(sum(r.tally.hits.sum() for r in result.rounds))  # of everything generated, all ranks
        self.acceptance[iteration] = (accepted, int(generated["rollout/generated_samples"]))
        self._log_e_step(trainer, dm, result)

    def _log_e_step(self, trainer: L.Trainer, dm, result: EStepResult) -> None:
        totals = self.totals
        metrics = {
            **result.metrics,
            "train/updates_per_iteration": 0 if result.skip else dm.updates,
            "rollout/samples_cum": totals["samples"],  # generated, pilot included
            "rollout/tokens_cum": totals["tokens"],
            "pilot/samples_cum": totals["pilot_samples"],
            "pilot/tokens_cum": totals["pilot_tokens"],
            "stage2/samples_cum": totals["samples"] - totals["pilot_samples"],
            "stage2/tokens_cum": totals["tokens"] - totals["pilot_tokens"],
            "iteration": result.iteration + 1,  # numbered as the messages, exports and checkpoints are
        }
        metrics.update(peak_memory(trainer.strategy.root_device, "e_step"))
        self._log(trainer, metrics)
        if result.allocation is not None:
            log_allocation_images(trainer, result.estimates, result.allocation.n, result.iteration)
        self._log_texts(trainer, dm, result)

    # ---- helpers -----------------------------------------------------------------------------
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
        seed = eval_seed(self.seed, iteration, trainer.global_rank)
        torch.manual_seed(seed)
        started = time.perf_counter()
        key = None
        reusable = iteration == 0 and plan.reuse_pi0 and self.eval_cache is not None and trainer.world_size == 1
        if reusable and isinstance(getattr(self.generator, "model", None), torch.nn.Module):
            device = trainer.strategy.root_device.type
            key = eval_key(
                self.generator.model, plan, generator=self.generator, verifier=self.verifier, seed=seed, device=device
            )
        result = load_eval(self.eval_cache, key) if key else None
        if result is not None:
            info(
                f"pi0: evaluation read from {self.eval_cache / key}.json (same weights, benchmarks, sampling and seed)"
            )
        else:
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
            if key:
                save_eval(self.eval_cache, key, result)
        self.evals.append(result)
        metrics = val_metrics(result)
        metrics["time/eval_s"] = time.perf_counter() - started
        metrics.update(peak_memory(trainer.strategy.root_device, "eval"))
        metrics.update({f"{COST}{k}": v for k, v in self.costs(trainer).items()})
        self._log(trainer, metrics)
        label = "pi0" if iteration == 0 else f"iteration {iteration}"
        scores = ", ".join(f"{name} {100 * s[f'avg@{plan.samples}']:.1f}%" for name, s in result.scores.items())
        info(f"held-out Average@{plan.samples} ({label}): {scores}")

    def _export(self, trainer: L.Trainer, iteration: int, last: bool) -> None:
        if self.export_dir:  # every rank: a collective under FSDP2; rank 0 writes and thins (dibs.lit.export)
            export_iteration(
                trainer.lightning_module.policy,
                self.tokenizer,
                Path(self.export_dir),
                self.export,
                iteration=iteration,
                last=last,
                global_step=trainer.global_step,
                seed=self.seed,
                evals=self.evals,
                sampling=self.sampling,
                card=self.card,
                write=trainer.is_global_zero,
            )

    def _log(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=log_step(trainer))

    def _log_texts(self, trainer: L.Trainer, dm, result: EStepResult) -> None:
        if not (trainer.is_global_zero and holders(trainer.loggers, "text")):  # says once which loggers hold none
            return
        rows = []
        for (i, c), reward, status in list(zip(result.samples, result.rewards, result.statuses))[: self.text_samples]:
            p = dm.train_problems[i]
            rows.append(
                f"**{p.uid}** (level {p.level}, gold `{p.answer}`, reward {reward:.0f}, {status})\n\n"
                f"    {p.problem}\n\n    {c.text}"
            )
        # not rollout/samples: W&B keeps one series per name, and that one is the E-step's sample count
        log_text(trainer.loggers, "rollout/sample_texts", "\n\n---\n\n".join(rows), log_step(trainer))
