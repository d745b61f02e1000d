"""load_splits: pool and optional held-out set from one data source, with the loader's options passed through."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dibs.data.records import DatasetError, Problem
from dibs.data.sources import load_splits


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_train_and_test_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"problem": "a", "answer": "1", "level": 2}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"problem": "b", "answer": 3}])
    splits = load_splits(train_path=train, test_path=test)
    assert splits.train == [Problem(uid="train.jsonl:1", problem="a", answer="1", level="2")]
    assert splits.test == [Problem(uid="test.jsonl:1", problem="b", answer="3")]


def test_no_test_path_gives_an_empty_held_out_set(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"problem": "a", "answer": "1"}])
    assert load_splits(train_path=train).test == []
    assert load_splits(train_path=train, test_path=None).test == []


def test_splits_of_a_dataset_dict_and_boxed_answers(hf, tmp_path):
    # Numina-style: the gold is the last \boxed{} of the solution; train and test come from one DatasetDict.
    rows = lambda tag: [{"problem": tag, "solution": f"so \\boxed{{{tag}}}"}]  # noqa: E731
    hf.DatasetDict(pool=hf.Dataset.from_list(rows("t")), held=hf.Dataset.from_list(rows("h"))).save_to_disk(
        tmp_path / "numina"
    )
    folder = str(tmp_path / "numina")
    splits = load_splits(
        train_path=folder,
        test_path=folder,
        split="pool",
        test_split="held",
        answer_key="solution",
        answer_from="boxed",
    )
    assert [(p.uid, p.answer) for p in splits.train] == [("numina:1", "t")]
    assert [(p.uid, p.answer) for p in splits.test] == [("numina:1", "h")]


def test_missing_test_split_names_its_setting(hf, tmp_path):
    hf.DatasetDict(train=hf.Dataset.from_list([{"problem": "p", "answer": "1"}])).save_to_disk(tmp_path / "d")
    with pytest.raises(ValueError, match=r"no split 'test'.*\(data\.source\.test_path\); available splits: train"):
        load_splits(train_path=str(tmp_path / "d"), test_path=str(tmp_path / "d"))


def test_missing_files_name_their_setting(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"problem": "a", "answer": "1"}])
    with pytest.raises(FileNotFoundError, match=r"\(data\.source\.train_path\)"):
        load_splits(train_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"\(data\.source\.test_path\)"):
        load_splits(train_path=train, test_path=str(tmp_path / "nope.parquet"))


def test_bad_rows_raise_or_are_skipped_and_logged(tmp_path, caplog):
    rows = [{"problem": "a", "answer": "1"}] + [{"problem": "b"}] * 12
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DatasetError, match=r"train\.jsonl row 2: field 'answer' is missing"):
        load_splits(train_path=train)
    with caplog.at_level(logging.WARNING, logger="dibs.data.sources"):
        splits = load_splits(train_path=train, on_bad_row="skip")
    assert [p.uid for p in splits.train] == ["train.jsonl:1"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 11 and "skipped 12 bad rows" in warnings[-1]  # 10 examples, then the count


def test_a_split_with_no_usable_row_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"problem": "a", "answer": "\\boxed{1}"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"problem": "b", "answer": "no box"}])
    with pytest.raises(ValueError, match=r"test\.jsonl: no usable problem in the test data \(1 rows skipped\)"):
        load_splits(train_path=train, test_path=test, answer_from="boxed", on_bad_row="skip")


def test_unreadable_golds_duplicates_and_overlap_are_counted_and_warned(tmp_path, caplog):
    rows = [
        {"problem": "What is half of one?", "answer": "½"},  # the verifier cannot read these three
        {"problem": "Root of two?", "answer": "√2"},
        {"problem": "Twelve?", "answer": "１２"},
        {"problem": "Add 1 and 1.", "answer": "2"},
        {"problem": "add  1 and 1.", "answer": "2"},  # the same problem, spacing and case aside
        {"problem": "Held out too.", "answer": "\\frac{1}{2}"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [{"problem": "held out too.", "answer": "3"}])
    with caplog.at_level(logging.WARNING):
        splits = load_splits(train_path=train, test_path=test)
    assert len(splits.train) == 6  # warned, never dropped
    text = caplog.text
    assert "3 of 6 train gold answers cannot be read by the verifier" in text and "'½'" in text
    assert "1 train rows repeat a problem already in it (1 problems appear more than once)" in text
    assert "1 held-out problems are also in the training pool" in text


def test_clean_data_loads_without_a_warning(tmp_path, caplog):
    rows = [{"problem": "a", "answer": "\\sqrt{2}"}, {"problem": "b", "answer": 1}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        load_splits(train_path=train)
    assert caplog.text == ""


def test_a_file_named_parquet_that_is_not_parquet_names_the_file_and_setting(tmp_path):
    path = tmp_path / "pool.parquet"
    path.write_text('{"problem": "a", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"pool\.parquet: not a readable Parquet file \(data\.source\.train_path\)"):
        load_splits(train_path=str(path))
