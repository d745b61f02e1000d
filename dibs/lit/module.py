"""EMModule: the M-step. The loss math lives in dibs.core.losses; this class moves tensors and logs.

Optimisation is manual: an iteration in which no sample was accepted anywhere skips its updates on every rank
(Lightning refuses a skipped automatic step in distributed runs, and a zero-gradient AdamW step would still
move the weights through momentum and weight decay).

Under ``ModelParallelStrategy`` the policy is sharded with FSDP2 (``fully_shard`` on every decoder layer,
then the root) in ``configure_model``; under DDP or a single device it is used as is.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from dibs.core.logprobs import sequence_logprobs
from dibs.core.losses import LOSSES
from dibs.core.schedules import warmup_cosine

__all__ = ["EMModule"]


class EMModule(L.LightningModule):
    def __init__(
        self,
        policy: torch.nn.Module,
        *,
        loss: str = "raftpp",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        temperature: float = 1.0,
        grad_clip: float = 1.0,
        warmup_updates: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.1,
        total_updates: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"algo.lr_schedule={lr_schedule!r} is not 'constant' or 'cosine'")
        if loss not in LOSSES:
            raise ValueError(f"algo.loss={loss!r} is not one of {sorted(LOSSES)}")
        self.save_hyperparameters(ignore=["policy"])
        self.policy = policy.train()  # π0 may arrive in eval mode from the warm-start cache
        self.loss_fn = (
            partial(LOSSES[loss], clip_low=clip_low, clip_high=clip_high) if loss == "raftpp" else LOSSES[loss]
        )

    def configure_model(self) -> None:
        if self.device_mesh is None or getattr(self.policy, "_dibs_sharded", False):
            return  # not under ModelParallelStrategy, or already sharded
        mesh = self.device_mesh["data_parallel"]
        for layer in self.policy.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.policy, mesh=mesh)
        self.policy._dibs_sharded = True

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if batch["skip"]:  # globally nothing accepted: no update (decided identically on every rank)
            self.lr_schedulers().step()  # the schedule still counts the update slot, so it ends where planned
            return None
        optimizer = self.optimizers()
        logp = sequence_logprobs(
            self._forward, batch["input_ids"], batch["attention_mask"], self.hparams.temperature
        )  # [B, L-1]
        out = self.loss_fn(logp, batch["old_logprobs"], batch["response_mask"], batch["advantages"])
        metrics = {f"train/{k}": v for k, v in out.metrics.items()}
        metrics["train/loss"] = out.loss.detach()
        metrics["train/accepted_frac"] = (batch["advantages"] > 0).float().mean()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(out.loss)
        max_norm = self.hparams.grad_clip if self.hparams.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)  # DTensor-aware under FSDP2
        metrics["train/grad_norm"] = norm.full_tensor() if isinstance(norm, DTensor) else norm
        optimizer.step()
        self.lr_schedulers().step()
        metrics["train/lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
        self.log_dict(metrics, on_step=True, batch_size=len(batch["advantages"]), sync_dist=False)
        return out.loss.detach()

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
