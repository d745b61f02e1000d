"""The training bar (dibs.lit.progress.IterationProgressBar) on a real Trainer: "iteration k/N" numbered from 1,
the latest update's loss from training_step (none in an iteration whose M-step is skipped, not the previous one's)
and the acceptance of the E-step that fed the M-step."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import dibs.lit.progress as progress_module
from dibs.lit.progress import IterationProgressBar, format_acceptance


class Model(L.LightningModule):
    """Manual optimisation as the EM module: a loss per update, nothing in iteration 2 (a skipped M-step)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            return None
        return torch.tensor(0.5 + batch_idx)  # the loss of update batch_idx + 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ProbedModel(Model):
    """A warm start's SFT: an accuracy logged to the bar besides the loss."""

    def training_step(self, batch, batch_idx):
        self.log("accuracy", 0.25, prog_bar=True, logger=False)
        return super().training_step(batch, batch_idx)


class Probe(L.Callback):
    """What the bar would show, read after the bar's own hooks (it runs after the bar)."""

    def __init__(self, bar):
        self.bar, self.seen = bar, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(("start", trainer.current_epoch, self.bar.get_metrics(trainer, pl_module)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((batch_idx, trainer.current_epoch, self.bar.get_metrics(trainer, pl_module)))


def fit(tmp_path, bar, model=None):
    probe = Probe(bar)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar, probe],
        default_root_dir=tmp_path,
    )
    trainer.fit(model or Model(), DataLoader(torch.randn(4, 2), batch_size=2))
    return trainer, probe.seen


def test_the_bar_shows_the_latest_loss_and_the_feeding_e_steps_acceptance(tmp_path):
    source = SimpleNamespace(acceptance={0: (3, 8), 1: (0, 8)})  # the rollout callback's, by 0-based iteration
    bar = IterationProgressBar(source)
    trainer, seen = fit(tmp_path, bar)
    assert trainer.progress_bar_callback is bar
    assert seen == [
        ("start", 0, {"accepted": "3/8 (38%)"}),  # before the first update ends: the acceptance only
        (0, 0, {"loss": 0.5, "accepted": "3/8 (38%)"}),
        (1, 0, {"loss": 1.5, "accepted": "3/8 (38%)"}),
        ("start", 1, {"accepted": "0/8 (0%)"}),
        (0, 1, {"accepted": "0/8 (0%)"}),  # a skipped M-step: no loss, not iteration 1's
        (1, 1, {"accepted": "0/8 (0%)"}),
    ]


def test_without_a_known_acceptance_the_bar_shows_the_loss_and_what_the_module_shows(tmp_path):
    bar = IterationProgressBar(SimpleNamespace(acceptance={}))  # e.g. a checkpoint written before it was kept
    _, seen = fit(tmp_path, bar)
    assert seen[1] == (0, 0, {"loss": 0.5}) and seen[0] == ("start", 0, {})
    _, seen = fit(tmp_path, IterationProgressBar(), ProbedModel())  # no source at all (a warm start's trainer)
    assert seen[2] == (1, 0, {"loss": 1.5, "accuracy": 0.25})


def test_on_a_terminal_the_bar_counts_iterations_from_one(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_module, "live_console", lambda: True)
    bar = IterationProgressBar(SimpleNamespace(acceptance={0: (1, 4), 1: (2, 4)}))
    fit(tmp_path, bar)
    assert bar.is_enabled
    assert bar.train_progress_bar.description == "iteration 2/2" and bar.train_progress_bar.completed == 2
    assert [c.bar_width for c in bar.progress.columns if hasattr(c, "bar_width")] == [24]
    labelled = IterationProgressBar(label="warm start")
    labelled._trainer = SimpleNamespace(max_epochs=1, max_steps=30)  # bounded by steps: the label
    assert labelled._get_train_description(0) == "warm start"


def test_off_a_terminal_the_bar_draws_nothing(tmp_path, capsys):
    bar = IterationProgressBar(SimpleNamespace(acceptance={0: (1, 4), 1: (2, 4)}))
    fit(tmp_path, bar)
    assert bar.is_disabled and bar.progress is None
    assert "iteration" not in capsys.readouterr().out


@pytest.mark.parametrize(("accepted", "generated", "shown"), [(412, 2048, "412/2048 (20%)"), (0, 0, "0/0")])
def test_format_acceptance(accepted, generated, shown):
    assert format_acceptance(accepted, generated) == shown
