"""The run's console: one line per message, bars that never swallow a line, quiet ranks > 0.

Everything a run prints goes through rich's global console (``rich.get_console()``), which Lightning's
``RichProgressBar`` (``dibs.lit.progress``) draws on too: a message logged while a bar is live is printed above
it, never glued onto it.

- ``console_handler``: the console handler of the ``hydra/job_logging=dibs`` preset (``conf/hydra/job_logging``).
  On a terminal a ``rich.logging.RichHandler``; otherwise (a CI log, ``> file``) a plain ``StreamHandler`` on
  stdout with the file's format, one unwrapped line per message, since a RichHandler pads and wraps to 80
  columns there. On a rank > 0 of a multi-process run it shows errors only (rank 0 speaks for the run; every
  rank still writes its own log file).
- ``setup_console``: called once by ``dibs.train`` and ``dibs.evaluate`` after Lightning is imported. The
  ``lightning`` package attaches a handler of its own at import, so each Lightning message printed twice; it
  goes, and so do Lightning's advertising tips. Python warnings are logged (above the bars, into the log file),
  without those no setting of a run can silence or that say nothing about it (``QUIET_WARNINGS``).
- ``progress``: a transient bar for a loop that runs long (generation, the warm start), on the same console;
  shown on a terminal only, on rank 0 only, so no redraws end up in a log file.

Light on purpose (rich and the standard library): Hydra imports it to configure logging, before the heavy
imports of a run.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich import get_console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["TIP_MARKER", "console_handler", "is_rank_zero", "live_console", "progress", "setup_console"]

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")  # set by launchers for a run's processes
TIP_MARKER = "💡"  # Lightning's tips ("💡 Tip: ... litlogger ...") start with it
# (message, category, module): warnings nothing in a run's settings can change, or that say nothing about it.
QUIET_WARNINGS = (
    # raised inside Lightning by the torch it runs on
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, ""),
    (r"`LeafSpec` is deprecated", FutureWarning, ""),
    # an M-step skipped before the first update still steps the schedule, on purpose (dibs.lit.module)
    (r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`", UserWarning, r"dibs\.lit\.module"),
)
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
_RANK_ZERO_LOGGERS = (  # where Lightning's rank_zero_info writes, whichever package set it last
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)


def is_rank_zero() -> bool:
    """Whether this process speaks for the run: no launcher gave it a rank > 0, nor did torch.distributed."""
    if any(os.environ.get(name, "0") not in ("", "0") for name in RANK_VARIABLES):
        return False
    dist = sys.modules.get("torch.distributed")  # never imported for this: only asked when already there
    return not (dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def live_console() -> bool:
    """Whether the console can redraw a bar in place (a terminal); not for a pipe, a file or a dumb terminal."""
    console = get_console()
    return console.is_terminal and not console.is_dumb_terminal


def console_handler(format: str, datefmt: str | None = None) -> logging.Handler:
    """The console handler (Hydra's job_logging calls it with ``()``): see the module docstring."""
    if live_console():
        handler: logging.Handler = RichHandler(
            console=get_console(),
            show_path=False,
            markup=False,  # messages hold brackets (levels ['1', '2'], paths): never read as rich markup
            log_time_format="[%X]",
        )
        handler.setFormatter(logging.Formatter("%(message)s"))  # the time and the level are RichHandler's columns
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(format, datefmt))
    if not is_rank_zero():
        handler.setLevel(logging.ERROR)
    return handler


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(TIP_MARKER)


_DROP_TIPS = _DropTips()


def setup_console() -> None:
    """Lightning's messages once each and without tips, warnings through logging (see the module docstring).
    Idempotent; imports Lightning, so call it where the run imports it anyway."""
    import lightning  # noqa: F401  (its import attaches the handler removed here)

    if logging.getLogger().handlers:  # the job's handlers (Hydra's) print Lightning's messages: its own go
        for name in _LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_TIPS not in logger.filters:
            logger.addFilter(_DROP_TIPS)
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logging.captureWarnings(True)  # "py.warnings": one line above the bars, and in the log file


@contextmanager
def progress(
    total: int | None, description: str, *, unit: str = "", enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """A transient bar for a long loop: ``with progress(n, "generating", unit="samples") as advance: ...
    advance(k)``. Drawn on rich's global console (nested under Lightning's live training bar when one is shown),
    only on a terminal and on rank 0; elsewhere ``advance`` does nothing."""
    if not (enabled and live_console() and is_rank_zero()):
        yield lambda n=1: None
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *([TextColumn(unit)] if unit else []),
        TimeElapsedColumn(),
        TextColumn("•"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=get_console(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
