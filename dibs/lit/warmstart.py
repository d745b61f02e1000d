"""Warm start π0: a short SFT phase on the task's reference solutions, run by a Lightning Trainer and cached on
disk.

The SFT stops after ``steps`` updates or as soon as the sampled held-out accuracy reaches ``target_accuracy``
(checked every ``eval_every`` steps), so π0 stays a moderate solver that RL can improve. The result (model,
tokenizer, a JSON report and the SFT's curves) is stored under a key derived from everything that determines
it, so later runs with the same settings load it and say so.

The Trainer is Lightning's own (progress bar, gradient clipping, a per-step LR schedule, ``should_stop``), its
numerics those of the plain loop it replaced, so a π0 built now equals the cached ones: AdamW, clip 1.0, a
30-update warm-up (``dibs.core.schedules.warmup_cosine``), and batches drawn by ``torch.randint`` from a
generator seeded with ``warmstart.seed``, one draw per step. It runs on the policy's own device with a
single-device strategy, so inside a torchrun/SLURM launch (``RANK``/``WORLD_SIZE`` set) it never joins or creates
a process group. The DataLoader is given a generator of its own: a DataLoader without one draws its base seed
from the global RNG, which the accuracy probe's sampling reads.

Curves (``warmstart/loss``, ``warmstart/lr`` every step, ``warmstart/accuracy`` at each probe, the SFT step as
the step) go to the run's loggers and to ``warmstart_curves.csv`` in the cache folder, from which a run that
loads π0 replays them. The Trainer gets no logger of its own: a Trainer finalizes its loggers when its fit ends
(TensorBoard's writer closed, an MLflow run marked finished) and adds an ``epoch`` series, which the run's
loggers must not see from this inner fit.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from dibs.core.batching import pad_right
from dibs.core.logprobs import sequence_logprobs
from dibs.core.losses import masked_mean
from dibs.core.schedules import warmup_cosine
from dibs.lit.progress import IterationProgressBar

__all__ = ["CURVES", "WarmStartReport", "cache_key", "load_cached", "load_curves", "log_curves", "sft"]

WARMUP = 30  # updates of linear learning-rate warm-up
GRAD_CLIP = 1.0
CURVES = "warmstart_curves.csv"
_COLUMNS = ("step", "loss", "lr", "accuracy")  # logged as warmstart/<column>; accuracy only at a probe


@dataclass(frozen=True)
class WarmStartReport:
    steps: int
    seconds: float
    accuracy: float  # last sampled held-out accuracy measured during SFT (-1 if never measured)
    stopped_by: str  # "steps" or "target_accuracy"


def cache_key(settings: dict[str, Any]) -> str:
    """A short stable hash of the JSON-serialised settings that determine π0."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_cached(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, WarmStartReport] | None:
    report = folder / "warmstart.json"
    if not report.is_file():
        return None
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return model, WarmStartReport(**json.loads(report.read_text()))


def sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int,
    target_accuracy: float,
    measure: Callable[[PreTrainedModel], float],
    out_dir: Path,
    schedule: str,
    loggers: Sequence[Any] = (),
    show_progress: bool = True,
) -> WarmStartReport:
    """Train on (prompt ids, response ids) pairs with the response-only NLL; save model, report and curves.
    ``loggers``: the run's Lightning loggers, which get the curves as they are made."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"warmstart.schedule={schedule!r} is not 'cosine' or 'constant'")
    started = time.perf_counter()
    horizon = steps if schedule == "cosine" else 0
    module = _SFT(model, tokenizer.pad_token_id, lr=lr, horizon=horizon)
    probe = _Probe(measure, eval_every, target_accuracy, loggers)
    draws = _Draws(len(examples), batch_size, steps, seed)
    batches = torch.utils.data.DataLoader(
        examples, batch_sampler=draws, collate_fn=list, generator=torch.Generator().manual_seed(seed)
    )
    if steps > 0:  # warmstart=none on the embedded model: π0 as built, no Trainer
        _fit(module, batches, probe, steps=steps, out_dir=out_dir, show_progress=show_progress)
    report = WarmStartReport(len(probe.curves), time.perf_counter() - started, probe.accuracy, probe.stopped_by)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_curves(out_dir / CURVES, probe.curves)
    (out_dir / "warmstart.json").write_text(json.dumps(report.__dict__, indent=2))
    return report


def _fit(module: _SFT, batches, probe: _Probe, *, steps: int, out_dir: Path, show_progress: bool) -> None:
    """Lightning's fit of ``module`` on the policy's device, one process, nothing written but what ``sft`` saves."""
    device = next(module.policy.parameters()).device
    callbacks: list[L.Callback] = [probe] + ([IterationProgressBar(label="warm start")] if show_progress else [])
    with _quiet_lightning():
        trainer = L.Trainer(
            accelerator="cpu" if device.type == "cpu" else "gpu",
            devices=1 if device.type == "cpu" else [device.index or 0],
            strategy=SingleDeviceStrategy(device=device),  # never a process group, whatever RANK/WORLD_SIZE say
            precision="32-true",  # the policy's own dtype, no autocast
            max_steps=steps,
            max_epochs=1,
            gradient_clip_val=GRAD_CLIP,
            gradient_clip_algorithm="norm",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=show_progress,
            callbacks=callbacks,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            default_root_dir=out_dir,
        )
        trainer.fit(module, train_dataloaders=batches)
    module.policy.to(device)  # the Trainer's teardown moves its module to the CPU


def load_curves(folder: Path) -> list[dict[str, float]] | None:
    """The curves saved with a cached π0 (one dict per SFT step: step, loss, lr and, at a probe, accuracy), or
    None for a π0 cached before curves were saved."""
    path = folder / CURVES
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def log_curves(loggers: Sequence[Any], row: dict[str, float]) -> None:
    """One SFT step's point (``load_curves``' form) to every logger, as ``warmstart/<name>`` at the SFT step."""
    metrics = {f"warmstart/{k}": v for k, v in row.items() if k != "step"}
    for logger in loggers:
        logger.log_metrics(metrics, step=int(row["step"]))


class _SFT(L.LightningModule):
    """The response-only NLL of a batch of (prompt ids, response ids) pairs; AdamW with the warm-up (+ cosine)
    schedule stepped every update."""

    def __init__(self, policy: PreTrainedModel, pad_id: int, *, lr: float, horizon: int) -> None:
        super().__init__()
        self.policy, self.pad_id, self.lr, self.horizon = policy, pad_id, lr, horizon
        self.step_lr = lr  # the learning rate of the update under way

    def training_step(self, batch: list[tuple[list[int], list[int]]], batch_idx: int) -> torch.Tensor:
        self.step_lr = self.optimizers().param_groups[0]["lr"]
        loss = _nll(self.policy, batch, self.pad_id)
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.lr, weight_decay=0.0)
        factor = lambda s: warmup_cosine(s, warmup=WARMUP, total=self.horizon)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _Draws(torch.utils.data.Sampler):
    """``steps`` batches of ``batch_size`` example indices, drawn with replacement from a generator of its own."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int) -> None:
        self.n, self.batch_size, self.steps = n, batch_size, steps
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield torch.randint(self.n, (self.batch_size,), generator=self.generator).tolist()


class _Probe(L.Callback):
    """After each update: the step's point of the curves (to the run's loggers as it is made); every
    ``every`` updates the sampled held-out accuracy, which stops the fit at ``target``."""

    def __init__(self, measure: Callable[[PreTrainedModel], float], every: int, target: float, loggers) -> None:
        self.measure, self.every, self.target, self.loggers = measure, every, target, list(loggers)
        self.accuracy, self.stopped_by = -1.0, "steps"
        self.curves: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: _SFT, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        row = {"step": step, "loss": float(outputs["loss"]), "lr": pl_module.step_lr}
        if self.every > 0 and step % self.every == 0:
            self.accuracy = row["accuracy"] = self.measure(pl_module.policy.eval())
            pl_module.policy.train()
            pl_module.log("accuracy", self.accuracy, prog_bar=True, logger=False)
            if self.accuracy >= self.target:
                self.stopped_by, trainer.should_stop = "target_accuracy", True
        self.curves.append(row)
        log_curves(self.loggers, row)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Without the inner Trainer's start-up lines (the devices it found) and its warning that a DataLoader
    without workers may be slow (the batches are lists of token ids, drawn in microseconds)."""
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*", PossibleUserWarning)
            yield
    finally:
        quiet.setLevel(level)


def _write_curves(path: Path, curves: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_COLUMNS)
        writer.writeheader()
        writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()} for row in curves)


def _nll(model: PreTrainedModel, batch: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    seqs = [torch.tensor(p + r) for p, r in batch]
    ids, mask = pad_right(seqs, pad_id)  # [B, L]
    target_mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)  # [B, L-1]
    for row, (p, r) in enumerate(batch):
        target_mask[row, len(p) - 1 : len(p) - 1 + len(r)] = 1.0
    device = next(model.parameters()).device
    ids, mask, target_mask = ids.to(device), mask.to(device), target_mask.to(device)
    forward = lambda input_ids, attention_mask: (
        model(  # noqa: E731
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits
    )
    return masked_mean(-sequence_logprobs(forward, ids, mask), target_mask)
