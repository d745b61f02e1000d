"""A run's evaluations and per-iteration E-step scalars from its logs, read once: its TensorBoard event files (with
TensorBoard's own reader) when it has some, else its CSV logger's metrics.csv (``logger=csv``); and the error type
of the report package, which every other module of it imports from here."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dibs.core.tags import ALLOC_TAGS, COST, COST_UNITS, ITERATION, ITERATION_TAGS, SAMPLING_TAGS, VAL_ACC, VAL_LEVEL

__all__ = [
    "ALLOC_TAGS",
    "SAMPLING_TAGS",
    "COST_UNITS",
    "ITERATION_TAGS",
    "Curve",
    "ReportError",
    "level_names",
    "natural_key",
    "read_curve",
]

# Logged once per EM iteration, all optional (dibs.core.tags): the E-step's training samples and acceptance, the
# pilot's cumulative samples, and (allocating strategies only) the allocation diagnostics.
_PER_ITERATION = frozenset((ITERATION, *ITERATION_TAGS, *ALLOC_TAGS, *SAMPLING_TAGS))
_LEVEL = re.compile(rf"^{re.escape(VAL_LEVEL)}(.+)$")
METRICS_CSV = "metrics.csv"  # a CSV logger's file (conf/logger/csv.yaml: <run_dir>/csv/metrics.csv)
Series = dict[str, dict[int, list[tuple[float, int, float]]]]  # tag -> step -> [(wall time, order, value)]


class ReportError(ValueError):
    """A grid the report refuses to summarise; the message names the file, run or key at fault."""


@dataclass
class Curve:
    """One run's evaluations, in step order: accuracy, per-level accuracy (NaN where absent) and cumulative costs;
    and its E-step scalars (those of ``ITERATION_TAGS`` and ``ALLOC_TAGS`` it logs), one entry per EM iteration in
    iteration order, NaN where an iteration lacks the scalar."""

    steps: np.ndarray
    acc: np.ndarray
    levels: dict[str, np.ndarray]
    cost: dict[str, np.ndarray]
    iterations: dict[str, np.ndarray] = field(default_factory=dict)


def natural_key(value: Any) -> tuple:
    """Sort numbers numerically before strings, so seeds 2 < 10."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    try:
        return (0, float(str(value)), "")
    except ValueError:
        return (1, 0.0, str(value))


def level_names(names: Iterable[str]) -> list[str]:
    """Distinct difficulty levels in report order (shorter names first, so "2" < "10"): columns, tables, subplots."""
    return sorted(set(names), key=lambda s: (len(s), s))


def read_curve(run_dir: Path) -> Curve:
    """The run's evaluations from every event file below ``run_dir`` (or, without any, from every CSV logger's
    ``metrics.csv`` below it): ``val/*`` joined with ``cost/*``; and, from the same read, its per-iteration E-step
    scalars (see ``_per_iteration``).

    Each evaluation logs ``val/*`` and ``cost/*`` together at the current optimiser step. A step can hold
    several evaluations: an iteration without any accepted sample makes no update, so the evaluation after
    it shares the step of the one before (and has spent more samples); within a step the k-th ``val/acc``
    pairs with the k-th ``cost/*`` in logging order. A run resumed from a checkpoint logs the re-run
    evaluation again at the same step and the same sample count: that repeat keeps the latest values.
    """
    files = sorted(run_dir.rglob("events.out.tfevents.*"))
    if files:
        series = _tensorboard_series(files)
    else:
        files = sorted(run_dir.rglob(METRICS_CSV))
        if not files:
            raise ReportError(
                f"run {run_dir}: no TensorBoard event files (events.out.tfevents.*) nor CSV logger file "
                f"({METRICS_CSV}) below it"
            )
        series = _csv_series(files)
    needed = [VAL_ACC, *(f"{COST}{unit}" for unit in COST_UNITS)]
    missing = [tag for tag in needed if tag not in series]
    if missing:
        raise ReportError(
            f"run {run_dir}: its logs ({', '.join(str(f.relative_to(run_dir)) for f in files)}) lack the "
            f"scalar(s) {', '.join(missing)}; the report needs {VAL_ACC} and {COST}{{{','.join(COST_UNITS)}}}"
        )
    for by_step in series.values():
        for entries in by_step.values():
            entries.sort()
    points: list[tuple[int, int]] = []  # (step, index of the evaluation within the step)
    for step in sorted(series[VAL_ACC]):
        for index in range(len(series[VAL_ACC][step])):
            for tag in needed[1:]:
                if len(series[tag].get(step, [])) <= index:
                    raise ReportError(f"run {run_dir}: scalar {tag} is missing at evaluation step {step}")
            same = points and points[-1][0] == step
            if same and series[f"{COST}samples"][step][index][2] == series[f"{COST}samples"][step][points[-1][1]][2]:
                points[-1] = (step, index)  # a resumed run's repeat of the same evaluation: the latest wins
            else:
                points.append((step, index))

    def column(tag: str) -> np.ndarray:
        by_step = series.get(tag, {})
        return np.array(
            [by_step[s][i][2] if len(by_step.get(s, [])) > i else math.nan for s, i in points], dtype=np.float64
        )

    levels = {m.group(1): column(tag) for tag in series if (m := _LEVEL.match(tag))}
    first = {unit: column(f"{COST}{unit}")[0] for unit in ("samples", "updates")}
    if any(v != 0 for v in first.values()):
        raise ReportError(
            f"run {run_dir}: its first evaluation is at {first['samples']:.0f} samples and {first['updates']:.0f} "
            "updates, not the initial policy π0 (0 and 0): its start is missing (eval.before_training=false, or a run "
            "resumed into a new folder?); the report needs each run's whole history"
        )
    return Curve(
        steps=np.array([s for s, _ in points], dtype=np.int64),
        acc=column(VAL_ACC),
        levels=dict(sorted(levels.items(), key=lambda kv: natural_key(kv[0]))),
        cost={unit: column(f"{COST}{unit}") for unit in COST_UNITS},
        iterations=_per_iteration(series),
    )


def _wanted(tag: str) -> bool:
    return tag.startswith(("val/", COST)) or tag in _PER_ITERATION


def _tensorboard_series(files: list[Path]) -> Series:
    """tag -> step -> [(wall time, logging order, value)] from the event files, folder by folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: Series = {}
    order = 0
    for folder in sorted({f.parent for f in files}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if not _wanted(tag):
                continue
            by_step = series.setdefault(tag, {})
            for event in acc.Scalars(tag):
                order += 1
                by_step.setdefault(event.step, []).append((event.wall_time, order, float(event.value)))
    return series


def _csv_series(files: list[Path]) -> Series:
    """The same from CSV loggers' files: one row per logging call (a ``step`` column, a column per scalar, empty
    where the call did not log it); rows carry no time, so the order is the file's."""
    series: Series = {}
    order = 0
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                order += 1
                try:
                    step = int(float(row["step"]))
                except (KeyError, TypeError, ValueError):
                    raise ReportError(f"{path}: a row without a step ({order}: {row})") from None
                for tag, value in row.items():
                    if tag != "step" and value not in (None, "") and _wanted(tag):
                        series.setdefault(tag, {}).setdefault(step, []).append((0.0, order, float(value)))
    return series


def _per_iteration(series: Series) -> dict[str, np.ndarray]:
    """The E-step scalars, one row per EM iteration, in (step, iteration number) order.

    Every E-step logs its scalars at the current optimiser step, so a step holds several iterations when some made
    no update; within a step the k-th value of a scalar belongs to the k-th ``iteration`` value (in logging order).
    A run resumed from a checkpoint logs the re-run iteration again at the same step with the same number: that
    repeat keeps the latest values. A run without the ``iteration`` scalar counts every value as its own iteration.
    """
    numbers = series.get(ITERATION, {})
    rows: dict[tuple[int, int, float], dict[str, float]] = {}
    for tag in (*ITERATION_TAGS, *ALLOC_TAGS, *SAMPLING_TAGS):
        for step, entries in series.get(tag, {}).items():
            known = numbers.get(step, [])
            for index, (_, _, value) in enumerate(entries):  # in logging order: a repeat overwrites the earlier one
                key = (step, 0, known[index][2]) if index < len(known) else (step, 1, float(index))
                rows.setdefault(key, {})[tag] = value
    keys = sorted(rows)
    return {
        tag: np.array([rows[k].get(tag, math.nan) for k in keys], dtype=np.float64)
        for tag in (*ITERATION_TAGS, *ALLOC_TAGS, *SAMPLING_TAGS)
        if tag in series
    }
