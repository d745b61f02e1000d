"""Hydra glue shared by train.py and the tests.

- ``dibs.root``: the checkout (the search path of older runs' saved Hydra configs names it; the grids now ship as
  ``pkg://dibs.experiments``).
- ``dibs.help``: the text of ``--help`` (``conf/hydra/help/dibs.yaml``), written by ``dibs.help`` from the configs'
  comments.
- ``dibs.product``: the product of its arguments (FSDP2's data-parallel size, ``num_nodes`` x ``devices``).
- ``dibs.run_name``: the folder name of a run, from Hydra's ``override_dirname`` (``algo=raft,seed=0``; the
  keys in ``NOT_IN_RUN_NAMES`` are left out by ``hydra.job.config.override_dirname.exclude_keys``), so single
  runs (``outputs/<name>/<time>``), a multirun's runs (``multirun/<time>/<name>``) and their TensorBoard run names
  say what each run is. Names too long for a file name are shortened with a hash.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["ROOT", "NOT_IN_RUN_NAMES", "flatten", "register_resolvers", "run_name"]

ROOT = Path(__file__).resolve().parents[1]  # the checkout: conf/, experiments/, train.py
# not what a run is (conf/config.yaml's exclude_keys): the grid, where files go, threads, what the console shows,
# how it checkpoints, exports and logs (all of which a resume may change: its folder keeps its name)
NOT_IN_RUN_NAMES = (
    "grid",
    "cache_dir",
    "ckpt_path",
    "threads",
    "evaluate.out_dir",
    "evaluate.checkpoint",
    "trainer.enable_progress_bar",
    "rollout.generator.show_progress",
    "checkpoint.every_updates",
    "checkpoint.keep",
    "checkpoint.trust",
    "export.every",
    "export.keep_last",
    "logger",
)
MAX_NAME = 160


def run_name(override_dirname: str, job_num: int = 0) -> str:
    """A run folder's name from Hydra's ``hydra.job.override_dirname`` (``algo=grpo,allocation=gvm,seed=1``: the
    run's overrides, sorted, without those in ``NOT_IN_RUN_NAMES``), made a safe file name: ``/`` becomes ``_``,
    a run without overrides is ``default`` (``job<N>`` in a multirun), and a name too long for a file system is
    shortened with a hash of the whole."""
    name = str(override_dirname or "").replace("/", "_") or (f"job{job_num}" if job_num else "default")
    if len(name) > MAX_NAME:  # the head and the tail stay readable (a sweep's seed=... sorts last); a hash between
        tail = MAX_NAME // 3
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME - tail - 12]}~{digest}~{name[-tail:]}"
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dibs.root"):
        OmegaConf.register_new_resolver("dibs.root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("dibs.run_name"):
        OmegaConf.register_new_resolver("dibs.run_name", run_name)
    if not OmegaConf.has_resolver("dibs.product"):  # FSDP2's data-parallel size: num_nodes x devices
        OmegaConf.register_new_resolver("dibs.product", lambda *factors: math.prod(int(f) for f in factors))
    if not OmegaConf.has_resolver("dibs.help"):  # --help, from the configs' comments (conf/hydra/help/dibs.yaml)
        OmegaConf.register_new_resolver("dibs.help", _help)


def _help(app: str, *, _root_: Any) -> str:
    from dibs.help import hydra_help  # rich and ruamel.yaml: only when help is asked for

    return hydra_help(app, _root_=_root_)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config's nested mappings → dotted keys (``algo.lr``); lists and empty mappings are leaf values.

    The one flattening of the kit: the hyper-parameters train.py gives its loggers, the settings a resumed run
    must share with its folder's run, and the settings a grid report compares. No library does this: pandas'
    ``json_normalize`` builds a DataFrame and drops empty mappings, Lightning's ``_flatten_dict`` is private,
    splits lists of mappings and joins with ``/``."""
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}
