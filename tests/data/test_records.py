"""load_problems: normalisation of the shapes real files use, and a named error for every bad row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dibs.data.records import DatasetError, Problem, load_problems

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO_ROOT.parent / "shared" / "data" / "benchmarks"  # beside the repo, never copied into it


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts/values (dumped as JSON) or raw strings (written verbatim)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loads_all_fields_and_numbers_uids_by_line(tmp_path):
    path = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"problem": "1+1?", "answer": "2", "level": "Level 1", "solution": "\\boxed{2}"},
            "",  # blank lines are skipped but still count as lines
            {"problem": "2+2?", "answer": 4, "level": 3, "extra": "ignored"},
        ],
    )
    problems, skipped = load_problems(path)
    assert skipped == []
    assert problems == [
        Problem(uid="math.jsonl:1", problem="1+1?", answer="2", level="Level 1", solution="\\boxed{2}"),
        Problem(uid="math.jsonl:3", problem="2+2?", answer="4", level="3", solution=""),
    ]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (27, "27"),
        (27.0, "27"),  # AMC23 stores integers as floats
        (0.5, "0.5"),
        (-3.0, "-3"),
        (" 3/4 ", "3/4"),
        (["$2$"], "$2$"),  # OlympiadBench: a list of answers
        (["1", 2, 3.0], "1, 2, 3"),
    ],
)
def test_answer_normalisation(tmp_path, answer, expected):
    path = write_jsonl(tmp_path / "a.jsonl", [{"problem": "p", "answer": answer}])
    assert load_problems(path)[0][0].answer == expected


def test_custom_keys_and_optional_fields_off(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q?", "final": "7", "level": [1], "solution": 5}])
    keys = {"problem_key": "question", "answer_key": "final", "level_key": None, "solution_key": None}
    problems, _ = load_problems(path, **keys)
    assert problems == [Problem(uid="q.jsonl:1", problem="q?", answer="7")]


def test_solution_list_keeps_first_alternative_and_null_optional_fields_are_empty(tmp_path):
    path = write_jsonl(
        tmp_path / "o.jsonl",
        [
            {"problem": "p", "answer": "1", "solution": ["first", "second"], "level": None},
            {"problem": "p", "answer": "1", "solution": None},
        ],
    )
    problems, _ = load_problems(path)
    assert [(p.solution, p.level) for p in problems] == [("first", ""), ("", "")]


BAD_ROWS = [
    ("{not json", None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object, got list"),
    ('"text"', None, "expected a JSON object, got str"),
    ({"answer": "1"}, "problem", "field 'problem' is missing"),
    ({"problem": None, "answer": "1"}, "problem", "field 'problem' is missing"),
    ({"problem": "  ", "answer": "1"}, "problem", "field 'problem' is empty"),
    ({"problem": 5, "answer": "1"}, "problem", "field 'problem' has type int, expected str"),
    ({"problem": "p"}, "answer", "field 'answer' is missing"),
    ({"problem": "p", "answer": ""}, "answer", "field 'answer' is empty"),
    ({"problem": "p", "answer": []}, "answer", "field 'answer' is empty"),
    ({"problem": "p", "answer": ["1", ""]}, "answer", "field 'answer' is empty"),
    ({"problem": "p", "answer": True}, "answer", "field 'answer' has type bool"),
    ({"problem": "p", "answer": {"v": 1}}, "answer", "field 'answer' has type dict"),
    ({"problem": "p", "answer": [[1]]}, "answer", "field 'answer' has type list"),
    ('{"problem": "p", "answer": NaN}', "answer", "field 'answer' is not a finite number"),
    (
        {"problem": "p", "answer": "1", "level": [1]},
        "level",
        "field 'level' has type list, expected str, int or float",
    ),
    ({"problem": "p", "answer": "1", "solution": 3}, "solution", "field 'solution' has type int"),
    ({"problem": "p", "answer": "1", "solution": [3]}, "solution", "field 'solution' has type int"),
]


@pytest.mark.parametrize(("row", "field", "message"), BAD_ROWS)
def test_bad_row_raises_naming_file_row_and_field(tmp_path, row, field, message):
    good = {"problem": "ok", "answer": "1"}
    path = write_jsonl(tmp_path / "math.jsonl", [good, "", row, good])
    with pytest.raises(DatasetError, match="math.jsonl row 3: ") as info:
        load_problems(path)
    assert message in str(info.value)
    assert (info.value.path, info.value.row, info.value.field) == (str(path), 3, field)


@pytest.mark.parametrize(("row", "field", "message"), BAD_ROWS)
def test_bad_row_skipped_with_message(tmp_path, row, field, message):
    rows = [{"problem": "a", "answer": "1"}, row, {"problem": "b", "answer": 2}]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    problems, skipped = load_problems(path, on_bad_row="skip")
    assert [p.uid for p in problems] == ["math.jsonl:1", "math.jsonl:3"]
    assert len(skipped) == 1 and "math.jsonl row 2: " in skipped[0] and message in skipped[0]


def test_invalid_utf8_is_a_bad_row(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"problem": "p", "answer": "1"}\n{"problem": "\xff", "answer": "1"}\n')
    with pytest.raises(DatasetError, match="bin.jsonl row 2: not valid UTF-8"):
        load_problems(path)
    assert len(load_problems(path, on_bad_row="skip")[0]) == 1


def test_utf8_bom_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('{"problem": "p", "answer": "1"}\n'.encode("utf-8-sig"))
    assert load_problems(path)[0][0].problem == "p"


def test_missing_file_names_path_and_setting(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"dataset file not found: .*nope\.jsonl \(data\.path\)"):
        load_problems(missing)
    with pytest.raises(FileNotFoundError, match=r"\(data\.source\.test_path\)"):
        load_problems(missing, source="data.source.test_path")


def test_unknown_bad_row_policy_is_rejected_before_reading(tmp_path):
    with pytest.raises(ValueError, match="on_bad_row"):
        load_problems(tmp_path / "never-read.jsonl", on_bad_row="ignore")


@pytest.mark.skipif(not (BENCHMARKS / "math500.jsonl").is_file(), reason="shared benchmark files not present")
def test_math500_smoke():
    problems, skipped = load_problems(BENCHMARKS / "math500.jsonl")
    assert len(problems) == 500 and skipped == []
    assert all(p.problem and p.answer and p.solution for p in problems)
    assert {p.level for p in problems} == {"1", "2", "3", "4", "5"}  # integer levels become strings
    assert problems[0].uid == "math500.jsonl:1"
