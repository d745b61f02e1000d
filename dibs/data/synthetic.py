"""The embedded default task: short arithmetic word problems with one-line-per-step solutions.

Nothing can be downloaded at run time, so `python train.py` learns this instead of MATH. The learner is a
~0.1M-parameter Qwen2 trained for minutes on a CPU, so texts are short and regular (a name, an object, one
sentence per operation) and solutions are one line per operation, then the boxed result:

    Ava has 23 pens. She gets 45 more. She gives away 12. How many pens does she have now?
    23 + 45 = 68.
    68 - 12 = 56.
    \\boxed{56}

GVM needs prompts whose acceptance rates differ, so difficulty varies widely and is labelled (see
`difficulty_level`): operand count (2-3), digits per operand (1-2) and carries/borrows. Every intermediate
result is >= 0.

Train and test are disjoint by problem text: each text belongs to exactly one split, decided by a fixed hash
of the text, independent of the seed and of how many problems are drawn, so no train set of any seed contains
a problem that some test set asks. The arithmetic itself may recur: levels 1-2 have only a few hundred
distinct sums, and single-digit facts are the skill there, not something to hold out (splitting by sum was
tried: RL then memorised the ~80 train sums of level 1 and got worse on the held-out ones). From level 3 up
the space of sums is so large that a test sum is almost never a train sum. Everything is a pure function of
the seed (`random.Random`, never the global RNG).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dibs.data.records import Problem

LEVELS = ("1", "2", "3", "4", "5")
SPLITS = ("train", "test")
TEST_SHARE = 0.2  # fraction of all problem texts reserved for the test split

NAMES = ("Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max")  # alternating she / he
PRONOUNS = ("She", "He")
OBJECTS = ("pens", "apples", "cards", "books", "coins", "shells", "stamps", "eggs")
GAIN = ("gets {n} more", "buys {n} more", "finds {n} more")
LOSS = ("gives away {n}", "loses {n}", "sells {n}")

# Digits allowed for each operand, per candidate shape; a draw is kept only when difficulty_level agrees.
SHAPES: dict[str, tuple[tuple[tuple[int, ...], ...], ...]] = {
    "1": (((1,), (1,)),),
    "2": (((2,), (1,)), ((1,), (2,))),
    "3": (((2,), (1,)), ((1,), (2,))),
    "4": (((2,), (2,)), ((1,), (1,), (1,))),
    "5": (((2,), (2,)), ((2,), (1,), (1,)), ((1,), (2,), (1,))),
}

Weights = Sequence[float] | None  # one per level "1".."5"; None: equal
Arithmetic = tuple[tuple[int, ...], tuple[str, ...]]  # (operands, operators), e.g. ((23, 45, 12), ("+", "-"))


@dataclass(frozen=True)
class TaskSplits:
    train: list[Problem]
    test: list[Problem]


def count_carries(a: int, b: int, op: str) -> int:
    """Carries of column addition (op "+") or borrows of column subtraction (op "-", needs a >= b).

    >>> count_carries(58, 67, "+")  # 8+7=15 carry, 5+6+1=12 carry
    2
    >>> count_carries(52, 17, "-")  # 2-7 borrows, 5-1-1=3
    1
    """
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    if op == "-" and b > a:
        raise ValueError(f"subtraction {a} - {b} would be negative")
    if op not in ("+", "-"):
        raise ValueError(f"op must be '+' or '-', got {op!r}")
    sign = 1 if op == "+" else -1
    count = carry = 0
    while a or b:
        column = a % 10 + sign * (b % 10) + sign * carry
        carry = int(column >= 10 if op == "+" else column < 0)
        count += carry
        a, b = a // 10, b // 10
    return count


def difficulty_level(operands: Sequence[int], ops: Sequence[str]) -> str:
    """Level "1".."5" from the operand count, the operands' digits and the carries/borrows.

    two operands:    1 and 1 digit -> 1;  2 and 1 digits -> 2 without a carry, else 3;
                     2 and 2 digits -> 4 without a carry, else 5;  any 3-digit operand -> 5.
    three operands:  all 1 digit -> 4;  otherwise 5.

    The range is matched to what the default ~0.15M-parameter model learns in a minute on a CPU: its
    warm start solves level 1 often, level 5 rarely, so acceptance rates spread over (0, 1).
    """
    if len(operands) not in (2, 3) or len(ops) != len(operands) - 1:
        raise ValueError(f"need 2 or 3 operands and one operator fewer, got {operands} and {ops}")
    digits = sorted(len(str(x)) for x in operands)
    carried = _chain_carries(operands, ops) > 0
    if len(operands) == 3:
        return "4" if digits[-1] == 1 else "5"
    if digits == [1, 1]:
        return "1"
    if digits == [1, 2]:
        return "3" if carried else "2"
    if digits == [2, 2]:
        return "5" if carried else "4"
    return "5"


def generate_problems(n: int, *, seed: int, split: str, level_weights: Weights = None) -> list[Problem]:
    """`n` distinct problems of one split, levels in proportion to `level_weights` (default: equal)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"dibs-synth|{seed}|{split}")
    levels = _level_sequence(n, _check_weights(level_weights), rng)
    seen: set[str] = set()
    problems = []
    for index, level in enumerate(levels):
        problem = _draw_problem(rng, level, split, seen, uid=f"synth-{split}-{index:06d}")
        seen.add(problem.problem)
        problems.append(problem)
    return problems


def make_task(
    *,
    seed: int,
    n_train: int,
    n_test: int,
    level_weights: Weights = None,
) -> TaskSplits:
    """The train pool and the held-out test set of the embedded default task."""
    return TaskSplits(
        train=generate_problems(n_train, seed=seed, split="train", level_weights=level_weights),
        test=generate_problems(n_test, seed=seed, split="test", level_weights=level_weights),
    )


def corpus(problems: Iterable[Problem]) -> list[str]:
    """Texts to train the tokenizer on: every problem and every solution."""
    return [text for p in problems for text in (p.problem, p.solution) if text]


def split_of(text: str) -> str:
    """The split that owns this problem text: a fixed hash, independent of any seed."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, person=b"dibs-synth").digest()
    return "test" if int.from_bytes(digest, "big") < TEST_SHARE * 2**64 else "train"


def _chain_carries(operands: Sequence[int], ops: Sequence[str]) -> int:
    total, count = operands[0], 0
    for op, x in zip(ops, operands[1:], strict=True):
        count += count_carries(total, x, op)
        total = total + x if op == "+" else total - x
    return count


def _check_weights(level_weights: Sequence[float] | None) -> list[float]:
    weights = [1.0] * len(LEVELS) if level_weights is None else [float(w) for w in level_weights]
    valid = len(weights) == len(LEVELS) and all(math.isfinite(w) and w >= 0 for w in weights)
    if not valid or sum(weights) <= 0:
        raise ValueError(f"level_weights needs {len(LEVELS)} finite weights >= 0, not all 0: {level_weights}")
    return weights


def _level_sequence(n: int, weights: list[float], rng: random.Random) -> list[str]:
    """Exact per-level counts (largest remainder), shuffled: a 2000-problem set has exactly 400 per level."""
    quotas = [n * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(LEVELS)), key=lambda i: counts[i] - quotas[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    levels = [level for level, count in zip(LEVELS, counts, strict=True) for _ in range(count)]
    rng.shuffle(levels)
    return levels


def _draw_problem(rng: random.Random, level: str, split: str, seen: set[str], *, uid: str) -> Problem:
    """Rejection-sample arithmetic of this level owned by this split, worded unlike any text in `seen`."""
    for _ in range(100_000):
        arithmetic = _draw_arithmetic(rng, level)
        if arithmetic is None or difficulty_level(*arithmetic) != level:
            continue
        text = _word_problem(rng, arithmetic)
        if split_of(text) == split and text not in seen:
            answer = str(_evaluate(arithmetic))
            return Problem(uid=uid, problem=text, answer=answer, level=level, solution=_solution(arithmetic))
    raise ValueError(f"could not draw another distinct level-{level} {split} problem; ask for fewer")


def _draw_arithmetic(rng: random.Random, level: str) -> Arithmetic | None:
    """Operands of the level's shape and random operators; None when a partial result would be negative."""
    shape = rng.choice(SHAPES[level])
    operands = [_draw_number(rng, rng.choice(digits)) for digits in shape]
    ops = tuple(rng.choice("+-") for _ in operands[1:])
    if len(operands) == 2 and ops == ("-",):
        operands.sort(reverse=True)  # same digit count, so sorting keeps the shape
    arithmetic = (tuple(operands), ops)
    return None if min(_running_totals(arithmetic)) < 0 else arithmetic


def _draw_number(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits; one-digit numbers start at 2 so no text says "1 pens"."""
    return rng.randint(2 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _running_totals(arithmetic: Arithmetic) -> list[int]:
    operands, ops = arithmetic
    totals = [operands[0]]
    for op, x in zip(ops, operands[1:], strict=True):
        totals.append(totals[-1] + x if op == "+" else totals[-1] - x)
    return totals


def _evaluate(arithmetic: Arithmetic) -> int:
    return _running_totals(arithmetic)[-1]


def _word_problem(rng: random.Random, arithmetic: Arithmetic) -> str:
    operands, ops = arithmetic
    who = rng.randrange(len(NAMES))
    name, pronoun = NAMES[who], PRONOUNS[who % 2]
    thing = rng.choice(OBJECTS)
    steps = [
        f"{pronoun} {rng.choice(GAIN if op == '+' else LOSS).format(n=x)}."
        for op, x in zip(ops, operands[1:], strict=True)
    ]
    return " ".join(
        [f"{name} has {operands[0]} {thing}.", *steps, f"How many {thing} does {pronoun.lower()} have now?"]
    )


def _solution(arithmetic: Arithmetic) -> str:
    operands, ops = arithmetic
    totals = _running_totals(arithmetic)  # [t0, t1, ...]: line i is "t_i op x = t_{i+1}."
    steps = zip(totals[:-1], ops, operands[1:], totals[1:], strict=True)
    lines = [f"{before} {op} {x} = {after}." for before, op, x, after in steps]
    return "\n".join([*lines, f"\\boxed{{{totals[-1]}}}"])
