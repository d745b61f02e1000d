"""The training bar: Lightning's ``RichProgressBar`` counting EM iterations the way every message does.

    iteration 2/12 ━━━━━━━━━━━━━━━━━━━━━━━━ 17/32 0:00:04 • 0:00:04 4.01it/s loss: -1.013 accepted: 266/2048 (13%)

- the description is "iteration k/N" (1-based, as the log lines, exports and checkpoints number iterations), not
  Lightning's 0-based "Epoch k-1/N-1"; ``label`` names another unit, and stands alone where the epochs are
  unbounded (a trainer stopped by ``max_steps``, e.g. a warm start's SFT: "warm start");
- ``loss``: the latest update's, read from ``training_step``'s return value (the loss it back-propagated), so an
  iteration whose M-step is skipped shows none rather than the previous iteration's;
- ``accepted``: accepted / generated samples of the E-step that fed this M-step, read from ``source.acceptance``
  (``RolloutCallback``: {0-based iteration: (accepted, generated)}); absent when no source is given;
- whatever the module logs with ``prog_bar=True`` (e.g. a warm start's probe accuracy).

Drawn on rich's global console, like the log lines (``dibs.lit.console``), which print above it. On rank > 0
Lightning disables it; where the console is no terminal (a CI log, ``> file``) it disables itself: redraws
would only fill the log, whose lines already say which iteration runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from rich.progress import BarColumn

from dibs.lit.console import live_console

__all__ = ["AcceptanceSource", "IterationProgressBar", "format_acceptance"]


class AcceptanceSource(Protocol):
    acceptance: Mapping[int, tuple[int, int]]  # 0-based iteration -> (accepted, generated) samples of its E-step


def format_acceptance(accepted: int, generated: int) -> str:
    """``412/2048 (20%)``; ``0/0`` for an E-step that generated nothing (a spent sample budget)."""
    return f"{accepted}/{generated} ({100 * accepted / generated:.0f}%)" if generated else f"{accepted}/{generated}"


class IterationProgressBar(RichProgressBar):
    def __init__(
        self,
        source: AcceptanceSource | None = None,
        *,
        label: str = "iteration",
        refresh_rate: int = 10,
        leave: bool = False,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=RichProgressBarTheme(metrics_format=".4g"))
        self.source, self.label = source, label
        self.loss: float | None = None  # the latest update's, this iteration

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # disabled on ranks > 0
        if not live_console():
            self.disable()

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = super().configure_columns(trainer)
        for column in columns:  # a shorter bar than Lightning's 40 cells: the loss and acceptance fit on the line
            if isinstance(column, BarColumn):
                column.bar_width = 24
        return columns

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        if self.trainer.max_steps > 0 or total is None or total <= 0:  # bounded by steps (the warm start): no k/N
            return self.label
        return f"{self.label} {current_epoch + 1}/{total}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loss = None
        super().on_train_epoch_start(trainer, pl_module)
        self._update_metrics(trainer, pl_module)  # the E-step's acceptance before the first update ends

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            self.loss = float(loss.item() if isinstance(loss, torch.Tensor) else loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_progress()  # the finished bar stays above the end-of-run summary (printed at fit end), not under it

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float | str]:
        metrics: dict[str, float | str] = {}
        if self.loss is not None:
            metrics["loss"] = self.loss
        for name, value in trainer.progress_bar_metrics.items():
            metrics[name] = value.item() if isinstance(value, torch.Tensor) else value
        counts = self.source.acceptance.get(trainer.current_epoch) if self.source is not None else None
        if counts is not None:
            metrics["accepted"] = format_acceptance(*counts)
        return metrics
