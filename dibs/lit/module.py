"""EMModule: the M-step. The loss math lives in dibs.core.losses; this class moves tensors and logs.

Optimisation is manual: an iteration in which no training sample has a non-zero advantage anywhere skips its
updates on every rank (Lightning refuses a skipped automatic step in distributed runs, and a zero-gradient
AdamW step would still move the weights through momentum and weight decay).

One batch = one optimiser update. It runs in micro-batches of ``micro_batch_size`` rows (gradient
accumulation) whose losses are normalised by the WHOLE update's denominator, summed over micro-batches and
ranks (``dibs.core.losses.loss_denominator``), so the update does not depend on how the batch is cut nor on
how the samples are spread over ranks: a rank with few or no samples no longer scales the others' gradient.
DDP and FSDP2 average gradients over the W ranks, so each rank's loss is multiplied by W. ``loss_scope=micro_batch``
restores the reference's actor instead (docs/reference.md, "Departures"): each micro-batch normalised by its own
denominator, divided by the rank's number of micro-batches, and ranks averaged.

``activation_checkpointing`` recomputes every decoder layer's activations in the backward pass (transformers'
gradient checkpointing), trading a second forward for the memory of long responses; gradients are unchanged.

With ``kl_coef`` > 0 a frozen copy of π0 (the policy as given, before any sharding) is kept as the KL
reference; the optimiser never sees it. Under ``ModelParallelStrategy`` the policy and the reference are
sharded with FSDP2 (``fully_shard`` on every decoder layer, then the root) in ``configure_model``; under DDP
or a single device they are used as is.
"""

from __future__ import annotations

import copy
import inspect
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from dibs.core.logprobs import sequence_logprobs
from dibs.core.losses import Algorithm, loss_denominator
from dibs.core.schedules import warmup_cosine
from dibs.lit.logs import log_step

__all__ = ["EMModule"]

_ROW_KEYS = ("advantages", "rewards", "group", "row_mask")  # [B]
_SEQ_KEYS = ("input_ids", "attention_mask")  # [B, L]
_TARGET_KEYS = ("response_mask", "old_logprobs", "ref_logprobs")  # [B, L-1]


class EMModule(L.LightningModule):
    """The settings are the ``algo`` group's (``conf/algo/*.yaml`` and ``conf/optim/adamw.yaml``, checked by
    ``dibs.schema``); none has a default here. ``algorithm``: the registry's entry for ``algo.loss``."""

    def __init__(
        self,
        policy: torch.nn.Module,
        algorithm: Algorithm,
        *,
        kl_coef: float,
        loss_agg: str,
        loss_scope: Literal["update", "micro_batch"],
        micro_batch_size: int | None,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        temperature: float,
        grad_clip: float,
        warmup_updates: int,
        lr_schedule: str,
        min_lr_ratio: float,
        total_updates: int,
        activation_checkpointing: bool,
        clip_low: float | None = None,  # None: not an option of the algorithm's loss (RAFT has no ratio to clip)
        clip_high: float | None = None,
        clip_ratio_c: float | None = None,  # GRPO's dual clip
    ) -> None:
        super().__init__()
        if loss_scope not in ("update", "micro_batch"):
            raise ValueError(f"algo.loss_scope={loss_scope!r} is not 'update' or 'micro_batch'")
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["policy", "algorithm"])
        self.hparams["loss"] = algorithm.name
        self.policy = policy.train()  # π0 may arrive in eval mode from the warm-start cache
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False) if kl_coef > 0 else None
        options = dict(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, agg=loss_agg)
        accepted = inspect.signature(algorithm.loss).parameters  # each loss takes the options it knows
        missing = [k for k, v in options.items() if k in accepted and v is None]
        if missing:
            raise ValueError(f"algo.loss={algorithm.name} needs {', '.join(f'algo.{k}' for k in missing)}")
        self.loss_fn = partial(algorithm.loss, **{k: v for k, v in options.items() if k in accepted})

    def configure_model(self) -> None:
        if self.hparams.activation_checkpointing and not getattr(self.policy, "_dibs_checkpointed", False):
            # Recompute each decoder layer's activations in the backward pass: memory for long responses.
            # Non-reentrant, so it composes with FSDP2 and needs no input that requires grad.
            enable = getattr(self.policy, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.policy._dibs_checkpointed = True
        if self.device_mesh is None or getattr(self.policy, "_dibs_sharded", False):
            return  # not under ModelParallelStrategy, or already sharded
        mesh = self.device_mesh["data_parallel"]
        for model in (self.policy, self.reference):
            if model is not None:
                for layer in model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
        self.policy._dibs_sharded = True

    def train(self, mode: bool = True) -> EMModule:
        super().train(mode)
        if self.reference is not None:  # Lightning sets the whole module to train mode; the reference stays frozen
            self.reference.eval()
        return self

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _reference_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, policy: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Log-probs [B, L-1] of the policy (None when ``policy`` is false) and of the reference (None without
        KL): the E-step's old and reference log-probs, by the same ``sequence_logprobs`` as ``training_step``,
        so the ratio of the first update is 1. A collective under FSDP2: every rank must call it as often."""
        temperature = self.hparams.temperature
        logp = sequence_logprobs(self._forward, input_ids, attention_mask, temperature) if policy else None
        if self.reference is None:
            return logp, None
        return logp, sequence_logprobs(self._reference_forward, input_ids, attention_mask, temperature)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["skip"]:  # no training sample has a non-zero advantage anywhere (decided alike on every rank)
            if not batch.get("idle"):  # an idle placeholder is no update slot (an iteration without updates)
                self.lr_schedulers().step()  # the schedule still counts the update slot, so it ends where planned
            return None
        optimizer = self.optimizers()
        micro, denom, world, own = self._plan(batch)
        per_update = self.hparams.loss_scope == "update"
        # update: one normaliser for the whole update, ×W against the ranks' gradient average; micro_batch (the
        # reference's actor): each micro-batch's own normaliser, averaged over this rank's micro-batches
        scale = world if per_update else 1.0 / own
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}  # metric · response tokens, summed over micro-batches
        for mb in micro:
            logp = sequence_logprobs(
                self._forward, mb["input_ids"], mb["attention_mask"], self.hparams.temperature
            )  # [b, l-1]
            out = self.loss_fn(
                logp,
                mb["old_logprobs"],
                mb["response_mask"],
                mb["advantages"],
                denom=denom if per_update else None,
                ref_logp=self._ref_logprobs(mb),
                kl_coef=self.hparams.kl_coef,
            )
            loss = out.loss * scale
            self.manual_backward(loss)
            total += loss.detach()
            tokens = mb["response_mask"].sum()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v * tokens
        max_norm = self.hparams.grad_clip if self.hparams.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)  # DTensor-aware under FSDP2
        optimizer.step()
        self.lr_schedulers().step()
        self._log_update(batch, sums, total, norm.full_tensor() if isinstance(norm, DTensor) else norm)
        return total

    def _log_update(
        self, batch: dict[str, Any], sums: dict[str, torch.Tensor], loss: torch.Tensor, grad_norm: torch.Tensor
    ) -> None:
        """This rank's view of the update: the loss metrics token-weighted over its micro-batches (none when it
        held only placeholders), the loss it back-propagated, the global gradient norm and the learning rate."""
        tokens, rows = batch["response_mask"].sum(), batch["row_mask"].sum()
        metrics = {f"train/{k}": v / tokens for k, v in sums.items()} if tokens > 0 else {}
        if rows > 0:
            metrics["train/accepted_frac"] = ((batch["rewards"] > 0.5).float() * batch["row_mask"]).sum() / rows
        metrics["train/loss"] = loss
        metrics["train/grad_norm"] = grad_norm
        metrics["train/lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        # Written to the loggers now, not after the batch-end hooks as ``self.log`` would: a checkpoint saved at this
        # update's end then already holds its point (a resume rewinds the event files to the save).
        step = log_step(self.trainer)
        values = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=step)
        self.log_dict(metrics, on_step=True, batch_size=len(batch["advantages"]), sync_dist=False, logger=False)

    def _ref_logprobs(self, mb: dict[str, Any]) -> torch.Tensor | None:
        if self.hparams.kl_coef <= 0:
            return None
        if "ref_logprobs" not in mb:
            raise RuntimeError("algo.kl_coef > 0 but the batch holds no reference log-probs (ref_logprobs)")
        return mb["ref_logprobs"]

    def _plan(self, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], torch.Tensor, int, int]:
        """The micro-batches this rank runs, the update's loss denominator over all ranks, the world size and
        the number of this rank's own micro-batches (before the dummy ones).

        One all-reduce gives both the global denominator and the largest micro-batch count: FSDP2 forwards and
        DDP backwards are collectives, so ranks with fewer micro-batches run zero-weight dummy ones."""
        rows = len(batch["advantages"])
        size = self.hparams.micro_batch_size or rows
        micro = [self._slice(batch, slice(start, start + size)) for start in range(0, rows, size)]
        real = batch["row_mask"] > 0  # [B] placeholders count neither as tokens nor as sequences
        local = loss_denominator(batch["response_mask"][real], self.hparams.loss_agg)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        stats = torch.zeros(1 + world, dtype=torch.float64, device=self.device)
        stats[0], stats[1 + rank] = local, len(micro)
        if world > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        own = len(micro)
        for _ in range(int(stats[1:].max()) - own):
            dummy = self._slice(batch, slice(0, 1))
            dummy["response_mask"] = torch.zeros_like(dummy["response_mask"])
            dummy["row_mask"] = torch.zeros_like(dummy["row_mask"])
            micro.append(dummy)
        return micro, stats[0].float(), world, own

    @staticmethod
    def _slice(batch: dict[str, Any], rows: slice) -> dict[str, Any]:
        """Rows of the batch, trimmed to their longest sequence (right padding: the cut columns are padding)."""
        width = int(batch["attention_mask"][rows].sum(-1).max())
        out: dict[str, Any] = {k: batch[k][rows] for k in _ROW_KEYS}
        out.update({k: batch[k][rows, :width] for k in _SEQ_KEYS})  # [b, l]
        out.update({k: batch[k][rows, : width - 1] for k in _TARGET_KEYS if k in batch})  # [b, l-1]
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then constant or cosine decay to ``min_lr_ratio`` at ``total_updates``. A fresh
        Adam's first steps move every weight by about lr whatever the gradient's size: the warm-up keeps that
        from wrecking a warm-started policy (measured on the embedded task: −4 points after iteration 1)."""
        hp = self.hparams
        total = hp.total_updates if hp.lr_schedule == "cosine" else 0
        return warmup_cosine(step, warmup=hp.warmup_updates, total=total, floor=hp.min_lr_ratio)
