"""Hydra glue shared by train.py and the tests.

- ``dibs.root``: the checkout. ``conf/config.yaml`` adds ``<root>/experiments`` to Hydra's search path, so the
  grids in ``experiments/grid/`` are selectable as ``+grid=<name>`` from any working directory.
- ``dibs.product``: the product of its arguments (FSDP2's data-parallel size, ``num_nodes`` x ``devices``).
- ``dibs.run_name``: the folder name of a run in a multirun, made from its axis values (``algo=raft,seed=0``).
  The axes are the grid's (``hydra.sweeper.params``) plus any key swept on the command line (``x=1,2``).
  Hydra hands a job its overrides without saying which were swept, so the command-line sweeps are read from
  the launching command; where that is not this process's (a remote launcher), every override names the run,
  as Hydra's own ``override_dirname`` does. Names too long for a file name are shortened with a hash.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

__all__ = ["ROOT", "NOT_IN_RUN_NAMES", "flatten", "register_resolvers", "run_name"]

ROOT = Path(__file__).resolve().parents[1]  # the checkout: conf/, experiments/, train.py
NOT_IN_RUN_NAMES = ("grid", "cache_dir", "ckpt_path")  # select the grid or say where files go: not an axis
MAX_NAME = 120


def command_line_sweeps(argv: list[str] | None = None) -> list[str] | None:
    """Keys swept on the command line (``seed=0,1`` → ``seed``), or None when it cannot be parsed."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # e.g. a remote launcher's own command line
        return None
    return sorted(o.key_or_group for o in parsed if o.is_sweep_override() and not o.is_hydra_override())


def run_name(task_overrides: Any, axes: Any = None, job_num: int = 0, argv: list[str] | None = None) -> str:
    """``k=v`` pairs of a job's overrides joined by commas: the grid's axes in their declared order, then the
    keys swept on the command line; every override but those in NOT_IN_RUN_NAMES when those are unknown."""
    overrides = OverridesParser.create().parse_overrides([str(o) for o in task_overrides or []])
    values = {o.key_or_group: o.get_value_element_as_str() for o in overrides}
    swept = command_line_sweeps(argv)
    if swept is None:
        keys = sorted(key for key in values if key not in NOT_IN_RUN_NAMES)
    else:
        declared = [str(key).lstrip("+~") for key in axes or {}]  # `++algo.lr: ...` sweeps the key algo.lr
        keys = declared + [key for key in swept if key not in declared]
    pairs = [f"{key}={values[key]}" for key in keys if key in values]
    name = ",".join(pairs).replace("/", "_") or f"job{job_num}"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 11]}~{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dibs.root"):
        OmegaConf.register_new_resolver("dibs.root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("dibs.run_name"):
        OmegaConf.register_new_resolver("dibs.run_name", run_name)
    if not OmegaConf.has_resolver("dibs.product"):  # FSDP2's data-parallel size: num_nodes x devices
        OmegaConf.register_new_resolver("dibs.product", lambda *factors: math.prod(int(f) for f in factors))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config's nested mappings → dotted keys (``algo.lr``); lists and empty mappings are leaf values."""
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}
