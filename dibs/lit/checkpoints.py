"""Checkpoints a killed run resumes from, and the resume itself.

**When.** ``IterationCheckpoint`` saves (i) once the first E-step of a run has filled the DataModule (before its
first update), (ii) at the end of every iteration, after its evaluation, its export and the NEXT iteration's
E-step, so the checkpoint holds that iteration's rollouts, and (iii) optionally every ``every_updates``
optimiser updates inside an iteration. A run killed at any moment therefore resumes from a state whose E-step
is done: no E-step is generated twice and no sample is counted twice; at most the updates since the last save
(and an evaluation) are re-run, deterministically.

**What.** Lightning's checkpoint (weights, optimiser, LR schedule, loop counters, the DataModule's rollouts,
the rollout callback's costs, evaluations and GVM estimates) plus this callback's own state: the RNG streams
(torch, NumPy, Python) and the size of every logger event file at the moment of the save.

**Atomic.** Each save writes a new ``<name>.ckpt`` (a file, or a folder for a distributed checkpoint) and a
sidecar ``<name>.json``; only then is the symlink ``last.ckpt`` switched to it with one ``os.replace``. A crash
while saving leaves ``last.ckpt`` pointing at the previous complete checkpoint; the half-written one is removed
on the next start. ``keep`` checkpoints are kept (the newest), older ones deleted after the switch.

**Logs.** A resumed run cuts every TensorBoard event file back to the size it had at the save and deletes
event files written after it, so each point is in the logs once, whatever the reader (the same effect as
TensorBoard's ``purge_step``, exact even when two points share a step).

**Trust.** A distributed checkpoint's ``.metadata`` is a Python pickle: loading it runs whatever code it
names. The sidecar of every checkpoint this kit writes holds an HMAC of that file under a key kept in the
user's config folder (``~/.config/dibs/checkpoint.key``, or ``$DIBS_CHECKPOINT_KEY``); a distributed
checkpoint whose HMAC does not verify (written elsewhere, altered, or without a sidecar) is refused unless
``checkpoint.trust=true``. Single-file checkpoints are read with ``torch.load(weights_only=True)``, which runs no
code, and need no flag.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from dibs.lit.dist import gather_per_rank, pick_own
from dibs.lit.logs import info

__all__ = [
    "LAST",
    "CheckpointInfo",
    "IterationCheckpoint",
    "UntrustedCheckpoint",
    "check_trusted",
    "drop_newer",
    "read_info",
    "rewind_event_files",
]

LAST = "last.ckpt"
EVENT_PREFIX = "events.out.tfevents."


class UntrustedCheckpoint(RuntimeError):
    """A distributed checkpoint this kit cannot prove it wrote: loading it could run arbitrary code."""


@dataclass(frozen=True)
class CheckpointInfo:
    """The sidecar of a checkpoint: where it is, how far the run had got, and what the logs held."""

    path: Path
    iterations_done: int  # EM iterations whose M-step is finished
    global_step: int  # optimiser updates
    costs: dict[str, float]  # cumulative samples, tokens, updates, wall_s
    stopped: bool  # the run ended at this checkpoint (last iteration or budget)
    events: dict[str, int]  # event file (relative to the run folder) -> size in bytes at the save
    metadata_hmac: str | None  # distributed checkpoints: HMAC-SHA256 of .metadata
    last_accuracy: float | None


def _key_file() -> Path:
    env = os.environ.get("DIBS_CHECKPOINT_KEY")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "dibs" / "checkpoint.key"


def _key(create: bool) -> bytes | None:
    path = _key_file()
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(secrets.token_hex(32))
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        tmp.unlink()
    return bytes.fromhex(path.read_text().strip())


def _metadata_hmac(folder: Path, key: bytes) -> str:
    """HMAC-SHA256 of a distributed checkpoint: of the name and SHA-256 of every file in it, since DCP unpickles
    the non-tensor entries of its shards as well as ``.metadata``."""
    manifest = hmac.new(key, digestmod=hashlib.sha256)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        manifest.update(f"{path.relative_to(folder).as_posix()}\0{digest.hexdigest()}\n".encode())
    return manifest.hexdigest()


def read_info(ckpt: str | os.PathLike) -> CheckpointInfo | None:
    """The sidecar of ``ckpt`` (``last.ckpt`` resolved through its link), or None when there is none."""
    path = Path(ckpt)
    if not path.exists():
        return None
    real = path.resolve()
    sidecar = real.with_suffix(".json")
    if not sidecar.exists():
        return None
    raw = json.loads(sidecar.read_text())
    return CheckpointInfo(
        path=real,
        iterations_done=raw["iterations_done"],
        global_step=raw["global_step"],
        costs=raw["costs"],
        stopped=raw["stopped"],
        events=raw["events"],
        metadata_hmac=raw.get("metadata_hmac"),
        last_accuracy=raw.get("last_accuracy"),
    )


def check_trusted(ckpt: str | os.PathLike, trust: bool) -> None:
    """Refuse a distributed-checkpoint folder whose ``.metadata`` (a pickle) this kit cannot prove it wrote."""
    path = Path(ckpt).resolve()
    if not path.is_dir() or trust:
        return
    if not (path / ".metadata").exists():
        raise UntrustedCheckpoint(f"ckpt_path={ckpt}: a folder without .metadata is not a distributed checkpoint")
    found = read_info(path)
    key = _key(create=False)
    why = None
    if found is None or found.metadata_hmac is None:
        why = "it has no dibs sidecar (<name>.json) recording its signature"
    elif key is None:
        why = f"this machine has no checkpoint key ({_key_file()}), so it was not written here"
    elif not hmac.compare_digest(found.metadata_hmac, _metadata_hmac(path, key)):
        why = "its files do not match the signature recorded when dibs wrote it (altered, or written elsewhere)"
    if why:
        raise UntrustedCheckpoint(
            f"ckpt_path={ckpt} is a distributed checkpoint that dibs cannot verify: {why}. Its .metadata and shards "
            "hold Python pickles, and loading them can run arbitrary code. If you wrote it or trust whoever did, "
            "pass checkpoint.trust=true."
        )


def rewind_event_files(run_dir: Path, events: dict[str, int]) -> tuple[int, int]:
    """Cut the run's logger event files back to the sizes a checkpoint recorded; delete those written after it.
    Returns (files cut, files deleted)."""
    cut = deleted = 0
    for path in sorted(run_dir.rglob(f"{EVENT_PREFIX}*")):
        rel = str(path.relative_to(run_dir))
        if rel not in events:
            path.unlink()
            deleted += 1
        elif path.stat().st_size > events[rel]:
            with open(path, "r+b") as f:
                f.truncate(events[rel])
            cut += 1
    return cut, deleted


def remove_unfinished(dirpath: Path) -> list[str]:
    """Checkpoints a crash left half-written: everything in ``dirpath`` without a sidecar, and temp files."""
    removed = []
    if not dirpath.is_dir():
        return removed
    for path in dirpath.iterdir():
        if path.name == LAST or path.suffix == ".json":
            continue
        if ".tmp" in path.name or not path.with_suffix(".json").exists():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path.name)
    for path in dirpath.glob("*.json.tmp*"):
        path.unlink()
    return removed


def drop_newer(dirpath: Path, chosen: Path) -> list[str]:
    """Resuming in place from a checkpoint older than ``last.ckpt``: the later checkpoints belong to a history the
    logs no longer hold, so they are removed and ``last.ckpt`` names the chosen one."""
    chosen = chosen.resolve()
    newer = [
        p
        for p in dirpath.glob("*.ckpt")
        if not p.is_symlink()
        and p.resolve() != chosen
        and p.with_suffix(".json").exists()
        and p.with_suffix(".json").stat().st_mtime_ns > chosen.with_suffix(".json").stat().st_mtime_ns
    ]
    for path in newer:
        path.with_suffix(".json").unlink()
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if newer:
        tmp = dirpath / f"{LAST}.tmp-{os.getpid()}"
        os.symlink(chosen.name, tmp)
        os.replace(tmp, dirpath / LAST)
    return sorted(p.name for p in newer)


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
        every_updates: int = 0,
        keep: int = 2,
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
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "flush"):
                experiment.flush()
        return {
            str(p.relative_to(self.run_dir)): p.stat().st_size for p in sorted(self.run_dir.rglob(f"{EVENT_PREFIX}*"))
        }

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
            "metadata_hmac": _metadata_hmac(path, _key(create=True)) if path.is_dir() else None,
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
