"""``python -m dibs.report GRID_DIR``: a Hydra multirun grid → report.md, report.json and accuracy-vs-cost PNGs
(overall against each cost, and per difficulty level against samples).

The report reads only what the training side already writes (resolved configs, Hydra overrides, TensorBoard
events), so there is no parallel log format to keep in sync. Refusals are ``ReportError``s; the CLI prints their
message and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from dibs.report.grid import ReportError, load_grid
from dibs.report.markdown import render
from dibs.report.metrics import compute
from dibs.report.plots import plot_all, plot_levels

__all__ = ["build_report", "main"]


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


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dibs.report",
        description="Turn a Hydra multirun grid folder into report.md (+ report.json and accuracy-vs-cost PNGs).",
    )
    parser.add_argument("grid_dir", help="the sweep folder (holding multirun.yaml), or a parent of several")
    parser.add_argument("--out", default=None, help="output folder (default: GRID_DIR/report)")
    parser.add_argument("--target", type=float, default=None, help="accuracy target in (0, 1] for the cost table")
    parser.add_argument("--baseline", default=None, help="configuration label of the speed-up baseline")
    parser.add_argument("--axes", default=None, help="comma-separated axis keys, replacing multirun.yaml's")
    parser.add_argument("--fractions", type=_floats, default=(0.25, 0.5, 0.75, 1.0), help="budget fractions")
    args = parser.parse_args(argv)
    try:
        report = build_report(
            args.grid_dir,
            out_dir=args.out,
            target=args.target,
            baseline=args.baseline,
            axes=args.axes.split(",") if args.axes is not None else None,
            fractions=args.fractions,
        )
    except ReportError as err:
        print(f"dibs.report: {err}", file=sys.stderr)
        return 2
    print(f"report written to {report}")
    return 0
