"""Problem records and one validating loader for prompt pools and benchmarks, whatever the storage format.

A `Problem` is the one record every part of dibs exchanges: question text (no template applied), gold answer
as a string, an optional difficulty label for per-level metrics and an optional worked solution (SFT target).

`load_problems` reads JSON Lines, Parquet, a `save_to_disk` folder or a Hugging Face hub dataset; every record
then goes through the same checks. Real benchmark files disagree on types (MATH500 has integer levels, AMC23
float answers such as 27.0, OlympiadBench lists of answers and of alternative solutions), so the loader
normalises those few shapes and rejects everything else with a message that names the source, the 1-based
row and the field: a silently dropped or mangled gold answer would read as a low score, not an error.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dibs.core.verifier import extract_boxed

BAD_ROW_POLICIES = ("error", "skip")
ANSWER_SOURCES = ("field", "boxed")  # the gold is the answer field as it is, or its last \boxed{}
JSONL_SUFFIXES = (".jsonl", ".json")  # ".json" must still hold one object per line
PARQUET_SUFFIXES = (".parquet",)
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")  # what Dataset / DatasetDict.save_to_disk write


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer; `uid` is stable across runs (e.g. "synth-train-000123")."""

    uid: str
    problem: str
    answer: str
    level: str = ""
    solution: str = ""
    check: str = ""  # what the verifier needs beyond the answer (a reasoning-gym entry as JSON); "" for maths

    @property
    def gold(self) -> str:
        """What the verifier scores against: the answer, or ``check`` when the problem has its own scorer."""
        return self.check or self.answer


class DatasetError(ValueError):
    """A bad row in a dataset; the message names the file or dataset, the 1-based row and the field."""

    def __init__(self, path: str, row: int, reason: str, field: str | None = None):
        where = f"{path} row {row}: "
        super().__init__(where + (f"field '{field}' {reason}" if field else reason))
        self.path, self.row, self.field = path, row, field


class _BadRow(Exception):
    """Internal: why a row was rejected; `field` is None when the line is not a JSON object at all."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason, self.field = reason, field


@dataclass(frozen=True)
class _Keys:
    problem: str
    answer: str
    level: str | None
    solution: str | None
    answer_from: str


@dataclass(frozen=True)
class _Rows:
    """An opened source: `label` names it in errors, `name` starts each uid, `records` yields (row, record)."""

    label: str
    name: str
    records: Iterable[tuple[int, Any]]  # record: a dict, or the raw bytes of a JSONL line still to parse


def load_problems(
    path: str | Path,
    *,
    problem_key: str = "problem",
    answer_key: str = "answer",
    level_key: str | None = "level",
    solution_key: str | None = "solution",
    answer_from: str = "field",
    split: str = "train",
    on_bad_row: str = "error",
    source: str = "data.path",
) -> tuple[list[Problem], list[str]]:
    """Load a dataset into Problems; returns (problems, messages for skipped rows).

    `path` chooses the format: a ``.jsonl``/``.json`` file (one JSON object per line; blank lines ignored), a
    ``.parquet`` file, a folder written by ``save_to_disk`` (a DatasetDict needs `split`), any other folder or
    a name that is no local path (both through ``datasets.load_dataset(path, split=split)``, the hub's call).
    `answer_from="boxed"` takes the gold from the last ``\\boxed{}`` of the answer field (Minerva Math, or
    Numina-Math's worked solutions). `on_bad_row="error"` raises `DatasetError` at the first bad row; `"skip"`
    drops it and records why. A uid is "<file or dataset name>:<row>". `source` names the config key that chose
    the data, so that a missing file points at the setting to fix.
    """
    _check_choice("on_bad_row", on_bad_row, BAD_ROW_POLICIES)
    _check_choice("answer_from", answer_from, ANSWER_SOURCES)
    keys = _Keys(problem_key, answer_key, level_key, solution_key, answer_from)
    rows = _open(path, split=split, source=source)
    problems: list[Problem] = []
    skipped: list[str] = []
    for row, record in rows.records:
        try:
            problem = _to_problem(record, f"{rows.name}:{row}", keys)
        except _BadRow as bad:
            error = DatasetError(rows.label, row, bad.reason, bad.field)
            if on_bad_row == "error":
                raise error from None
            skipped.append(str(error))
            continue
        if problem is not None:
            problems.append(problem)
    return problems, skipped


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _open(path: str | Path, *, split: str, source: str) -> _Rows:
    """Format by source; a missing local path never falls through to the hub (it would fail less clearly)."""
    local = Path(path).expanduser()
    if local.is_file():
        return _file_rows(local, source)
    if local.is_dir():
        return _folder_rows(local, split, source)
    text = str(path)
    if local.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES or _looks_local(text):
        raise FileNotFoundError(f"dataset file not found: {local} ({source})")
    return _load_dataset_rows(text, text, split, source, hub=True)


def _looks_local(text: str) -> bool:
    """A hub name is "name" or "owner/name"; anything deeper, absolute or starting with . or ~ is a path."""
    return text.startswith((".", "~")) or Path(text).is_absolute() or text.count("/") > 1


def _file_rows(path: Path, source: str) -> _Rows:
    if path.suffix in JSONL_SUFFIXES:
        return _Rows(str(path), path.name, _jsonl_lines(path))
    if path.suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq  # a datasets dependency; imported here so that this module loads fast

        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow's own message names neither the file nor the setting
            raise ValueError(f"{path}: not a readable Parquet file ({source}): {error}") from None
        return _Rows(str(path), path.name, _numbered(parquet.iter_batches(batch_size=4096)))
    known = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    raise ValueError(
        f"{path}: unsupported dataset file type {path.suffix!r} ({source}); expected a {known} file, a "
        "save_to_disk folder, a folder of data files or a Hugging Face hub dataset name"
    )


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as lines:
        yield from enumerate(lines, start=1)


def _numbered(batches: Iterable[Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row, record) from Arrow record batches or tables, converted a batch at a time."""
    return enumerate(itertools.chain.from_iterable(batch.to_pylist() for batch in batches), start=1)


def _folder_rows(path: Path, split: str, source: str) -> _Rows:
    """A save_to_disk folder is read as saved; any other folder is a dataset repository laid out locally."""
    if not any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
        return _load_dataset_rows(str(path), path.name, split, source, hub=False)
    import datasets

    data = datasets.load_from_disk(str(path))
    label = str(path)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(
                f"{path}: no split {split!r} in this DatasetDict ({source}); available splits: {', '.join(data)}"
            )
        data, label = data[split], f"{path}[{split}]"
    return _Rows(label, path.name, _numbered(data.with_format("arrow").iter(batch_size=4096)))


def _load_dataset_rows(target: str, name: str, split: str, source: str, *, hub: bool) -> _Rows:
    """`datasets.load_dataset(target, split=split)`; a failure keeps its kind (not found, or bad value)."""
    import datasets

    try:
        data = datasets.load_dataset(target, split=split)
    except Exception as err:  # any failure: re-raised with the source and config key, the original chained
        where = "not a local file or folder, so tried as a Hugging Face hub dataset" if hub else "a local folder"
        kind = FileNotFoundError if isinstance(err, OSError) else ValueError
        raise kind(
            f"could not load dataset {target!r} split {split!r} ({source}): {where}, and "
            f"datasets.load_dataset failed with {type(err).__name__}: {err}"
        ) from err
    return _Rows(f"{target}[{split}]", name, _numbered(data.with_format("arrow").iter(batch_size=4096)))


def _to_problem(record: Any, uid: str, keys: _Keys) -> Problem | None:
    """One record -> Problem, or None for a blank JSONL line; raises _BadRow. The one validation path."""
    if isinstance(record, bytes):
        record = _parse_line(record)
        if record is None:
            return None
    answer = _boxed_answer if keys.answer_from == "boxed" else _answer_text
    return Problem(
        uid=uid,
        problem=_problem_text(record, keys.problem),
        answer=answer(record, keys.answer),
        level=_level_text(record, keys.level),
        solution=_solution_text(record, keys.solution),
    )


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """One JSONL line -> its object, or None for a blank line; raises _BadRow."""
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
    return record


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


def _boxed_answer(record: dict[str, Any], key: str) -> str:
    """The last closed \\boxed{} of a worked solution; a field without one has no gold to score against."""
    text = _problem_text(record, key)  # the same checks: present, a str, not blank
    boxed = extract_boxed(text)
    if boxed is None:
        raise _BadRow(field=key, reason="has no \\boxed{} answer")
    if not boxed:
        raise _BadRow(field=key, reason="has an empty \\boxed{} answer")
    return boxed


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
