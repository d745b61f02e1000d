"""What a resume does before Lightning loads a checkpoint: read the checkpoint's sidecar, check that a
distributed checkpoint was written by dibs, rewind the run's event files and clear away half-written or abandoned
checkpoints. ``train.py`` calls these before any work; ``dibs.lit.checkpoints`` writes what they read.

**Sidecar.** Every checkpoint ``<name>.ckpt`` has a ``<name>.json`` written before ``last.ckpt`` is switched to
it: iterations done, updates, costs, whether the run stopped there, where every log file of the run folder stood
at the save (``log_positions``), the last accuracy, and (distributed checkpoints) their signature.

**Logs.** A resumed run cuts the logs in its folder back to where they stood at the save and deletes log files
written after it, so each point is in the logs once, whatever the reader (the effect of TensorBoard's
``purge_step``, exact even when two points share a step): TensorBoard event files and the metric histories of an
MLflow file store to their size in bytes, a CSV logger's ``metrics.csv`` to its number of rows (Lightning rewrites
the whole file when a new column appears, so bytes would not do). Logs kept elsewhere (an MLflow server, W&B's
offline records) are not rewound.

**Trust.** A distributed checkpoint's ``.metadata`` and shards hold Python pickles: loading them runs whatever
code they name. The sidecar of every distributed checkpoint dibs writes holds an HMAC-SHA256, over the name and
SHA-256 of each of its files, under a key kept in the user's config folder (``~/.config/dibs/checkpoint.key``,
or the file ``$DIBS_CHECKPOINT_KEY`` names); one whose HMAC does not verify (written elsewhere, altered, or
without a sidecar) is refused unless ``checkpoint.trust=true``. Single-file checkpoints are read with
``torch.load(weights_only=True)``, which runs no code, and need no flag.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EVENT_PREFIX",
    "LAST",
    "CheckpointInfo",
    "UntrustedCheckpoint",
    "check_trusted",
    "drop_newer",
    "log_positions",
    "read_info",
    "remove_unfinished",
    "rewind_event_files",
    "signature",
    "signing_key",
]

LAST = "last.ckpt"
EVENT_PREFIX = "events.out.tfevents."
METRICS_CSV = "metrics.csv"  # a CSV logger's file (Lightning's CSVLogger)


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
    events: dict[str, int]  # log file (relative to the run folder) -> its position at the save (log_positions)
    metadata_hmac: str | None  # distributed checkpoints: HMAC-SHA256 of .metadata
    last_accuracy: float | None


def _key_file() -> Path:
    env = os.environ.get("DIBS_CHECKPOINT_KEY")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "dibs" / "checkpoint.key"


def signing_key(create: bool) -> bytes | None:
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


def signature(folder: Path, key: bytes) -> str:
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
    key = signing_key(create=False)
    why = None
    if found is None or found.metadata_hmac is None:
        why = "it has no dibs sidecar (<name>.json) recording its signature"
    elif key is None:
        why = f"this machine has no checkpoint key ({_key_file()}), so it was not written here"
    elif not hmac.compare_digest(found.metadata_hmac, signature(path, key)):
        why = "its files do not match the signature recorded when dibs wrote it (altered, or written elsewhere)"
    if why:
        raise UntrustedCheckpoint(
            f"ckpt_path={ckpt} is a distributed checkpoint that dibs cannot verify: {why}. Its .metadata and shards "
            "hold Python pickles, and loading them can run arbitrary code. If you wrote it or trust whoever did, "
            "pass checkpoint.trust=true."
        )


def log_positions(run_dir: Path) -> dict[str, int]:
    """Where each log file of the run folder stands (paths relative to it): the size in bytes of every TensorBoard
    event file and MLflow file-store metric history, the number of data rows of every ``metrics.csv``."""
    return {str(path.relative_to(run_dir)): _position(path) for path in _log_files(run_dir)}


def rewind_event_files(run_dir: Path, events: dict[str, int]) -> tuple[int, int]:
    """Cut the run folder's log files back to the positions a checkpoint recorded (``log_positions``); delete
    those written after it. Returns (files cut, files deleted)."""
    cut = deleted = 0
    for path in _log_files(run_dir):
        rel = str(path.relative_to(run_dir))
        if rel not in events:
            path.unlink()
            deleted += 1
        elif _position(path) > events[rel]:
            _cut(path, events[rel])
            cut += 1
    return cut, deleted


def _log_files(run_dir: Path) -> list[Path]:
    """TensorBoard event files, CSV loggers' metrics.csv, and the metric files of MLflow file-store runs (a run's
    folder holds meta.yaml and metrics/, one file per metric, ``val/acc`` as metrics/val/acc)."""
    files = [*run_dir.rglob(f"{EVENT_PREFIX}*"), *run_dir.rglob(METRICS_CSV)]
    for metrics in run_dir.rglob("metrics"):
        if metrics.is_dir() and (metrics.parent / "meta.yaml").is_file():
            files += [path for path in metrics.rglob("*") if path.is_file()]
    return sorted(path for path in files if path.is_file())


def _position(path: Path) -> int:
    if path.name != METRICS_CSV:
        return path.stat().st_size
    with open(path, newline="") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)  # the header is no row


def _cut(path: Path, position: int) -> None:
    if path.name != METRICS_CSV:
        with open(path, "r+b") as f:
            f.truncate(position)
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows[: position + 1])
    os.replace(tmp, path)


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
