"""``--help`` of the Hydra apps (``dibs-train``, ``dibs-eval``, ``dibs-report``), written from the configs themselves.

The YAML comments are the documentation of every key (``conf/config.yaml`` comments each one), so the help reads
them rather than repeating them: each config group with its options and the first sentence of each option file's
header comment, then each key with its value and its comment. Hydra renders the help from ``hydra.help.template``
(``conf/hydra/help/dibs.yaml``), whose ``${dibs.help:<app>}`` calls :func:`hydra_help`; the values shown are the
composed config's, so ``dibs-train experiment=smoke --help`` shows the smoke preset's. The configs are read from
the installed packages (``dibs.configs``, ``dibs.experiments``), never from a checkout path.

ruamel.yaml's round trip gives every key's line and its end-of-line comment; the comment lines around a key
(continuations aligned under that comment, the block just above a mapping) are the text's own lines, matched by
indentation, because ruamel attaches those to whichever node precedes them. Imported only when help is asked for.
"""

from __future__ import annotations

import io
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

__all__ = ["APPS", "Key", "describe", "documented_keys", "group_options", "hydra_help", "render"]

PACKAGES = ("dibs.configs", "dibs.experiments")  # Hydra's search path: the configs, then the grids' own groups
HIDDEN = ("defaults", "hydra")  # keys of a primary config that are no settings of the app
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`*])")


@dataclass(frozen=True)
class App:
    """What one entry point's help shows."""

    command: str  # how a checkout calls it
    script: str  # the installed console script
    config: str  # its primary config in dibs.configs
    about: str
    usage: tuple[tuple[str, str], ...]  # (arguments, what they do)
    block: str | None = None  # show only this block's keys (None: every key but those in `hide`)
    hide: tuple[str, ...] = ()
    groups: tuple[str, ...] | None = None  # config groups listed (None: all; (): none)
    notes: tuple[str, ...] = ()


APPS = {
    "train": App(
        command="python train.py",
        script="dibs-train",
        config="config.yaml",
        about=(
            "Train a chain-of-thought reasoner by rejection sampling or RL (RAFT, RAFT++, GRPO, Dr.GRPO) under a "
            "sample budget, one EM iteration at a time: an E-step samples and verifies completions, an M-step "
            "updates the policy (Lightning). Every setting below is a Hydra override, key=value or group=option."
        ),
        usage=(
            ("", "the embedded default: RAFT++ on synthetic arithmetic, a tiny Qwen2, CPU (a few minutes)"),
            ("algo=grpo allocation=gvm seed=1", "choose a group's option (group=option) and set keys (key=value)"),
            ("experiment=smoke", "a preset (conf/experiment): end to end in about a minute"),
            ("-m seed=0,1,2 algo=raft,raftpp", "a sweep: one run per combination of the values"),
            ("-m +grid=raft_vs_raftpp", "a grid of experiments/grid (axes, seeds, budget); then dibs-report sweep=..."),
            ("-m hydra/launcher=joblib seed=0,1", "a sweep's runs side by side on this machine (docs/sweeps.md)"),
            ("ckpt_path=last hydra.run.dir=<run>", "resume a run from its last checkpoint (also a re-launched sweep)"),
            ("algo=grpo --cfg job -p algo", "print the composed config (-p: one group's keys) without running"),
            ("experiment=smoke --help", "this help with the values the overrides give"),
        ),
        hide=("evaluate",),
        notes=("evaluate.*: the standalone evaluation's keys, see `python -m dibs.evaluate --help`.",),
    ),
    "evaluate": App(
        command="python -m dibs.evaluate",
        script="dibs-eval",
        config="config.yaml",
        about=(
            "Evaluate a Hugging Face checkpoint folder as the training loop does (Average@k, pass@k, maj@k per "
            "benchmark and level) and write eval.json and eval.md. The config is the training config: every "
            "override of `python train.py` applies, with the same defaults (template, eval, benchmarks, rollout)."
        ),
        usage=(
            ("evaluate.checkpoint=<run>/hf/iter_012", "a folder a run exported: the loop's own samples and numbers"),
            (
                "evaluate.checkpoint=/models/Qwen2.5-Math-1.5B eval=paper benchmarks.dir=/data/benchmarks",
                "any model folder, the paper's protocol",
            ),
            ("evaluate.checkpoint=<folder> evaluate.device=cpu", "on the CPU"),
        ),
        block="evaluate",
        groups=("template", "reward", "data", "model", "rollout", "eval", "benchmarks"),
    ),
    "report": App(
        command="python -m dibs.report",
        script="dibs-report",
        config="report.yaml",
        about=(
            "Turn a finished grid (the folder of `python train.py -m ...`) into report.md, report.json and "
            "accuracy-vs-cost plots: final metrics, accuracy at fractions of the budget, the cost to reach a "
            "target and the speed-up over a baseline, E-step diagnostics. Writes nothing else."
        ),
        usage=(
            ("sweep=multirun/raft_vs_raftpp/<time>", "report.md, report.json and the PNGs in <sweep>/report"),
            ("sweep=<folder> out=reports/mine target=0.15", "elsewhere, with a fixed accuracy target"),
            ("sweep=<folder> \"baseline='algo=raft'\"", "a baseline label (quoted: it holds '=')"),
            ("sweep=<folder> axes=[algo,seed] fractions=[0.5,1]", "lists in brackets"),
        ),
        groups=(),
    ),
}


@dataclass(frozen=True)
class Key:
    """One documented key of a config file."""

    name: str  # dotted, as an override names it (checkpoint.keep)
    value: Any  # the file's value (a mapping's is its keys)
    doc: str  # its comment, lines joined
    block: bool  # a mapping: its keys follow it


# ---- reading the comments ----------------------------------------------------------------------------------------
def _load(text: str) -> Any:
    from ruamel.yaml import YAML

    return YAML(typ="rt").load(text)


def _comment_line(line: str) -> tuple[int, str] | None:
    """(its column, its text) for a line holding only a comment."""
    stripped = line.lstrip()
    if not stripped.startswith("#"):
        return None
    return len(line) - len(stripped), stripped[1:].strip()


def _key_doc(mapping: Any, key: str, lines: list[str]) -> str:
    """The key's end-of-line comment with the lines aligned under it (its continuation); for a block, or a key
    without one, first the comment block just above it at its own indentation (not the file's header)."""
    row, col = mapping.lc.key(key)
    above: list[str] = []
    for line in reversed(lines[:row]):
        found = _comment_line(line)
        if found is None or found[0] != col or found[1].startswith("@package"):
            break
        above.insert(0, found[1])
    if all(not line.strip() or _comment_line(line) for line in lines[: row - len(above)]):
        above = []  # the file's own header, not the first key's
    entry = mapping.ca.items.get(key) or []
    token = entry[2] if len(entry) > 2 else None
    after = []
    if token is not None and token.value.startswith("#") and token.start_mark.line == row:
        after.append(token.value.split("\n", 1)[0][1:].strip())
        for line in lines[row + 1 :]:
            found = _comment_line(line)
            if found is None or found[0] != token.column:
                break
            after.append(found[1])
    return " ".join(after if after and not isinstance(mapping[key], dict) else above + after)


def documented_keys(text: str, block: str | None = None, hide: tuple[str, ...] = ()) -> list[Key]:
    """Every key of a config file (or of its ``block``), depth first, with its comment."""
    data, lines = _load(text), text.splitlines()

    def walk(mapping: Any, prefix: str) -> Iterator[Key]:
        for key, value in mapping.items():
            if not prefix and key in (*HIDDEN, *hide):
                continue
            is_block = hasattr(value, "lc") and isinstance(value, dict)
            yield Key(prefix + str(key), value, _key_doc(mapping, key, lines), is_block)
            if is_block:
                yield from walk(value, f"{prefix}{key}.")

    if block is None:
        return list(walk(data, ""))
    return [Key(block, data[block], _key_doc(data, block, lines), True), *walk(data[block], f"{block}.")]


def describe(text: str) -> str:
    """A config file's description: the first sentence of its first comment block at column 0 (Hydra's
    ``@package`` directive and the comments inside a defaults list skipped)."""
    block: list[str] = []
    for line in text.splitlines():
        found = _comment_line(line)
        example = line.startswith("#  ")  # an indented example (`#   python train.py ...`) ends the prose
        if found is not None and found[0] == 0 and not found[1].startswith("@package") and not example:
            block.append(found[1])
        elif block:
            break
    return SENTENCE_END.split(" ".join(block), maxsplit=1)[0]


def _defaults(text: str) -> dict[str, str | None]:
    """A primary config's defaults list: group -> its default option (the groups in order)."""
    chosen: dict[str, str | None] = {}
    for entry in _load(text).get("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                chosen[str(group).removeprefix("override ").lstrip("/")] = option
    return chosen


def group_options(groups: tuple[str, ...] | None = None) -> dict[str, dict[str, str]]:
    """group -> option -> description, from every package of the search path (the first one's file wins);
    ``groups`` picks some, in that order (None: all but Hydra's own)."""
    found: dict[str, dict[str, str]] = {}
    for package in PACKAGES:
        for folder in sorted(files(package).iterdir(), key=lambda p: p.name):
            if not folder.is_dir() or folder.name in ("hydra", "__pycache__"):
                continue
            options = found.setdefault(folder.name, {})
            for item in sorted(folder.iterdir(), key=lambda p: p.name):
                if item.name.endswith(".yaml") and item.name[:-5] not in options:
                    options[item.name[:-5]] = describe(item.read_text(encoding="utf-8"))
    if groups is None:
        return {g: dict(sorted(o.items())) for g, o in found.items() if o}
    return {g: dict(sorted(found[g].items())) for g in groups if found.get(g)}


# ---- rendering ---------------------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    """A value as an override would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return ""
    return str(value)


def _lookup(tree: Any, dotted: str, default: Any) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _command(app: App) -> str:
    """The command as the user typed it: the console script when that is what runs, else the checkout's."""
    invoked = sys.argv[0].rsplit("/", 1)[-1] if sys.argv else ""
    return app.script if invoked == app.script else app.command


def render(app_name: str, root: DictConfig | None = None, width: int | None = None) -> str:
    """The help text of ``app_name`` (a key of APPS; anything else: train's); ``root`` is the composed config, whose
    values and chosen options are shown (None: the files' defaults)."""
    app = APPS.get(app_name, APPS["train"])
    text = files("dibs.configs").joinpath(app.config).read_text(encoding="utf-8")
    composed = OmegaConf.to_container(root, resolve=False) if root is not None else None
    width = width or max(80, min(shutil.get_terminal_size((120, 40)).columns, 140))
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False, emoji=False)
    command = _command(app)
    console.print(Text(f"{command}: {app.about}"))
    _usage(console, command, app, width)
    choices = dict(_defaults(text))
    choices.update(_lookup(composed, "hydra.runtime.choices", {}) or {})
    options = group_options(app.groups)
    if options:
        console.print(Text("\nConfig groups (group=option; * the one in use; +group=option for those without one):"))
        console.print(_table(_group_rows(options, choices), width, wrap_last=False))
    console.print(Text("\nKeys (key=value; the value in use, then what it does):"))
    rows = [
        (f"  {key.name}" + (".*" if key.block else ""), _show(_lookup(composed, key.name, key.value)), key.doc)
        for key in documented_keys(text, app.block, app.hide)
    ]
    console.print(_table(rows, width, widest=28))
    for note in app.notes:
        console.print(Text(f"\n{note}"))
    console.print(Text("\nHydra's own flags (--cfg, --info, --multirun, ...): --hydra-help."))
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def _usage(console: Console, command: str, app: App, width: int) -> None:
    """The examples beside their explanations, or each above its own when they are too long for a column."""
    console.print(Text("\nUsage:"))
    usage = [(f"  {command} {args}".rstrip(), what) for args, what in app.usage]
    if max(len(line) for line, _ in usage) <= width // 2:
        console.print(_table(usage, width, widest=width // 2))
        return
    for line, what in usage:
        console.print(Text(line))
        console.print(Padding(Text(what), (0, 0, 0, 6)))


def _group_rows(options: dict[str, dict[str, str]], choices: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(group, option, description) rows: the defaults list's groups in its order, then those it does not name
    (selected with ``+group=``); the option in use marked."""
    named = list(choices)
    order = sorted(options, key=lambda g: (g not in choices, named.index(g) if g in choices else 0))
    return [
        (
            (f"  {g}" if g in choices else f"  +{g}") if i == 0 else "",
            f"{'*' if choices.get(g) == option else ' '} {option}",
            about,
        )
        for g in order
        for i, (option, about) in enumerate(options[g].items())
    ]


def _table(rows: list[tuple[str, ...]], width: int, wrap_last: bool = True, widest: int = 40) -> Table:
    """Borderless columns as wide as their cells (at most ``widest``), the last one taking the rest of ``width``:
    wrapped, or cut to one line with an ellipsis."""
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    sizes = [min(max(len(cell) for cell in column), widest) for column in list(zip(*rows))[:-1]]
    for size in sizes:
        table.add_column(width=size, overflow="fold")
    rest = max(width - sum(sizes) - 2 * len(sizes), 20)
    table.add_column(width=rest, overflow="fold" if wrap_last else "ellipsis", no_wrap=not wrap_last)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def hydra_help(app_name: str, *, _root_: DictConfig) -> str:
    """The ``dibs.help`` resolver behind ``hydra.help.template``: the text with ``$`` doubled, since Hydra passes the
    template through ``string.Template`` (its ``$CONFIG`` and friends) after resolving it."""
    return render(app_name, _root_).replace("$", "$$")
