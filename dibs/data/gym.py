"""reasoning-gym tasks as a data source: procedurally generated problems scored by their own task's scorer.

``load_gym`` generates, for each task name, ``size`` training problems from ``seed`` and ``test_size`` held-out
problems from a separate stream (``seed + 1_000_003``), leaving out any held-out question that is also in the
training pool. Each problem carries a reference to its generator's entry (task, seed, size, options, index) and
its answer as JSON in ``Problem.check``; ``dibs.core.gym_verifier.GymVerifier``'s workers regenerate the entry
and score with that dataset's own ``score_answer``, its settings included. The tasks have no
worked solutions: the warm start trains on the answer alone, stated as the verifier reads it
(``<answer>...</answer>``). Any task of reasoning-gym's registry can be named; generator settings go in
``options`` (``{chain_sum: {max_terms: 3}}``), as its ``create_dataset(name, seed=, size=, **options)`` takes them.
Tasks whose entries have no answer (puzzles scored by checking a solution) are refused.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from dibs.data.records import Problem
from dibs.data.synthetic import TaskSplits

__all__ = ["load_gym"]

log = logging.getLogger(__name__)
TEST_STREAM = 1_000_003  # the held-out problems' seed offset
_TEST_TRIES = 4  # held-out candidates drawn per wanted problem, so that duplicates of the pool can be left out


def load_gym(
    *,
    tasks: Sequence[str],
    size: int,
    test_size: int,
    seed: int,
    options: Mapping[str, Mapping[str, Any]] | None,
    level_from: str,
) -> TaskSplits:
    """The pool and the held-out set of the named tasks. ``level_from``: ``task`` (the task's name is the
    problem's level) or a metadata key of the entries (``num_terms``: per-level metrics by that value)."""
    import reasoning_gym

    known = sorted(reasoning_gym.factory.DATASETS)
    tasks, options = list(tasks), dict(options or {})
    if not tasks:
        raise ValueError("data.source.tasks is empty: name at least one reasoning-gym task, e.g. [chain_sum]")
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(known)} tasks, e.g. chain_sum)"
            raise ValueError(f"data.source.tasks: {name!r} is not a reasoning-gym task{hint}")
    stray = sorted(set(options) - set(tasks))
    if stray:
        raise ValueError(f"data.source.options names {stray}, which are not in data.source.tasks {tasks}")
    if size < 1 or test_size < 0:
        raise ValueError(f"data.source.size={size} must be >= 1 and data.source.test_size={test_size} >= 0")
    train, test = [], []
    for name in tasks:
        settings = dict(options.get(name) or {})
        pool = _generate(reasoning_gym, name, "train", size, seed, settings, level_from)
        seen = {p.problem for p in pool}
        candidates = _generate(
            reasoning_gym, name, "test", test_size * _TEST_TRIES, seed + TEST_STREAM, settings, level_from
        )
        held_out = [p for p in candidates if p.problem not in seen][:test_size]
        if len(held_out) < test_size:
            log.warning(
                "reasoning-gym %s: only %d held-out problems differ from the %d of the pool (%d wanted): the "
                "task has few distinct questions at these settings",
                name,
                len(held_out),
                size,
                test_size,
            )
        train += pool
        test += held_out
    return TaskSplits(train=train, test=test)


def _generate(
    reasoning_gym: Any, name: str, split: str, size: int, seed: int, settings: dict[str, Any], level_from: str
) -> list[Problem]:
    if size == 0:
        return []
    try:
        dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **settings)
    except (TypeError, ValueError, AssertionError) as error:  # a setting the task's config refuses
        raise ValueError(f"data.source.options.{name}: reasoning-gym refused {settings}: {error}") from None
    problems = []
    for i in range(size):
        entry = dataset[i]
        where = f"reasoning-gym {name} {split} item {i}"
        question, answer = entry.get("question"), entry.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: field 'question' is missing or empty")
        if answer is None or not str(answer).strip():
            raise ValueError(
                f"{where}: field 'answer' is missing or empty: tasks without a gold answer (their scorer checks a "
                "solution against the puzzle, e.g. rubiks_cube, rush_hour) are not supported, since the warm start "
                "needs an answer to train on"
            )
        meta = entry.get("metadata") or {}
        if level_from == "task":
            level = name
        elif level_from in meta:
            level = str(meta[level_from])
        else:
            raise ValueError(
                f"data.source.level_from={level_from!r}: {where} has no such metadata key "
                f"(it has {sorted(meta)}); use `task` or one of those"
            )
        # A reference, not a copy: the worker regenerates the entry (its metadata keeps its own types, tuples and
        # integer keys included) and scores with this dataset's own settings.
        ref = {"task": name, "seed": seed, "size": size, "options": settings, "index": i, "answer": str(answer)}
        problems.append(
            Problem(
                uid=f"{name}-{split}-{i:06d}",
                problem=question,
                answer=str(answer),
                level=level,
                check=json.dumps(ref, sort_keys=True),
            )
        )
    return problems
