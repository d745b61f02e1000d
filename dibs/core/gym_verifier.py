"""The reward of reasoning-gym tasks: each task's own scorer, run like math-verify behind the process pool.

A reasoning-gym problem (``dibs.data.gym``) carries a reference to its generator's entry (task, seed, size,
options, index) and its answer as its gold; a worker regenerates the entry and scores with that dataset's own
``score_answer``, so the scorer sees what it was written for, with the settings it was generated with: countdown
checks that the expression uses the given numbers and hits the target, chain_sum compares numbers. The
completion's answer is the content of its last ``<answer>...</answer>`` (reasoning-gym's own convention, its
``extract_answer``), and

    r_i = 1  if the task's ``score_answer(answer_i, entry_i)`` >= ``accept_at`` (1.0: full credit),
    r_i = 0  otherwise.

Statuses are the math verifier's (``dibs.core.verifier.STATUSES``): ``exact`` (the answer is the gold answer's
string, no subprocess), ``verified`` / ``rejected`` (the scorer's verdict), ``no_answer`` (no closed answer
tag), ``too_long``, ``timeout`` (the scorer ran past ``timeout_s``, or the pool's hard limit) and ``error`` (the
scorer raised, or its worker died). reasoning-gym is imported by the workers only, once each at start-up.

The math verifier's pool handling applies unchanged (``start()``, one pool for the run, the outcome cache). A
cached outcome is keyed on all a worker is sent (``_task_args``): the answer, the whole task reference (task,
seed, size, options, index, answer), ``timeout_s`` and ``accept_at``, so one answer to two entries is two keys.
"""

from __future__ import annotations

import functools
import json
import re
import signal
from typing import Any

from dibs.core.verifier import MathVerifier

__all__ = ["GymVerifier", "extract_tagged"]

_ANSWER = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


class _ScorerTimeout(BaseException):
    """Not an Exception: scorers that catch every Exception (countdown's does) must not swallow the timeout."""


def extract_tagged(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``, stripped; None without a closed tag.

    >>> extract_tagged("<answer>1</answer> no, <answer> 12 </answer>")
    '12'
    >>> extract_tagged("<answer>12") is None
    True
    """
    matches = list(_ANSWER.finditer(text))
    return matches[-1].group(1).strip() if matches else None


_KEYS = ("task", "seed", "size", "options", "index", "answer")


def read_gold(gold: str) -> dict[str, Any]:
    """The reference a reasoning-gym problem carries (``_KEYS``), or a clear error."""
    try:
        item = json.loads(gold)
        if not all(k in item for k in _KEYS):
            raise KeyError
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"reward=reasoning_gym scores reasoning-gym problems (data=reasoning_gym); this gold is not one: "
            f"{gold[:60]!r}"
        ) from None
    return item


def _init_worker() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as the math verifier's workers: the hard limit acts at once
    import reasoning_gym  # noqa: F401  (its registry of tasks, imported once per worker)


def _alarm(signum: int, frame: Any) -> None:
    raise _ScorerTimeout


@functools.lru_cache(maxsize=16)
def _dataset(task: str, seed: int, size: int, options: str) -> Any:
    """The generator's dataset, built once per worker (items are generated on demand, by index)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(task, seed=seed, size=size, **json.loads(options))


@functools.lru_cache(maxsize=4096)
def _entry(task: str, seed: int, size: int, options: str, index: int) -> Any:
    return _dataset(task, seed, size, options)[index]


def _gym_check(answer: str, gold: str, timeout_s: int, accept_at: float) -> str:
    """Status of one answer by its task's scorer, within ``timeout_s`` (SIGALRM, the worker's main thread)."""
    ref = json.loads(gold)
    key = (ref["task"], ref["seed"], ref["size"], json.dumps(ref["options"], sort_keys=True))
    try:  # regenerated outside the scorer's time limit (the pool's hard limit still bounds it), once per entry
        dataset, entry = _dataset(*key), _entry(*key, ref["index"])
    except Exception:
        return "error"
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    try:
        score = dataset.score_answer(answer, entry)
    except _ScorerTimeout:
        return "timeout"
    except Exception:  # a scorer that raises on a malformed answer: counted, never a crash
        return "error"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return "verified" if float(score) >= accept_at else "rejected"


class GymVerifier(MathVerifier):
    """Scores completions of reasoning-gym problems with each task's own scorer (module docstring). The
    settings are the ``reward`` group's (``conf/reward/reasoning_gym.yaml``); none has a default here."""

    _check_fn = staticmethod(_gym_check)
    _init_fn = staticmethod(_init_worker)

    def __init__(
        self,
        *,
        num_workers: int,
        timeout_s: int,
        hard_timeout_s: float,
        max_answer_chars: int,
        accept_at: float,
        cache_size: int = 100_000,
    ) -> None:
        super().__init__(
            num_workers=num_workers,
            timeout_s=timeout_s,
            hard_timeout_s=hard_timeout_s,
            max_answer_chars=max_answer_chars,
            cache_size=cache_size,
        )
        if not 0 < accept_at <= 1:
            raise ValueError(f"accept_at={accept_at} must be in (0, 1] (a task's score of a right answer is 1)")
        self.accept_at = float(accept_at)

    def _triage(self, completion: str, gold: str) -> tuple[str | None, str, str]:
        expected = str(read_gold(gold)["answer"]).strip()
        answer = extract_tagged(completion)
        if answer is None:
            return "no_answer", "", gold
        if answer == expected:
            return "exact", answer, gold
        if len(answer) > self.max_answer_chars:
            return "too_long", answer, gold
        return None, answer, gold

    def format_answer(self, answer: str) -> str:
        return f"<answer>{answer}</answer>"

    def _task_args(self, answer: str, gold: str) -> tuple[Any, ...]:
        # also the cache's key (MathVerifier._cache_key): whatever changes the scorer's verdict belongs here
        return (answer, gold, self.timeout_s, self.accept_at)
