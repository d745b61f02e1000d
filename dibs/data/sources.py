"""Prompt pool and held-out set from a data source (the real-data counterpart of ``make_task``).

A source is anything `dibs.data.records.load_problems` reads: a JSONL or Parquet file, a ``save_to_disk``
folder or a Hugging Face hub dataset. The held-out split is optional: runs that evaluate on benchmarks set
``test_path`` to null and get an empty test list.
"""

from __future__ import annotations

import logging

from dibs.data.records import Problem, load_problems
from dibs.data.synthetic import TaskSplits

__all__ = ["load_splits"]

log = logging.getLogger(__name__)
_SHOWN_SKIPS = 10  # a large pool can skip thousands of rows: log a few examples and the count


def load_splits(
    *,
    train_path: str,
    test_path: str | None = None,
    problem_key: str = "problem",
    answer_key: str = "answer",
    level_key: str | None = "level",
    solution_key: str | None = "solution",
    answer_from: str = "field",
    split: str = "train",
    test_split: str = "test",
    on_bad_row: str = "error",
) -> TaskSplits:
    """Load the pool (and the held-out set, if any) with the same field names, answer rule and bad-row policy.

    `split` and `test_split` choose the split of a DatasetDict folder or hub dataset; files ignore them.
    """
    fields = dict(
        problem_key=problem_key,
        answer_key=answer_key,
        level_key=level_key,
        solution_key=solution_key,
        answer_from=answer_from,
        on_bad_row=on_bad_row,
    )
    train = _load("train", train_path, split, fields)
    test = [] if test_path is None else _load("test", test_path, test_split, fields)
    for message in audit(train, test, train_path=train_path, test_path=test_path):
        log.warning(message)
    return TaskSplits(train=train, test=test)


def _key(problem: str) -> str:
    return " ".join(problem.split()).casefold()


def _examples(items: list[str], shown: int = 3) -> str:
    return "; ".join(repr(x if len(x) <= 60 else x[:57] + "...") for x in items[:shown])


def audit(train: list[Problem], test: list[Problem], *, train_path: str, test_path: str | None) -> list[str]:
    """Warnings about data that loads but trains badly: golds the verifier cannot read, the same problem twice in
    the pool, and pool problems that are also held out (compared by text, case and spacing ignored)."""
    from dibs.core.verifier import gold_is_readable

    messages = []
    for role, path, problems in (("train", train_path, train), ("test", test_path, test)):
        unreadable = [p.answer for p in problems if not gold_is_readable(p.answer)]
        if unreadable:
            messages.append(
                f"{path}: {len(unreadable)} of {len(problems)} {role} gold answers cannot be read by the verifier "
                f"(only an answer written exactly alike can match them), e.g. {_examples(unreadable)}"
            )
        seen: dict[str, int] = {}
        for p in problems:
            seen[_key(p.problem)] = seen.get(_key(p.problem), 0) + 1
        repeated = [text for text, count in seen.items() if count > 1]
        if repeated:
            extra = sum(seen[t] - 1 for t in repeated)
            messages.append(
                f"{path}: {extra} {role} rows repeat a problem already in it ({len(repeated)} problems appear more "
                f"than once), e.g. {_examples(repeated)}"
            )
    if test:
        held_out = {_key(p.problem) for p in test}
        overlap = sorted({_key(p.problem) for p in train} & held_out)
        if overlap:
            messages.append(
                f"{train_path} and {test_path}: {len(overlap)} held-out problems are also in the training pool "
                f"(held-out scores will be inflated), e.g. {_examples(overlap)}"
            )
    return messages


def _load(role: str, path: str, split: str, fields: dict) -> list[Problem]:
    """One side; an empty result is an error, since every row of it was bad."""
    problems, skipped = load_problems(path, split=split, source=f"data.source.{role}_path", **fields)
    for message in skipped[:_SHOWN_SKIPS]:
        log.warning("skipped bad row: %s", message)
    if len(skipped) > _SHOWN_SKIPS:
        log.warning("skipped %d bad rows of %s in all (the first %d are shown above)", len(skipped), path, _SHOWN_SKIPS)
    if not problems:
        raise ValueError(f"{path}: no usable problem in the {role} data ({len(skipped)} rows skipped)")
    return problems
