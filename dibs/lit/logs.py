"""Console/file messages of the kit: the "dibs" logger, written by rank 0 only (Hydra captures it)."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only

__all__ = ["info", "warn"]

_log = logging.getLogger("dibs")


@rank_zero_only
def info(message: str) -> None:
    _log.info(message)


@rank_zero_only
def warn(message: str) -> None:
    _log.warning(message)
