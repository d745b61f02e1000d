"""The synthetic task: deterministic, disjoint splits, correct solutions, labelled and varied difficulty."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dibs.data.records import Problem
from dibs.data.synthetic import (
    LEVELS,
    TaskSplits,
    corpus,
    count_carries,
    difficulty_level,
    generate_problems,
    make_task,
    split_of,
)

STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")
BOXED = re.compile(r"\\boxed\{(\d+)\}")


def checked_arithmetic(p: Problem) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Recompute every line of the solution; return the (operands, operators) it states."""
    *steps, last = p.solution.split("\n")
    assert 1 <= len(steps) <= 2
    operands, ops, running = [], [], None
    for line in steps:
        a, op, b, c = STEP.fullmatch(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert c == (a + b if op == "+" else a - b) and c >= 0, line
        assert running is None or a == running, "each line starts from the previous result"
        operands += [a, b] if not operands else [b]
        ops.append(op)
        running = c
    assert BOXED.fullmatch(last).group(1) == p.answer == str(running)
    assert [int(x) for x in re.findall(r"\d+", p.problem)] == operands, "the text states the same numbers"
    return tuple(operands), tuple(ops)


def check_problems(problems: list[Problem], split: str) -> None:
    for index, p in enumerate(problems):
        assert p.uid == f"synth-{split}-{index:06d}"
        arithmetic = checked_arithmetic(p)
        assert difficulty_level(*arithmetic) == p.level
        assert split_of(p.problem) == split


@pytest.fixture(scope="module")
def task() -> TaskSplits:
    return make_task(seed=0, n_train=2000, n_test=200)


def test_default_task_is_correct_and_balanced(task):
    check_problems(task.train, "train")
    check_problems(task.test, "test")
    assert Counter(p.level for p in task.train) == dict.fromkeys(LEVELS, 400)  # exact shares, every level
    assert Counter(p.level for p in task.test) == dict.fromkeys(LEVELS, 40)


def test_splits_are_disjoint_by_text_whatever_the_seed(task):
    train_texts = {p.problem for p in task.train}
    assert not train_texts & {p.problem for p in task.test}
    other_seed_test = {p.problem for p in generate_problems(200, seed=1, split="test")}
    assert not train_texts & other_seed_test, "the partition does not depend on the seed"


def test_hard_levels_mostly_hold_out_unseen_sums(task):
    # level 5 draws from ~10^4 sums, so most test sums are not train sums; level 1 has under 100 sums
    train_sums = {checked_arithmetic(p) for p in task.train}
    hard_test = [p for p in task.test if p.level == "5"]
    assert sum(checked_arithmetic(p) in train_sums for p in hard_test) < len(hard_test) / 2


def test_texts_unique_within_a_split_and_short(task):
    assert len({p.problem for p in task.train}) == len(task.train)
    assert max(len(p.problem) for p in task.train + task.test) < 100
    assert not re.search(r"\b1 [a-z]+s\b", " ".join(p.problem for p in task.train)), 'no "1 pens"'


def test_deterministic_in_the_seed():
    assert make_task(seed=3, n_train=50, n_test=10) == make_task(seed=3, n_train=50, n_test=10)
    assert make_task(seed=3, n_train=50, n_test=10) != make_task(seed=4, n_train=50, n_test=10)
    assert generate_problems(30, seed=3, split="train") == generate_problems(30, seed=3, split="train")


def test_level_weights_choose_the_levels():
    only_easy = generate_problems(20, seed=0, split="train", level_weights=[1, 0, 0, 0, 0])
    assert {p.level for p in only_easy} == {"1"}
    # 7 problems over weights 1:1:0:0:2 -> quotas 1.75, 1.75, 0, 0, 3.5 -> 2, 2, 0, 0, 3 (largest remainder)
    mixed = generate_problems(7, seed=0, split="test", level_weights=[1, 1, 0, 0, 2])
    assert Counter(p.level for p in mixed) == {"1": 2, "2": 2, "5": 3}
    assert generate_problems(0, seed=0, split="train") == []


@pytest.mark.parametrize("weights", [[1, 1], [0, 0, 0, 0, 0], [1, -1, 1, 1, 1], [1, float("nan"), 1, 1, 1]])
def test_bad_level_weights_are_rejected(weights):
    with pytest.raises(ValueError, match="level_weights"):
        generate_problems(5, seed=0, split="train", level_weights=weights)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        generate_problems(5, seed=0, split="validation")


def test_corpus_has_every_problem_and_solution(task):
    texts = corpus(task.test)
    assert len(texts) == 2 * len(task.test)
    assert texts[:2] == [task.test[0].problem, task.test[0].solution]


@pytest.mark.parametrize(
    ("a", "b", "op", "carries"),
    [
        (58, 67, "+", 2),  # 8+7=15 carry, 5+6+1=12 carry
        (123, 456, "+", 0),  # 3+6, 2+5, 1+4: no column reaches 10
        (999, 1, "+", 3),  # 9+1=10, 9+0+1=10, 9+0+1=10
        (5, 5, "+", 1),  # 5+5=10
        (0, 0, "+", 0),
        (52, 17, "-", 1),  # 2-7 borrows, 5-1-1=3
        (1000, 1, "-", 3),  # 0-1 borrows, 0-0-1 borrows, 0-0-1 borrows, 1-0-1=0
        (100, 100, "-", 0),
        (73, 73, "-", 0),
    ],
)
def test_count_carries_literal_cases(a, b, op, carries):
    assert count_carries(a, b, op) == carries


@pytest.mark.parametrize(("a", "b", "op"), [(3, 5, "-"), (-1, 2, "+"), (1, 2, "*")])
def test_count_carries_rejects_bad_input(a, b, op):
    with pytest.raises(ValueError):
        count_carries(a, b, op)


@pytest.mark.parametrize(
    ("operands", "ops", "level"),
    [
        ((3, 4), ("+",), "1"),
        ((7, 8), ("+",), "1"),  # one digit each: level 1 even with a carry
        ((23, 4), ("+",), "2"),  # 3+4=7: no carry
        ((4, 23), ("+",), "2"),
        ((27, 5), ("+",), "3"),  # 7+5=12: carry
        ((52, 7), ("-",), "3"),  # 2-7 borrows
        ((23, 45), ("+",), "4"),
        ((58, 67), ("+",), "5"),
        ((52, 17), ("-",), "5"),
        ((2, 3, 4), ("+", "-"), "4"),
        ((12, 3, 4), ("+", "-"), "5"),
        ((123, 456), ("+",), "5"),  # never drawn, still labelled
    ],
)
def test_difficulty_level_literal_cases(operands, ops, level):
    assert difficulty_level(operands, ops) == level


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-(2**63), 2**63), n=st.integers(1, 25), split=st.sampled_from(["train", "test"]))
def test_solutions_are_correct_for_any_seed(seed, n, split):
    problems = generate_problems(n, seed=seed, split=split)
    assert len(problems) == n
    check_problems(problems, split)
