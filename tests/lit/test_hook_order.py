"""The EM loop relies on Lightning reloading the train dataloader BEFORE on_train_epoch_start, and after
the previous epoch's on_train_epoch_end: the E-step for epoch k runs in on_fit_start (k = 0) or in
on_train_epoch_end of epoch k − 1. This test fails if a Lightning upgrade changes that order."""

import lightning as L
import torch
from torch.utils.data import DataLoader


class Recorder(L.Callback):
    def __init__(self, events):
        self.events = events

    def on_fit_start(self, trainer, pl_module):
        self.events.append("fit_start")

    def on_train_epoch_start(self, trainer, pl_module):
        self.events.append(f"epoch_start:{trainer.current_epoch}")

    def on_train_epoch_end(self, trainer, pl_module):
        self.events.append(f"epoch_end:{trainer.current_epoch}")


class Data(L.LightningDataModule):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def train_dataloader(self):
        self.events.append("train_dataloader")
        return DataLoader(torch.randn(4, 2), batch_size=2)


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_dataloader_reloads_between_epoch_end_and_next_epoch_start(tmp_path):
    events: list[str] = []
    trainer = L.Trainer(
        max_epochs=3,
        reload_dataloaders_every_n_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Recorder(events)],
        default_root_dir=tmp_path,
    )
    trainer.fit(Model(), datamodule=Data(events))
    assert events == [
        "fit_start",
        "train_dataloader",
        "epoch_start:0",
        "epoch_end:0",
        "train_dataloader",
        "epoch_start:1",
        "epoch_end:1",
        "train_dataloader",
        "epoch_start:2",
        "epoch_end:2",
    ]
