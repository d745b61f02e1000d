"""The checkpoints a killed run resumes from (``dibs.resume`` reads them back before the next start).

**When.** ``IterationCheckpoint`` saves (i) once the first E-step of a run has filled the DataModule (before its
first update), (ii) at the end of every iteration, after its evaluation, its export and the NEXT iteration's
E-step, so the checkpoint holds that iteration's rollouts, and (iii) optionally every ``every_updates``
optimiser updates inside an iteration. A run killed at any moment therefore resumes from a state whose E-step
is done: no E-step is generated twice and no sample is counted twice; at most the updates since the last save
(and an evaluation) are re-run, deterministically.

**What.** Lightning's checkpoint (weights, optimiser, LR schedule, loop counters, the DataModule's rollouts,
the rollout callback's costs, evaluations and GVM estimates) plus this callback's own state: every rank's RNG
streams (torch, NumPy, Python). The sidecar ``<name>.json`` records where every log file of the run folder stood at
the moment of the save (``dibs.resume.log_positions``), and a distributed checkpoint's signature.

**Atomic.** Each save writes a new ``<name>.ckpt`` (a file, or a folder for a distributed checkpoint) and its
sidecar; only then is the symlink ``last.ckpt`` switched to it with one ``os.replace``. A crash while saving
leaves ``last.ckpt`` pointing at the previous complete checkpoint; the half-written one is removed on the next
start. ``keep`` checkpoints are kept (the newest), older ones deleted after the switch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from dibs.lit.dist import gather_per_rank, pick_own
from dibs.lit.logs import info
from dibs.resume import LAST, log_positions, signature, signing_key

__all__ = ["IterationCheckpoint"]


def _rng_state() -> dict[str, Any]:
    # Tensors and plain Python values only: checkpoints stay loadable with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": [has_gauss, cached]},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(np_state["pos"]), int(np_state["gauss"][0]), float(np_state["gauss"][1])))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class IterationCheckpoint(Checkpoint):
    """Saves the run after its first E-step, after every iteration and every ``every_updates`` updates."""

    def __init__(
        self,
        dirpath: str | os.PathLike,
        run_dir: str | os.PathLike,
        *,
        every_updates: int,
        keep: int,
        rollout: Any = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1 (the checkpoint a resume needs)")
        if every_updates < 0:
            raise ValueError(f"checkpoint.every_updates={every_updates} must be >= 0 (0: only between iterations)")
        self.dirpath, self.run_dir = Path(dirpath), Path(run_dir)
        self.every_updates, self.keep = every_updates, keep
        self.rollout = rollout  # the RolloutCallback: costs and evaluations for the sidecar
        self.resumed = False  # set by train.py before fit when it resumes from a checkpoint
        self._before_first_epoch = False
        self._restored_rng: dict[str, Any] | None = None

    # ---- hooks -------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The first E-step ran when the dataloader was built: save it before the first update, unless the
        # run resumed from a checkpoint that already holds it.
        loop = trainer.fit_loop.epoch_loop
        if trainer.current_epoch == 0 and loop.batch_progress.current.completed == 0 and not self.resumed:
            self._before_first_epoch = True
            try:
                self.save(trainer, "iter_001-update_000", iterations_done=0)
            finally:
                self._before_first_epoch = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._before_first_epoch:
            # Saved inside on_train_epoch_start, Lightning's epoch counters read "epoch 0 ready, not started", which
            # it restores as a restart at an epoch's start and then keeps one count behind for the rest of the run
            # (a later resume from an iteration's end would run one update). Recorded instead as the state before
            # the first epoch: a resume starts the epoch afresh, with the rollouts the DataModule holds.
            progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
            for part in ("total", "current"):
                progress[part]["ready"] = progress[part]["started"]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        done = batch_idx + 1
        if self.every_updates and done % self.every_updates == 0 and done < trainer.num_training_batches:
            self.save(trainer, f"iter_{trainer.current_epoch + 1:03d}-update_{done:03d}", trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        self.save(trainer, f"iter_{done:03d}", done, stopped=trainer.should_stop or done >= (trainer.max_epochs or 0))

    def state_dict(self) -> dict[str, Any]:
        return {"rng": gather_per_rank(_rng_state())}  # each rank's streams

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored_rng = state.get("rng")  # picked per rank once the processes exist (on_train_start)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored_rng is not None:  # after every restore, whatever the strategy's order
            _set_rng_state(pick_own(self._restored_rng, "RNG streams"))
            self._restored_rng = None

    # ---- saving ------------------------------------------------------------------------------
    def save(self, trainer: L.Trainer, name: str, iterations_done: int, stopped: bool = False) -> None:
        if trainer.sanity_checking:
            return
        started = time.perf_counter()
        events = self._flush_loggers(trainer)
        path = self.dirpath / f"{name}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # every rank: a collective under distributed strategies
        trainer.strategy.barrier("dibs-checkpoint-saved")
        if trainer.is_global_zero:
            self._commit(trainer, path, events, iterations_done, stopped)
        trainer.strategy.barrier("dibs-checkpoint-committed")
        self._prune(trainer)
        seconds = time.perf_counter() - started
        if self.rollout is not None:  # a save inside an M-step is not training time (time/train_s, cost/wall_s)
            self.rollout.exclude_from_train_time(seconds)
        info(f"checkpoint {path.name} saved ({seconds:.1f}s)")

    def _flush_loggers(self, trainer: L.Trainer) -> dict[str, int]:
        if not trainer.is_global_zero:
            return {}
        for logger in trainer.loggers:
            logger.save()  # a CSV logger's buffered rows to its file
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "flush"):
                experiment.flush()
        return log_positions(self.run_dir)

    def _commit(
        self, trainer: L.Trainer, path: Path, events: dict[str, int], iterations_done: int, stopped: bool
    ) -> None:
        rollout = self.rollout
        costs = rollout.costs(trainer) if rollout is not None else {"updates": trainer.global_step}
        evals = rollout.evals if rollout is not None else []
        sidecar = {
            "iterations_done": iterations_done,
            "global_step": trainer.global_step,
            "costs": costs,
            "stopped": bool(stopped),
            "events": events,
            "metadata_hmac": signature(path, signing_key(create=True)) if path.is_dir() else None,
            "last_accuracy": evals[-1].accuracy if evals else None,
        }
        _atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=1))
        link = self.dirpath / LAST
        tmp = self.dirpath / f"{LAST}.tmp-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(path.name, tmp)
        os.replace(tmp, link)  # the commit point: last.ckpt now names a complete checkpoint
        _fsync_dir(self.dirpath)

    def _prune(self, trainer: L.Trainer) -> None:
        """Keep the ``keep`` newest committed checkpoints (read from the folder, so a resumed run counts the
        checkpoints of its earlier life too); never the one ``last.ckpt`` names."""
        if trainer.is_global_zero:
            last = (self.dirpath / LAST).resolve()
            committed = [
                p for p in self.dirpath.glob("*.ckpt") if not p.is_symlink() and p.with_suffix(".json").exists()
            ]
            committed.sort(key=lambda p: p.with_suffix(".json").stat().st_mtime_ns)
            for old in committed[: max(0, len(committed) - self.keep)]:
                if old.resolve() != last:
                    old.with_suffix(".json").unlink(missing_ok=True)  # first: without it the rest is debris
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        trainer.strategy.barrier("dibs-checkpoint-pruned")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
