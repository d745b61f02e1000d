"""Hydra glue shared by train.py and the tests.

- ``dibs.root``: the checkout. ``conf/config.yaml`` adds ``<root>/experiments`` to Hydra's search path, so the
  grids in ``experiments/grid/`` are selectable as ``+grid=<name>`` from any working directory.
- ``dibs.run_name``: the folder name of a run in a multirun, made from its axis values (``algo=raft,seed=0``).
  In a grid the axes are the grid's (``hydra.sweeper.params``); in a plain command-line sweep, which Hydra does
  not tell a job apart from its fixed overrides, every override names the run, as Hydra's own
  ``override_dirname`` does, shortened with a hash when it would not make a usable file name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

__all__ = ["ROOT", "NOT_IN_RUN_NAMES", "register_resolvers", "run_name"]

ROOT = Path(__file__).resolve().parents[1]  # the checkout: conf/, experiments/, train.py
NOT_IN_RUN_NAMES = ("grid", "cache_dir", "ckpt_path")  # select the grid or say where files go: not an axis
MAX_NAME = 120


def run_name(task_overrides: Any, axes: Any = None, job_num: int = 0) -> str:
    """``k=v`` pairs of a job's overrides joined by commas: the grid's axes in their declared order, or (no
    grid) every override but those in NOT_IN_RUN_NAMES, sorted."""
    overrides = OverridesParser.create().parse_overrides([str(o) for o in task_overrides or []])
    values = {o.key_or_group: o.get_value_element_as_str() for o in overrides}
    bare = {key.lstrip("+~"): key for key in values}
    if axes:
        pairs = [f"{key}={values[bare[key]]}" for key in axes if key in bare]
    else:
        pairs = sorted(f"{key}={v}" for key, v in values.items() if key.lstrip("+~") not in NOT_IN_RUN_NAMES)
    name = ",".join(pairs).replace("/", "_") or f"job{job_num}"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 11]}~{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dibs.root"):
        OmegaConf.register_new_resolver("dibs.root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("dibs.run_name"):
        OmegaConf.register_new_resolver("dibs.run_name", run_name)
