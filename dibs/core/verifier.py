r"""Binary correctness reward: the one reward path for all data, synthetic or real.

    r_i = 1  if the last \boxed{...} (or \fbox{...}) of completion i is mathematically equal to gold_i,
    r_i = 0  otherwise,

where equality is an exact match after light normalisation or, failing that, ``math_verify.verify``.
A sample is accepted by the E-step (rejection sampling, RAFT / GVM-RAFT) iff r_i > 0.5 (paper Sec. 3). A
gold containing \boxed{} (Minerva's answers are full solutions) is reduced to its last boxed value too. A lone
number set as text (AIME's ``\textbf{(073)}``) is handed to math-verify as that number; every other rendering
question (``\dfrac``, degrees, ``\$``, thousands separators, units, matrices) is math-verify's own.

Failure accounting (the reference scored failures 0 silently): every item gets exactly one status from
``STATUSES``, and the E-step logs the count of each (``reward/<status>``). Only exact/verified pay 1.
  exact        normalised strings equal; no subprocess
  verified     math-verify says equal
  rejected     both sides parsed to maths, math-verify says different
  no_answer    no closed \boxed{} in the completion
  too_long     boxed answer longer than ``max_answer_chars`` (and not an exact match); never sent on
  parse_error  gold or answer did not parse to maths (parse raised, found nothing, or only kept the raw
               string) and the raw strings differ
  timeout      math-verify's own SIGALRM timeout (parse or compare), or the pool's hard limit
  error        a comparison raised, or the worker died for a reason other than the hard limit

math-verify runs in a ``pebble.ProcessPool`` (forkserver) so a worker stuck past ``hard_timeout_s`` is
killed and replaced. One verifier serves a whole run: ``start()`` launches its workers in the background as the
run begins (each imports math-verify while the warm start and the model build go on), the pool then lives across
E-steps and evaluations until ``close()``. Only answers the exact path cannot decide reach a worker: a batch sends
each distinct (answer, gold, settings) once, and a bounded LRU cache keeps the deterministic outcomes (verified,
rejected, parse_error) for the verifier's lifetime, so a pair seen before never goes again; a timeout or an
error is never cached (it may depend on the load) and is tried again next time.

math-verify's own timeout is SIGALRM: integer seconds, main thread only (pebble runs tasks in
the worker's main thread). With ``raise_on_error=True`` both ``parse`` and ``verify`` re-raise its
``TimeoutException`` (a BaseException) instead of logging and returning []/False, which is what lets a
timeout be told apart from a plain rejection. Code that swallows BaseException, or a C call that never
returns to the interpreter (gmpy2-backed sympy integers may be one; pure-Python ones check for signals),
defeats SIGALRM: the hard limit covers those, and reports them as "timeout" too.

Over 350 lines on purpose: the worker-side functions must be importable by name from this module (the pool
pickles them by reference), and the pool, its early start and the outcome cache are one object's state.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from itertools import product
from typing import Any, NamedTuple

import numpy as np

STATUSES = ("exact", "verified", "rejected", "no_answer", "too_long", "parse_error", "timeout", "error")
_PAYS = frozenset({"exact", "verified"})
# A worker's outcomes that depend only on what it is sent: cached. "timeout" and "error" may depend on the load
# (a busy machine, a worker killed for memory) and are tried again.
_DETERMINISTIC = frozenset({"verified", "rejected", "parse_error"})

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_DEPTH = {"{": 1, "}": -1}
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# \left( -> (, spacing commands and whitespace dropped; the lookahead keeps \leftarrow intact.
_NOISE = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;: ]|\s+")
# A whole answer that is one number set as text, e.g. AIME's \textbf{(073)}: math-verify reads the text as the
# *symbol* "073", equal to no number. Only a lone (optionally parenthesised) number is unwrapped, so
# "\text{(A) }12", "\text{(1, 2)}" or "5\text{ cm}" keep their meaning.
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_TEXT_NUMBER = re.compile(
    rf"\s*\\(?:text|textbf|textrm|textnormal|mbox|mathrm|mathbf)\s*\{{\s*(\(\s*{_NUMBER}\s*\)|{_NUMBER})\s*\}}\s*"
)


@dataclass(frozen=True)
class VerifyResult:
    rewards: np.ndarray  # [N] float32 in {0.0, 1.0}
    status: tuple[str, ...]  # [N] each one of STATUSES


class CacheInfo(NamedTuple):
    """``hits``: items a worker would have decided, answered by the cache or by an identical item of the same batch;
    ``misses``: items sent to a worker; ``size`` of ``max_size`` entries held."""

    hits: int
    misses: int
    size: int
    max_size: int


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` / ``\fbox{...}``, braces balanced; None if absent or unclosed.

    >>> extract_boxed(r"so \boxed{1} or rather \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    >>> extract_boxed(r"\boxed{\frac{1}{}") is None
    True
    """
    opens = list(_BOX_OPEN.finditer(text))
    if not opens:
        return None
    start = i = opens[-1].end()
    depth = 1
    while i < len(text):
        if text[i] == "\\":  # \{ and \} are literal braces (sets), not grouping: skip the pair
            i += 2
            continue
        depth += _BRACE_DEPTH.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip()
        i += 1
    return None


def normalize(answer: str) -> str:
    r"""Light normalisation for the exact path: drop ``$``, ``\left``/``\right``, spacing, a final ``.``.

    >>> normalize(r" $\left( 1, \!2 \right)$. ")
    '(1,2)'
    """
    return _NOISE.sub("", _UNESCAPED_DOLLAR.sub("", answer)).removesuffix(".")


_PLAIN_ANSWER = re.compile(r"^[ -~]*$")  # printable ASCII: LaTeX and plain numbers, which math-verify reads


def gold_is_readable(gold: str, timeout_s: int = 2) -> bool:
    """Whether math-verify can read a gold answer as mathematics (checked once per gold at load time).

    Printable-ASCII golds (numbers, LaTeX) are taken as readable without parsing, which keeps a large pool's
    check instant; a gold with other characters (``½``, ``√2``, full-width digits) is parsed in this process.
    Such a gold can still be matched by an answer written exactly alike, but never by an equivalent one."""
    answer = extract_boxed(gold)
    answer = gold.strip() if answer is None else answer
    if _PLAIN_ANSWER.match(answer):
        return True
    try:
        return _has_maths(_parse(answer, timeout_s))
    except Exception:
        return False


def _triage(completion: str, gold: str, max_answer_chars: int) -> tuple[str | None, str, str]:
    """(status or None if math-verify must decide, answer, gold answer) without leaving this process."""
    gold_answer = extract_boxed(gold)
    gold_answer = gold.strip() if gold_answer is None else gold_answer
    answer = extract_boxed(completion)
    if answer is None:
        return "no_answer", "", gold_answer
    # Exact first: a long answer identical to a long gold is correct, and costs no subprocess.
    norm = normalize(answer)
    if norm and norm == normalize(gold_answer):
        return "exact", answer, gold_answer
    if len(answer) > max_answer_chars:
        return "too_long", answer, gold_answer
    return None, answer, gold_answer


# ---------------------------------------------------------------- worker side (runs in the pool)


def _ready() -> bool:
    """The task ``start()`` sends: it runs once a worker has finished its initializer."""
    return True


def _init_worker() -> None:
    # pebble's SIGTERM handler is Python code, which never runs while the worker is stuck in a C loop;
    # pebble then waits 3 s before SIGKILL. The default action makes the hard limit take effect at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import math_verify  # noqa: F401  (pay the ~0.7 s import here, outside any task's time limit)

    # math-verify's and sympy's first-use costs (~0.4 s: the LaTeX grammar, sympy's simplification) paid here too,
    # so a started pool's first real batch runs at the warm pace.
    for answer, gold in ((r"\frac{1}{2}", "0.5"), ("x+1", "1+x")):
        _check(answer, gold, 2)


@functools.lru_cache(maxsize=1024)
def _parse(latex: str, timeout_s: int) -> tuple[Any, ...]:
    """math-verify parse of one answer; raises TimeoutException / Exception (never cached)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # "$...$" rather than "\boxed{...}": the boxed normaliser loses e.g. 10\% (measured, math-verify 0.9).
    text = "$" + _unwrap_text_number(_UNESCAPED_DOLLAR.sub("", latex)) + "$"
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    return tuple(parse(text, configs, parsing_timeout=timeout_s, raise_on_error=True))


def _unwrap_text_number(latex: str) -> str:
    r"""``\textbf{(073)}`` -> ``(073)``: a lone number set as text is that number; anything else unchanged.

    >>> _unwrap_text_number(r"\textbf{(073)}"), _unwrap_text_number(r"\text{(A) }12")
    ('(073)', '\\text{(A) }12')
    """
    match = _TEXT_NUMBER.fullmatch(latex)
    return latex if match is None else match.group(1)


def _compare(gold: tuple[Any, ...], pred: tuple[Any, ...], timeout_s: int) -> str:
    """verify() pair by pair as math-verify does, but keeping timeouts and errors apart from False."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    outcomes = set()
    for g, p in product(gold, pred):
        try:
            if verify(g, p, timeout_seconds=timeout_s, raise_on_error=True):
                return "verified"
            outcomes.add("rejected")
        except TimeoutException:
            outcomes.add("timeout")
        except Exception:  # math-verify's own default maps this to False; we count it
            outcomes.add("error")
    if "timeout" in outcomes:
        return "timeout"
    if not (_has_maths(gold) and _has_maths(pred)):  # only the raw-string fallback survived parsing
        return "parse_error"
    return "error" if "error" in outcomes else "rejected"


def _has_maths(parsed: tuple[Any, ...]) -> bool:
    return any(not isinstance(x, str) for x in parsed)


def _check(answer: str, gold: str, timeout_s: int) -> str:
    """Status of one (answer, gold) pair: verified / rejected / parse_error / timeout / error."""
    from math_verify.errors import TimeoutException

    try:
        gold_parsed, pred_parsed = _parse(gold, timeout_s), _parse(answer, timeout_s)
    except TimeoutException:
        return "timeout"
    except Exception:  # any parser failure is a parse_error, never a crash
        return "parse_error"
    if not gold_parsed or not pred_parsed:
        return "parse_error"
    return _compare(gold_parsed, pred_parsed, timeout_s)


# ---------------------------------------------------------------- parent side


def _collect(future: Any) -> str:
    """Status from one pool future; the pool's hard limit surfaces here as a TimeoutError."""
    try:
        status = future.result()
    except FutureTimeout:
        return "timeout"
    except Exception:  # pebble.ProcessExpired (segfault, OOM kill) or a failure inside the worker
        return "error"
    return status if status in STATUSES else "error"


class MathVerifier:
    """Scores completions against golds; see the module docstring for the reward and the statuses.

    ``num_workers`` processes verify in parallel; each comparison or parse gets math-verify's own
    ``timeout_s`` (integer seconds), and a task running past ``hard_timeout_s`` is killed by the pool. The settings
    are the ``reward`` group's (``conf/reward/math_verify.yaml``); none has a default here but ``cache_size``, the
    most (answer, gold) outcomes kept (least recently used dropped first; 0: no cache, and a batch's identical items
    each go to a worker, as before the cache).
    """

    _check_fn: Callable[..., str] = staticmethod(_check)  # the workers' function, picklable by name
    _init_fn: Callable[[], None] = staticmethod(_init_worker)  # each worker's start: imports paid up front

    def __init__(
        self,
        *,
        num_workers: int,
        timeout_s: int,
        hard_timeout_s: float,
        max_answer_chars: int,
        cache_size: int = 100_000,
    ) -> None:
        if float(timeout_s) != int(timeout_s) or int(timeout_s) < 1:
            # SIGALRM takes whole seconds: a float makes math-verify's parse fail on every item.
            raise ValueError(f"timeout_s must be a whole number of seconds >= 1, got {timeout_s!r}")
        if not hard_timeout_s > timeout_s:
            raise ValueError(f"hard_timeout_s ({hard_timeout_s}) must exceed timeout_s ({timeout_s})")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.num_workers = int(num_workers)
        self.timeout_s = int(timeout_s)
        self.hard_timeout_s = float(hard_timeout_s)
        self.max_answer_chars = int(max_answer_chars)
        self.cache_size = int(cache_size)
        self._reset()

    def _reset(self) -> None:
        """No pool, no cache: a new verifier's state, and a copy's."""
        self._pool: Any = None
        self._owner: int | None = None  # the process that made the pool (a forked child must make its own)
        self._starter: threading.Thread | None = None  # start()'s launch of the workers
        self._started: Any = None  # the future of start()'s first task: done once a worker has imported math-verify
        self._cache: OrderedDict[Hashable, str] = OrderedDict()
        self._hits = self._misses = 0

    def start(self) -> MathVerifier:
        """Start the workers now, without waiting for them; returns self.

        The pool is made here (no process yet) and a background thread launches its processes, each of which
        imports math-verify in its initializer, so the start-up overlaps whatever the caller does next (the warm
        start, the model build, the first generation). A ``score()`` before they are up waits only for the rest
        of the start. Does nothing when a pool already runs; after ``close()`` it starts a new one."""
        if self._pool is not None and self._owner == os.getpid():
            return self
        pool = self._get_pool()  # a new pool: pebble launches the processes at its first task
        self._starter = threading.Thread(target=self._launch, args=(pool,), name="verifier-start", daemon=True)
        self._starter.start()
        return self

    def _launch(self, pool: Any) -> None:
        try:
            self._started = pool.schedule(_ready)  # starts the pool: the processes, then each one's initializer
        except Exception:  # stopped meanwhile, or it could not start: a later score() starts or reports it
            pass

    def ready(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds) until ``start()``'s workers are up; False if not started or not up."""
        starter = self._starter
        if starter is None:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        starter.join(timeout)
        if self._started is None:
            return False
        try:
            self._started.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except Exception:
            return False
        return True

    def score(self, completions: Sequence[str], golds: Sequence[str]) -> VerifyResult:
        """Reward and status per item, in input order."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        triaged = [self._triage(c, g) for c, g in zip(completions, golds, strict=True)]
        status = [s for s, _, _ in triaged]
        pending = [i for i, s in enumerate(status) if s is None]
        for i, s in zip(pending, self._decide([triaged[i][1:] for i in pending]), strict=True):
            status[i] = s
        rewards = np.array([s in _PAYS for s in status], dtype=np.float32)  # [N]
        return VerifyResult(rewards=rewards, status=tuple(status))

    def _triage(self, completion: str, gold: str) -> tuple[str | None, str, str]:
        """(status, or None when a worker must decide; the answer; the gold as the worker gets it)."""
        return _triage(completion, gold, self.max_answer_chars)

    def format_answer(self, answer: str) -> str:
        """A response that states ``answer`` the way this verifier reads it: the warm start's target for a
        problem without a worked solution."""
        return f"\\boxed{{{answer}}}"

    def _task_args(self, answer: str, gold: str) -> tuple[Any, ...]:
        return (answer, gold, self.timeout_s)

    def _cache_key(self, answer: str, gold: str) -> Hashable:
        """Everything that decides a worker's outcome: its function and all it is sent (the answer, the gold as the
        worker gets it, the time limit; a subclass's own settings through its ``_task_args``)."""
        return (self._check_fn, *self._task_args(answer, gold))

    def _decide(self, items: list[tuple[str, str]]) -> list[str]:
        """Statuses of the items the exact path left open: from the cache, else from a worker, once per distinct
        key; the deterministic outcomes are remembered."""
        if not self.cache_size:
            return self._verify(items)
        keys = [self._cache_key(answer, gold) for answer, gold in items]
        known: dict[Hashable, str] = {}
        todo: dict[Hashable, tuple[str, str]] = {}
        for key, item in zip(keys, items, strict=True):
            if key in known or key in todo:
                continue
            cached = self._cache.get(key)
            if cached is None:
                todo[key] = item
            else:
                self._cache.move_to_end(key)
                known[key] = cached
        for key, status in zip(todo, self._verify(list(todo.values())), strict=True):
            known[key] = status
            if status in _DETERMINISTIC:
                self._cache[key] = status
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        self._misses += len(todo)
        self._hits += len(items) - len(todo)
        return [known[key] for key in keys]

    def cache_info(self) -> CacheInfo:
        """Hits and misses so far (items the exact path left open), and the cache's fill."""
        return CacheInfo(self._hits, self._misses, len(self._cache), self.cache_size)

    def _verify(self, items: list[tuple[str, str]]) -> list[str]:
        """All items scheduled at once, so the worst case is ~len(items) / num_workers hard limits."""
        if not items:
            return []
        pool = self._get_pool()
        futures = [
            pool.schedule(self._check_fn, args=self._task_args(answer, gold), timeout=self.hard_timeout_s)
            for answer, gold in items
        ]
        return [_collect(f) for f in futures]

    def _get_pool(self) -> Any:
        from pebble import ProcessPool

        if self._pool is not None and self._owner != os.getpid():  # inherited through a fork: the parent's pool
            self._pool = self._starter = self._started = None
        if self._pool is not None and not self._pool.active:  # pebble stopped it after an internal error
            self.close()
        if self._pool is None:
            # forkserver: workers fork from a small single-threaded server, never from this process
            # (which may hold torch threads or CUDA). On CPython 3.11 it starts workers no faster than
            # spawn: each still re-imports the launching script's top level (3.11's forkserver never
            # preloads __main__), so keep train.py's module-level imports light.
            context = multiprocessing.get_context("forkserver")
            self._pool = ProcessPool(self.num_workers, initializer=self._init_fn, context=context)
            self._owner = os.getpid()
        return self._pool

    def close(self) -> None:
        """Stop the workers (idempotent); a later score() or start() starts a new pool. The cache stays."""
        if self._starter is not None:
            self._starter.join()  # the launch under way, if any (pebble cannot stop a pool half-started)
            self._starter = self._started = None
        if self._pool is not None:
            if self._owner == os.getpid():
                self._pool.stop()
                self._pool.join()
            self._pool = None

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # A pool (threads, pipes) cannot be pickled or deep-copied; the copy starts its own lazily, with an
        # empty cache (a checkpoint never carries one).
        state = dict(self.__dict__)
        for name in ("_pool", "_owner", "_starter", "_started", "_cache", "_hits", "_misses"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()
