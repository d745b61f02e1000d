"""Prompt pool and held-out set from files on disk (the real-data counterpart of ``make_task``)."""

from __future__ import annotations

import logging

from dibs.data.records import load_problems
from dibs.data.synthetic import TaskSplits

__all__ = ["load_splits"]

log = logging.getLogger(__name__)


def load_splits(
    *,
    train_path: str,
    test_path: str,
    problem_key: str = "problem",
    answer_key: str = "answer",
    level_key: str | None = "level",
    solution_key: str | None = "solution",
    on_bad_row: str = "error",
) -> TaskSplits:
    """Load both JSONL files with the same field names and bad-row policy; skipped rows are logged."""
    splits = {}
    for split, path in (("train", train_path), ("test", test_path)):
        problems, skipped = load_problems(
            path,
            problem_key=problem_key,
            answer_key=answer_key,
            level_key=level_key,
            solution_key=solution_key,
            on_bad_row=on_bad_row,
            source=f"data.source.{split}_path",
        )
        for message in skipped:
            log.warning("skipped bad row: %s", message)
        if not problems:
            raise ValueError(f"{path}: no usable problem in the {split} file ({len(skipped)} rows skipped)")
        splits[split] = problems
    return TaskSplits(train=splits["train"], test=splits["test"])
