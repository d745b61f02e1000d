"""``dibs-report sweep=GRID_DIR`` (``python -m dibs.report``): a Hydra multirun grid → report.md, report.json and
accuracy-vs-cost PNGs (overall against each cost, and per difficulty level against samples).

A Hydra app like training and evaluation, on its own primary config ``conf/report.yaml`` (``sweep``, ``out``,
``target``, ``baseline``, ``axes``, ``fractions``; ``--help`` shows each with its comment), which leaves no run
folder or log file of Hydra's own behind.

The report reads only what the training side already writes (resolved configs, Hydra overrides, TensorBoard
events), so there is no parallel log format to keep in sync. Refusals are ``ReportError``s; the command prints
their message and exits 2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from dibs.conf import register_resolvers
from dibs.report.grid import ReportError, load_grid
from dibs.report.markdown import render
from dibs.report.metrics import compute
from dibs.report.plots import plot_all, plot_levels

__all__ = ["build_report", "main", "report_from_config"]
register_resolvers()  # dibs.help, behind --help


def build_report(
    grid_dir: str | Path,
    out_dir: str | Path | None = None,
    target: float | None = None,
    baseline: str | None = None,
    axes: list[str] | None = None,
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
) -> Path:
    """Write ``report.md``, ``report.json`` and the PNGs (four, plus one per-level one when the runs log levels) to
    ``out_dir`` (default ``<grid_dir>/report``).

    ``target`` (an accuracy in (0, 1]) and ``baseline`` (a configuration label) override the runs' ``grid.target``
    and ``grid.baseline``; ``axes`` replaces the axes declared by the multirun.yaml files. Returns report.md's path.
    """
    grid = load_grid(grid_dir, axes=axes)
    data = compute(grid, target=target, baseline=baseline, fractions=tuple(fractions))
    out = Path(out_dir) if out_dir is not None else Path(grid_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = plot_all(grid, out, data["target"]["value"], data["budget"]["unit"], data["budget"]["amount"])
    data["plots"] = {unit: path.name for unit, path in files.items()}
    by_level = plot_levels(grid, out, data["budget"]["unit"], data["budget"]["amount"])
    data["per_level"]["plot"] = by_level.name if by_level is not None else None
    (out / "report.json").write_text(json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n")
    report = out / "report.md"
    report.write_text(render(grid, data, data["plots"]))
    return report


def _json_safe(value: Any) -> Any:
    """NaN/inf → null and non-JSON scalars → str, so report.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def report_from_config(cfg: DictConfig) -> Path:
    """The report a ``conf/report.yaml`` config asks for; every key is checked here, each refusal a ``ReportError``
    naming it."""
    if OmegaConf.is_missing(cfg, "sweep") or cfg.sweep is None:
        raise ReportError(
            "sweep=<the grid's folder> is required, e.g. `dibs-report sweep=multirun/raft_vs_raftpp/<time>` (the "
            "folder `python train.py -m ...` wrote, holding multirun.yaml); --help lists the other keys"
        )
    sweep = Path(str(cfg.sweep)).expanduser()
    if not sweep.is_dir():
        raise ReportError(f"sweep={cfg.sweep}: no such folder (the grid's folder, e.g. multirun/<grid>/<time>)")
    target = cfg.target
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))):
        raise ReportError(f"target={target!r}: an accuracy in (0, 1], e.g. target=0.15, or null")
    fractions = _listed(cfg.fractions, "fractions")
    if not fractions or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fractions):
        raise ReportError(f"fractions={fractions}: a list of budget fractions in (0, 1], e.g. fractions=[0.5,1]")
    axes = _listed(cfg.axes, "axes") if cfg.axes is not None else None
    return build_report(
        sweep,
        out_dir=Path(str(cfg.out)).expanduser(),
        target=target,
        baseline=str(cfg.baseline) if cfg.baseline is not None else None,
        axes=[str(a) for a in axes] if axes is not None else None,
        fractions=tuple(float(f) for f in fractions),
    )


def _listed(value: Any, key: str) -> list[Any]:
    """A list key given as a list (``axes=[algo,seed]``) or as one value (``axes=algo``)."""
    if isinstance(value, ListConfig):
        return list(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, (str, int, float)):
        return [value]
    raise ReportError(f"{key}={value}: expected a list, e.g. {key}=[...]")


@hydra.main(config_path="pkg://dibs.configs", config_name="report", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    try:
        report = report_from_config(cfg)
    except ReportError as err:
        print(f"dibs-report: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"report written to {report}")


def main() -> None:
    """The console script ``dibs-report`` and ``python -m dibs.report``: Hydra parses the command line
    (``sweep=<grid folder>`` and the keys of ``conf/report.yaml``; ``--help`` lists them)."""
    _main()
