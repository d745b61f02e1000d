r"""Evaluation metrics, pure numpy (docs/method.md): Average@k, unbiased pass@k, maj@k, suite averages.

For one problem with n samples, rewards r_1..r_n in {0, 1}, c = sum_j r_j of them correct:

    Average@n = c / n                                  mean verifier score over the n samples
    pass@k    = 1 - C(n - c, k) / C(n, k)              Chen et al. 2021, unbiased for k <= n
    maj@n     = correctness of the most frequent final answer (ties: fraction of tied answers correct)

A benchmark's number is the mean over its problems; a suite's ("3-average", "5-average") is the unweighted
mean over its benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dibs.core.verifier import normalize

__all__ = ["level_index", "pass_at_k", "majority_vote", "suite_averages"]


def level_index(levels: Sequence[str], all_levels: Sequence[str]) -> np.ndarray:
    """[P] int: the position of each problem's level in ``all_levels``; an unknown level is an error.

    >>> level_index(["2", "1", "2"], ["1", "2", "3"]).tolist()
    [1, 0, 1]
    """
    column = {level: i for i, level in enumerate(all_levels)}
    unknown = sorted({lv for lv in levels if lv not in column})
    if unknown:
        raise ValueError(f"unknown difficulty level(s) {unknown}; the benchmark's levels are {list(all_levels)}")
    return np.array([column[lv] for lv in levels], dtype=np.int64)


def pass_at_k(n: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    r"""[P] unbiased pass@k per problem (Chen et al. 2021): the chance that k of the n samples, drawn without
    replacement, hold at least one of the c correct ones.

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    The product form never builds the huge binomials (C(512, 256) overflows a float); it is 1.0 exactly
    where n - c < k (every draw of k hits a correct one). ``n`` may be a scalar shared by all problems.

    >>> pass_at_k(np.array([4, 4, 4]), np.array([0, 1, 3]), 2).tolist()   # 0, 1 - 3/6, 1 (n - c = 1 < 2)
    [0.0, 0.5, 1.0]
    """
    n, c = np.broadcast_arrays(np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64))  # [P], [P]
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    bad = np.flatnonzero((n < k) | (c < 0) | (c > n))
    if bad.size:
        p = int(bad[0])
        raise ValueError(f"pass@{k}: problem {p} has n={n[p]} samples, c={c[p]} correct; need 0 <= c <= n, k <= n")
    i = np.arange(1, int(n.max(initial=0)) + 1, dtype=np.float64)  # [N]
    in_range = (i > (n - c)[..., None]) & (i <= n[..., None])  # [P, N]
    factors = np.where(in_range, 1.0 - k / i, 1.0)  # [P, N]
    return np.where(n - c < k, 1.0, 1.0 - factors.prod(axis=-1))  # [P]


def majority_vote(answers: Sequence[str | None], rewards: Sequence[float]) -> float:
    r"""maj@k of one problem: the correctness of the most frequent final answer among its k samples.

    Answers are compared after ``normalize``: ``$\frac12$`` and ``\frac12`` vote together, but equal values
    spelled differently (``\frac{1}{2}``, ``0.5``) vote apart, as string voting does. A sample with
    no answer (None, or nothing left after normalising) does not vote, and no vote at all scores 0. An
    answer's correctness is the max reward of the samples that gave it (the verifier is deterministic, so
    they agree; max is the safe side). A tie between m answers scores (number of them correct) / m: the
    expected score of a uniformly random tie-break, so it is unbiased like a random choice yet does not
    depend on a seed or on the samples' order, as "first answer wins" would.

    >>> majority_vote(["4", "$4$", "5", None], [1.0, 1.0, 0.0, 0.0])   # "4" has 2 votes, "5" has 1
    1.0
    >>> majority_vote(["4", "5"], [1.0, 0.0])                          # a tie, one of the two right
    0.5
    """
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers but {len(rewards)} rewards")
    votes: dict[str, int] = {}
    correct: dict[str, float] = {}
    for answer, reward in zip(answers, rewards):
        key = normalize(answer) if answer is not None else ""
        if key:
            votes[key] = votes.get(key, 0) + 1
            correct[key] = max(correct.get(key, 0.0), float(reward))
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [key for key, count in votes.items() if count == top]
    return sum(correct[key] for key in tied) / len(tied)


def suite_averages(scores: Mapping[str, float], groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Each group's unweighted mean over its benchmarks (the paper averages benchmark scores, not problems),
    for the groups whose benchmarks all have a score; the others are left out.

    >>> suite_averages({"a": 0.25, "b": 0.75}, {"ab": ["a", "b"], "abc": ["a", "b", "c"]})
    {'ab': 0.5}
    """
    out = {}
    for name, members in groups.items():
        if not members:
            raise ValueError(f"benchmark group {name!r} is empty")
        if all(m in scores for m in members):
            out[name] = float(np.mean([scores[m] for m in members]))
    return out
