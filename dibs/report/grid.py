"""Read a Hydra multirun grid: its runs, declared axes and configurations (curves: ``dibs.report.events``).

A run folder holds ``resolved_config.yaml``, ``.hydra/overrides.yaml`` and TensorBoard event files below it; the
sweep folder's ``multirun.yaml`` declares the axes (``hydra.sweeper.params`` plus command-line sweeps). Everything
the report compares must differ only along those axes, so the loader refuses, with a ``ReportError`` naming the
file, run or key at fault, any grid whose runs differ elsewhere, repeat an axis point, or lack the scalars.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dibs.conf import flatten
from dibs.report.events import COST_UNITS, Curve, ReportError, natural_key, read_curve

__all__ = [
    "COST_UNITS",
    "SEED_AXIS",
    "Curve",
    "Grid",
    "ReportError",
    "Run",
    "format_value",
    "load_grid",
    "normalise_key",
    "read_curve",
]

SEED_AXIS = "seed"
RUN_FILE = "resolved_config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
MULTIRUN_FILE = "multirun.yaml"
PER_RUN_KEYS = ("run_dir", "ckpt_path")  # differ between runs by nature
SWEEP_DESCRIPTION = "grid.axes"  # the value lists of the sweep; a second launch may extend them
_ABSENT = "<absent>"


@dataclass
class Run:
    path: Path
    name: str  # the folder relative to the grid folder
    config: dict[str, Any]
    flat: dict[str, Any]
    axis_values: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    seed: Any = None
    curve: Curve | None = None


@dataclass
class Grid:
    root: Path
    name: str
    axes: list[str]
    axes_source: str
    declared_values: dict[str, list[str]]  # formatted values per axis, in declaration order
    multiruns: list[Path]
    commands: list[str]
    runs: list[Run]
    configurations: list[str]
    by_config: dict[str, list[Run]]
    preset_keys: dict[str, list[str]] = field(default_factory=dict)  # keys a preset axis (experiment=) sets

    @property
    def seeds(self) -> list[Any]:
        return sorted({run.seed for run in self.runs}, key=natural_key)


# ---- small helpers ---------------------------------------------------------------------------------------------
def normalise_key(key: str) -> str:
    """``+grid`` / ``++x`` / ``~x`` → the bare key the override addresses."""
    return key.strip().lstrip("+~")


def format_value(value: Any) -> str:
    """The string a label shows for an axis value, the same whether it came from an override or the config."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _parse_overrides(lines: list[str], where: Path) -> list[Any]:
    try:
        return _parser().parse_overrides([str(line) for line in lines])
    except Exception as err:  # hydra's OverrideParseException and friends
        raise ReportError(f"{where}: cannot parse the overrides {lines}: {err}") from err


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:
        raise ReportError(f"{path}: not readable as YAML: {err}") from err


# ---- discovery ---------------------------------------------------------------------------------------------------
def find_runs(root: Path) -> tuple[list[Path], list[Path]]:
    """Run folders (holding a resolved_config.yaml; runs do not nest, so their insides are not searched) and
    multirun.yaml files under ``root``, itself included."""
    runs: list[Path] = []
    multiruns: list[Path] = []

    def walk(folder: Path) -> None:
        if (folder / RUN_FILE).is_file():
            runs.append(folder)
            return
        if (folder / MULTIRUN_FILE).is_file():
            multiruns.append(folder / MULTIRUN_FILE)
        for child in sorted(p for p in folder.iterdir() if p.is_dir()):
            walk(child)

    walk(root)
    return runs, multiruns


def _declared_axes(
    multiruns: list[Path],
) -> tuple[list[str], dict[str, list[str]], list[tuple[list[str], dict[str, list[str]]]]]:
    """Axes (in declaration order), their declared values, and each sweep's command-line overrides with the
    values its grid config sweeps (``hydra.sweeper.params``), for the reproduce command."""
    axes: list[str] = []
    values: dict[str, list[str]] = {}
    launches: list[tuple[list[str], dict[str, list[str]]]] = []

    def declare(key: str, items: list[Any]) -> None:
        key = normalise_key(key)
        if key not in axes:
            axes.append(key)
        known = values.setdefault(key, [])
        known.extend(v for v in (format_value(x) for x in items) if v not in known)

    for path in multiruns:
        try:
            cfg = OmegaConf.load(path)
            params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
            params = OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else params
            task = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
            task = OmegaConf.to_container(task, resolve=False) if OmegaConf.is_config(task) else task
        except Exception as err:
            raise ReportError(f"{path}: cannot read hydra.sweeper.params / hydra.overrides.task: {err}") from err
        if params is not None and not isinstance(params, dict):
            raise ReportError(f"{path}: hydra.sweeper.params is not a mapping of key -> values: {params!r}")
        task = [str(t) for t in task or []]
        # a command-line sweep of a key replaces the grid's values for it (Hydra's rule), so its order wins
        swept = {normalise_key(o.key_or_group): o for o in _parse_overrides(task, path) if o.is_sweep_override()}
        own: dict[str, list[str]] = {}
        for key, spec in (params or {}).items():
            (override,) = _parse_overrides([f"{key}={spec}"], path)
            own[normalise_key(key)] = [format_value(v) for v in _sweep_values(override)]
            declare(key, _sweep_values(swept.pop(normalise_key(key), override)))
        for key, override in swept.items():
            declare(key, _sweep_values(override))
        launches.append((task, own))
    return axes, values, launches


def _reproduce(task: list[str], own: dict[str, list[str]], axes: list[str], runs: list[Run]) -> str:
    """The command that re-creates ``runs``: the launch's overrides with every axis set to the values the runs
    hold. A folder completed by several launches keeps only the last one's overrides in multirun.yaml (e.g.
    ``seed=3``), so those alone would reproduce a part of it. An axis holding its grid config's values is left to
    the grid config."""
    held = {a: list(dict.fromkeys(format_value(r.axis_values[a]) for r in runs)) for a in axes}
    tokens, done = [], set()
    for token in task:
        raw = token.split("=", 1)[0]
        key = normalise_key(raw)
        if key in held:
            done.add(key)
            if set(held[key]) != set(own.get(key, [])):
                tokens.append(f"{raw}={','.join(held[key])}")
        else:
            tokens.append(token)
    tokens += [f"{a}={','.join(v)}" for a, v in held.items() if a not in done and set(v) != set(own.get(a, []))]
    return " ".join(["python train.py -m", *(shlex.quote(t) for t in tokens)])


def _sweep_values(override: Any) -> list[Any]:
    if not override.is_sweep_override():
        return [override.value()]
    try:
        return list(override.sweep_iterator())
    except Exception:  # an interval sweep has no finite list: no declared order
        return []


# ---- the grid ----------------------------------------------------------------------------------------------------
def _comparable(run: Run) -> dict[str, Any]:
    """The run's flat config with per-run keys dropped and its own run_dir written as ``${run_dir}``."""
    run_dir = run.flat.get("run_dir")
    out = {}
    for key, value in run.flat.items():
        if key in PER_RUN_KEYS or key == SWEEP_DESCRIPTION or key.startswith(SWEEP_DESCRIPTION + "."):
            continue
        if isinstance(run_dir, str) and run_dir and isinstance(value, str) and value.startswith(run_dir):
            value = "${run_dir}" + value[len(run_dir) :]  # e.g. logger.save_dir, resolved from run_dir
        out[key] = value
    return out


def _check_equal_settings(runs: list[Run], axes: list[str]) -> dict[str, list[str]]:
    """Refuse runs that differ in a setting no axis explains. An axis that is no key of the configs (a preset
    group of the global package, e.g. ``experiment``) explains the keys that differ between its values but are
    constant within each configuration; returns those keys per such axis, for the report to list."""
    flats = [_comparable(run) for run in runs]
    keys = sorted({key for flat in flats for key in flat})
    presets = [
        a for a in axes if a != SEED_AXIS and not any(k == a or k.startswith(a + ".") for flat in flats for k in flat)
    ]
    configs = [tuple(format_value(run.axis_values[a]) for a in axes if a != SEED_AXIS) for run in runs]
    unexplained, by_preset = [], {a: [] for a in presets}
    for key in keys:
        values = [flat.get(key, _ABSENT) for flat in flats]
        other = next((i for i, v in enumerate(values) if v != values[0]), None)
        if other is None or any(key == axis or key.startswith(axis + ".") for axis in axes):
            continue
        within = {}
        constant = all(within.setdefault(c, v) == v for c, v in zip(configs, values))
        if presets and constant:
            for axis in presets:
                by_preset[axis].append(key)
            continue
        unexplained.append(f"'{key}': {runs[0].name} has {values[0]!r}, {runs[other].name} has {values[other]!r}")
    if unexplained:
        more = f"\n  ... and {len(unexplained) - 5} more" if len(unexplained) > 5 else ""
        shown = "\n  ".join(unexplained[:5]) + more
        raise ReportError(
            f"the runs differ in settings that are not declared axes (axes: {', '.join(axes) or 'none'}):\n  {shown}\n"
            "Either add the key as an axis (axes=[...], or sweep it in the grid) or report those runs separately."
        )
    return by_preset


def _axis_values(run: Run, axes: list[str]) -> dict[str, Any]:
    path = run.path / OVERRIDES_FILE
    overrides = _load_yaml(path) if path.is_file() else []
    if not isinstance(overrides, list):
        raise ReportError(f"{path}: expected a YAML list of override strings, got {type(overrides).__name__}")
    given = {}
    for override in _parse_overrides(overrides, path):
        if override.is_sweep_override():
            raise ReportError(f"{path}: a run's override cannot be a sweep: {override.input_line}")
        given[normalise_key(override.key_or_group)] = override.value()
    values = {}
    for axis in axes:
        if axis in given:
            values[axis] = given[axis]
        elif axis in run.flat and not isinstance(run.flat[axis], (dict, list)):
            values[axis] = run.flat[axis]
        else:
            raise ReportError(
                f"run {run.path}: axis '{axis}' is neither in {OVERRIDES_FILE} nor a scalar in {RUN_FILE}"
            )
    return values


def _order_key(values: dict[str, Any], axes: list[str], declared: dict[str, list[str]]) -> tuple:
    key = []
    for axis in axes:
        text = format_value(values[axis])
        known = declared.get(axis, [])
        key.append((0, known.index(text), (0, 0.0, "")) if text in known else (1, 0, natural_key(values[axis])))
    return tuple(key)


def load_grid(grid_dir: str | Path, axes: list[str] | None = None) -> Grid:
    """Find, check and read every run below ``grid_dir``; ``axes`` replaces the detection from multirun.yaml."""
    root = Path(grid_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: not a folder")
    run_dirs, multiruns = find_runs(root)
    if not run_dirs:
        raise ReportError(
            f"{root}: no runs found; a run folder holds {RUN_FILE}, {OVERRIDES_FILE} and TensorBoard event files "
            "(the layout `python train.py -m ...` writes)"
        )
    detected, declared, launches = _declared_axes(multiruns)
    if axes is not None:
        axes, source = [normalise_key(a) for a in axes if a.strip()], "axes="
    elif multiruns:
        axes, source = detected, ", ".join(str(p.relative_to(root)) for p in multiruns)
    else:
        raise ReportError(
            f"{root}: the axes cannot be determined: no {MULTIRUN_FILE} below it; give them with axes=[k1,k2]"
        )

    runs = []
    for path in run_dirs:
        config = _load_yaml(path / RUN_FILE)
        if not isinstance(config, dict):
            raise ReportError(f"{path / RUN_FILE}: expected a mapping, got {type(config).__name__}")
        name = str(path.relative_to(root)) if path != root else path.name
        runs.append(Run(path=path, name=name, config=config, flat=flatten(config)))
    for run in runs:
        run.axis_values = _axis_values(run, axes)
    preset_keys = _check_equal_settings(runs, axes)

    config_axes = [a for a in axes if a != SEED_AXIS]
    seen: dict[tuple[str, ...], Run] = {}
    for run in runs:
        point = tuple(format_value(run.axis_values[a]) for a in axes)
        if point in seen:
            raise ReportError(
                f"runs {seen[point].path} and {run.path} have the same axis values "
                f"({', '.join(f'{a}={v}' for a, v in zip(axes, point)) or 'no axes'}): duplicates; "
                "remove one, or declare the axis that tells them apart"
            )
        seen[point] = run
        run.label = ", ".join(f"{a}={format_value(run.axis_values[a])}" for a in config_axes) or "all runs"
        run.seed = run.axis_values[SEED_AXIS] if SEED_AXIS in axes else run.flat.get(SEED_AXIS)

    for run in runs:
        run.curve = read_curve(run.path)

    ordered = sorted(runs, key=lambda r: (_order_key(r.axis_values, config_axes, declared), natural_key(r.seed)))
    by_config: dict[str, list[Run]] = {}
    for run in ordered:
        by_config.setdefault(run.label, []).append(run)
    grid_cfg = runs[0].config.get("grid") if isinstance(runs[0].config.get("grid"), dict) else {}
    return Grid(
        root=root,
        name=str(grid_cfg.get("name") or root.resolve().name),
        axes=axes,
        axes_source=source,
        declared_values=declared,
        multiruns=multiruns,
        commands=[
            _reproduce(task, own, axes, [r for r in ordered if r.path.is_relative_to(path.parent)])
            for (task, own), path in zip(launches, multiruns)
        ],
        runs=ordered,
        configurations=list(by_config),
        by_config=by_config,
        preset_keys=preset_keys,
    )
