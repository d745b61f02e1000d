"""Problem records and a strict JSONL loader for prompt pools and benchmarks.

A `Problem` is the one record every part of dibs exchanges: question text (no template applied), gold answer
as a string, an optional difficulty label for per-level metrics and an optional worked solution (SFT target).

`load_problems` reads one JSON object per line. Real benchmark files disagree on types (MATH500 has integer
levels, AMC23 float answers such as 27.0, OlympiadBench lists of answers and of alternative solutions), so the
loader normalises those few shapes and rejects everything else with a message that names the file, the
1-based line and the field: a silently dropped or mangled gold answer would read as a low score, not an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BAD_ROW_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer; `uid` is stable across runs (e.g. "synth-train-000123")."""

    uid: str
    problem: str
    answer: str
    level: str = ""
    solution: str = ""


class DatasetError(ValueError):
    """A bad row in a dataset file; the message names the file, the 1-based line and the field."""

    def __init__(self, path: str, row: int, reason: str, field: str | None = None):
        where = f"{path} row {row}: "
        super().__init__(where + (f"field '{field}' {reason}" if field else reason))
        self.path, self.row, self.field = path, row, field


class _BadRow(Exception):
    """Internal: why a row was rejected; `field` is None when the line is not a JSON object at all."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason, self.field = reason, field


def load_problems(
    path: str | Path,
    *,
    problem_key: str = "problem",
    answer_key: str = "answer",
    level_key: str | None = "level",
    solution_key: str | None = "solution",
    on_bad_row: str = "error",
    source: str = "data.path",
) -> tuple[list[Problem], list[str]]:
    """Load a JSONL file into Problems; returns (problems, messages for skipped rows).

    `on_bad_row="error"` raises `DatasetError` at the first bad row; `"skip"` drops it and records why.
    Blank lines are ignored. A uid is "<file name>:<line>". `source` names the config key that chose the
    file, so that a missing file points at the setting to fix.
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} ({source})")
    keys = (problem_key, answer_key, level_key, solution_key)
    problems: list[Problem] = []
    skipped: list[str] = []
    with path.open("rb") as lines:
        for row, raw in enumerate(lines, start=1):
            try:
                problem = _parse_line(raw, f"{path.name}:{row}", keys)
            except _BadRow as bad:
                error = DatasetError(str(path), row, bad.reason, bad.field)
                if on_bad_row == "error":
                    raise error from None
                skipped.append(str(error))
                continue
            if problem is not None:
                problems.append(problem)
    return problems, skipped


def _parse_line(raw: bytes, uid: str, keys: tuple[str, str, str | None, str | None]) -> Problem | None:
    """One line -> Problem, or None for a blank line; raises _BadRow."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _BadRow(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise _BadRow(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise _BadRow(f"expected a JSON object, got {type(record).__name__}")
    problem_key, answer_key, level_key, solution_key = keys
    return Problem(
        uid=uid,
        problem=_problem_text(record, problem_key),
        answer=_answer_text(record, answer_key),
        level=_level_text(record, level_key),
        solution=_solution_text(record, solution_key),
    )


def _problem_text(record: dict[str, Any], key: str) -> str:
    value = _required(record, key)
    if not isinstance(value, str):
        raise _BadRow(field=key, reason=f"has type {type(value).__name__}, expected str")
    if not value.strip():
        raise _BadRow(field=key, reason="is empty")
    return value


def _answer_text(record: dict[str, Any], key: str) -> str:
    """str, int, float, or a list of those (joined with ", "); integral floats lose their ".0"."""
    value = _required(record, key)
    parts = value if isinstance(value, list) else [value]
    texts = [_scalar_text(part, key) for part in parts]
    if not texts or not all(texts):
        raise _BadRow(field=key, reason="is empty")
    return ", ".join(texts)


def _level_text(record: dict[str, Any], key: str | None) -> str:
    """Optional: missing or null -> ""; MATH500 stores levels as integers."""
    if key is None or record.get(key) is None:
        return ""
    return _scalar_text(record[key], key, expected="str, int or float")


def _solution_text(record: dict[str, Any], key: str | None) -> str:
    """Optional: missing or null -> ""; a list holds alternative solutions (OlympiadBench): keep the first."""
    if key is None or record.get(key) is None:
        return ""
    value = record[key]
    if isinstance(value, list):
        value = value[0] if value else ""
    if not isinstance(value, str):
        raise _BadRow(field=key, reason=f"has type {type(value).__name__}, expected str or list of str")
    return value


def _required(record: dict[str, Any], key: str) -> Any:
    if key not in record or record[key] is None:
        raise _BadRow(field=key, reason="is missing")
    return record[key]


def _scalar_text(value: Any, key: str, expected: str = "str, int, float or a list of those") -> str:
    """str/int/float as text: "27" for 27 and 27.0, "0.5" for 0.5; bools and non-finite floats are errors."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float) and not math.isfinite(value):
        raise _BadRow(field=key, reason=f"is not a finite number ({value})")
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int) and not isinstance(value, bool):  # bool is an int subclass; True is no answer
        return str(value)
    raise _BadRow(field=key, reason=f"has type {type(value).__name__}, expected {expected}")
