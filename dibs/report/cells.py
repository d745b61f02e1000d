"""Cell formatting and GitHub tables of the report (``dibs.report.markdown`` and its sections)."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

__all__ = ["UNIT_TITLES", "amount", "cost", "pct", "table"]

UNIT_TITLES = {"samples": "Samples", "tokens": "Tokens", "updates": "Updates", "wall_s": "Wall (s)"}


def _pm(s: dict[str, Any], fmt: str, scale: float = 1.0, sign: bool = False) -> str:
    if not s["n"]:
        return "–"
    spec = ("+" if sign else "") + fmt
    mean = format(scale * s["mean"], spec)
    return mean if s["std"] is None else f"{mean} ± {format(scale * s['std'], fmt)}"


def pct(s: dict[str, Any], sign: bool = False) -> str:
    return _pm(s, ".1f", 100.0, sign)


def cost(s: dict[str, Any], unit: str) -> str:
    return _pm(s, ",.1f" if unit == "wall_s" else ",.0f")


def amount(value: float, unit: str) -> str:
    return f"{value:,.1f}" if unit == "wall_s" else f"{value:,.0f}"


def table(header: list[str], rows: list[list[str]], align: str = "l") -> list[str]:
    """A GitHub (pipe) table, by tabulate; ``align`` gives l/r per column (labels left), the columns past it align
    right (numbers). Cells are text, formatted by the callers: nothing is re-parsed as a number."""

    def escape(cells: list[str]) -> list[str]:
        return [str(c).replace("|", "\\|") for c in cells]

    align = align.ljust(len(header), "r")
    text = tabulate(
        [escape(r) for r in rows],
        headers=escape(header),
        tablefmt="pipe",
        colalign=["left" if a == "l" else "right" for a in align],
        disable_numparse=True,
    )
    return text.splitlines()
