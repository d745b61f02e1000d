"""MathVerifier: exact path, math-verify path, failure statuses, time limits, pool recovery, early start, cache."""

import copy
import doctest
import itertools
import json
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from dibs.core import verifier as verifier_module
from dibs.core.verifier import STATUSES, MathVerifier, _check, _unwrap_text_number, extract_boxed

TIMEOUT_S, HARD_TIMEOUT_S = 1, 3.0
REWARD = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/reward/math_verify.yaml"))
REWARD.pop("_target_")


def make(**overrides) -> MathVerifier:
    """The verifier with conf/reward/math_verify.yaml's settings (their only home) and ``overrides``."""
    return MathVerifier(**{**REWARD, **overrides})


def _stuck_or_check(answer: str, gold: str, timeout_s: int) -> str:
    """Worker stand-in (picklable by reference): hangs on marker answers, otherwise the real check."""
    if answer == "SLEEP":  # stuck in Python: pebble's own SIGTERM handler could stop it
        time.sleep(3600)
    if answer == "SPIN":  # stuck in C, never back in the interpreter: no Python handler (nor SIGALRM) runs
        any(itertools.repeat(0))
    return _check(answer, gold, timeout_s)


@pytest.fixture(scope="module")
def verifier():
    with make(num_workers=2, timeout_s=TIMEOUT_S, hard_timeout_s=HARD_TIMEOUT_S) as v:
        yield v


def _one(v: MathVerifier, completion: str, gold: str) -> tuple[str, float]:
    out = v.score([completion], [gold])
    return out.status[0], float(out.rewards[0])


# ---------------------------------------------------------------- pure parts


def test_docstring_examples():
    assert doctest.testmod(verifier_module).failed == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{ \frac{a}{\sqrt{b}} }", r"\frac{a}{\sqrt{b}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\boxed{5}}", "5"),  # the last opening is the inner one
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\left\{ 1 \right.}", r"\left\{ 1 \right."),  # escaped braces are not grouping
        (r"\boxed{\frac{1}{}", None),  # unclosed: no answer at all
        ("the answer is 12", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@given(
    body=st.text(alphabet="0123456789+-x^() ", max_size=20),
    prefix=st.text(alphabet="abc {}\\", max_size=20),
    suffix=st.text(alphabet="abc. ", max_size=20),
)
def test_extract_boxed_takes_the_last_box_whatever_precedes_it(body, prefix, suffix):
    assert extract_boxed(prefix + r"\boxed{" + body + "}" + suffix) == body.strip()


@pytest.mark.parametrize(
    ("latex", "expected"),
    [
        (r"\textbf{(073)}", "(073)"),  # AIME's house style
        (r" \text{ -5 } ", "-5"),
        (r"\mathbf{0.5}", "0.5"),
        (r"\text{(A) }12", r"\text{(A) }12"),  # a choice and a value: not one number
        (r"\text{(1, 2)}", r"\text{(1, 2)}"),
        (r"\text{(12}", r"\text{(12}"),  # unbalanced
        (r"5\text{ cm}", r"5\text{ cm}"),  # only a whole answer is unwrapped
        (r"\text{(C)}", r"\text{(C)}"),
    ],
)
def test_unwrap_text_number(latex, expected):
    assert _unwrap_text_number(latex) == expected


def test_import_is_light():
    heavy = "{'math_verify', 'pebble', 'sympy', 'torch'}"
    code = f"import sys, dibs.core.verifier; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_validation():
    with pytest.raises(ValueError, match="whole number"):
        make(timeout_s=1.5)  # SIGALRM takes whole seconds
    with pytest.raises(ValueError, match="exceed"):
        make(timeout_s=2, hard_timeout_s=2.0)
    assert make(timeout_s=2.0).timeout_s == 2  # YAML may hand over 2.0


# ---------------------------------------------------------------- no subprocess


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"\boxed{42}", "42"),
        (r"\boxed{ 42 }", "42"),
        (r"$\boxed{42}$.", " 42. "),
        (r"\fbox{-3}", "$-3$"),
        (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
        (r"Thus \boxed{\frac{1}{2}}", r"We get $x = \frac12$, so the answer is $\boxed{\frac{1}{2}}$."),
    ],
)
def test_exact_path_needs_no_pool(completion, gold):
    v = make()
    assert _one(v, completion, gold) == ("exact", 1.0)
    assert v._pool is None


def test_no_answer_and_too_long_never_reach_the_pool():
    v = make(max_answer_chars=8)
    out = v.score(["no box here: 42", r"\boxed{\frac{1}{}", r"\boxed{123456789}"], ["42", "1", "1"])
    assert out.status == ("no_answer", "no_answer", "too_long")
    assert out.rewards.tolist() == [0.0, 0.0, 0.0]
    assert v._pool is None


def test_empty_batch_and_mismatched_lengths():
    out = make().score([], [])
    assert out.rewards.shape == (0,) and out.status == () and len(out.status) == 0
    with pytest.raises(ValueError):
        make().score([r"\boxed{1}"], [])


# ---------------------------------------------------------------- math-verify path


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", "verified"),
        (r"\boxed{\dfrac{3}{4}}", "3/4", "verified"),
        (r"\boxed{x+1}", "1+x", "verified"),
        (r"\boxed{10\%}", "10", "verified"),
        (r"\boxed{7}", "8", "rejected"),
        (r"\boxed{x+2}", "1+x", "rejected"),
        (r"\boxed{\frac{}{}}", "1", "parse_error"),  # parses to nothing but the raw string
        (r"\boxed{}", "1", "parse_error"),
    ],
)
def test_math_verify_path(verifier, completion, gold, expected):
    assert _one(verifier, completion, gold) == (expected, float(expected == "verified"))


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"\boxed{\textbf{(073)}}", "073"),  # AIME 2024 II P1's own solution; was "rejected" (symbol "073")
        (r"\boxed{\textbf{(073)}}", "73"),
        (r"\boxed{073}", r"\textbf{(073)}"),  # the gold side is unwrapped too
        (r"\boxed{\mathbf{0.5}}", r"\frac12"),  # was "rejected"
    ],
)
def test_number_set_as_text_is_that_number(verifier, completion, gold):
    assert _one(verifier, completion, gold) == ("verified", 1.0)


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"\boxed{\textbf{(074)}}", "073"),
        (r"\boxed{\text{(1,2)}}", "12"),  # a pair in text is not unwrapped into a number
        (r"\boxed{\text{(12)}}", "(1,2)"),
        (r"\boxed{\text{-5}}", "5"),
    ],
)
def test_number_set_as_text_keeps_its_value(verifier, completion, gold):
    assert _one(verifier, completion, gold) == ("rejected", 0.0)


# Correct answers written the way a model may write them, against MATH500 golds (math-verify 0.9 handles all of
# these; the rows pin that down so an upgrade or a normalisation change that loses one fails here).
MATH500_RENDERINGS = [
    (r"\frac{17}{50}", r"\dfrac{17}{50}"),
    ("0.34", r"\dfrac{17}{50}"),
    ("90", r"90^\circ"),
    (r"90^{\circ}", r"90^\circ"),
    ("18.90", r"\$18.90"),
    ("10080", r"10,\!080"),
    ("58500", "58,500"),
    ("11111111100", r"11,\! 111,\! 111,\! 100"),
    ("5.4", r"5.4 \text{ cents}"),
    ("864", r"864 \mbox{ inches}^2"),
    ("C", r"\text{(C)}"),
    (r"\textbf{(C)}", r"\text{(C)}"),
    ("Evelyn", r"\text{Evelyn}"),
    (r"\begin{bmatrix} -2 \\ -14 \\ -7 \end{bmatrix}", r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}"),
    (r"\frac{9}{5}", r"1\frac{4}{5}"),  # a mixed number is a sum: 1 + 4/5
    ("5", "x=5"),
    (r"(3, \pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\{-2, 1\pm\sqrt{5}\}", r"\{1\pm\sqrt{5},-2\}"),
]
# Pairs that differ although they look alike: accepting any of them would pay a wrong answer.
KNOWN_DIFFERENT = [
    ("1,2", "12"),  # a pair is not a number with a thousands separator
    ("(1,2)", "12"),
    ("1,2", "1.2"),
    ("3,5", "3.5"),  # no decimal comma
    ("1,000", "1"),
    ("11,111,111,101", r"11,\! 111,\! 111,\! 100"),
    (r"\frac{4}{5}", r"1\frac{4}{5}"),  # a mixed number is not a product
    ("(1,2]", "[1,2)"),
    (r"(\pi/2, 3)", r"\left( 3, \frac{\pi}{2} \right)"),  # tuples are ordered
    (r"(-\infty,2]\cup(3,\infty)", r"(-\infty, 2) \cup (3, \infty)"),
    (r"\{-2, 1+\sqrt{5}\}", r"\{1\pm\sqrt{5},-2\}"),
    (r"\text{(D)}", r"\text{(C)}"),
    (r"\text{odd}", r"\text{even}"),
    ("y=5", "x=5"),
]


def test_math500_renderings_pay_and_look_alikes_do_not(verifier):
    pairs = MATH500_RENDERINGS + KNOWN_DIFFERENT
    out = verifier.score([rf"\boxed{{{a}}}" for a, _ in pairs], [g for _, g in pairs])
    got = dict(zip(pairs, out.status))
    assert {p: s for p, s in got.items() if p in MATH500_RENDERINGS and s != "verified"} == {}
    assert {p: s for p, s in got.items() if p in KNOWN_DIFFERENT and s != "rejected"} == {}


def test_pathological_answer_times_out_then_verifier_still_works(verifier):
    verifier.score([r"\boxed{x+1}"], ["1+x"])  # warm pool: time the item, not the start-up
    start = time.monotonic()
    status, reward = _one(verifier, r"\boxed{9^{9^{9^9}}}", "1")
    elapsed = time.monotonic() - start
    # Pure-Python sympy integers: the power checks for signals, so math-verify's own SIGALRM fires
    # after TIMEOUT_S (measured ~1.03 s) and verify(raise_on_error=True) re-raises its TimeoutException.
    assert (status, reward) == ("timeout", 0.0)
    assert elapsed < HARD_TIMEOUT_S + 3
    assert _one(verifier, r"\boxed{\frac{1}{2}}", "0.5") == ("verified", 1.0)


def test_slow_items_run_in_parallel(verifier):
    verifier.score([r"\boxed{x+1}"] * 2, ["1+x"] * 2)  # both workers up
    start = time.monotonic()
    out = verifier.score([r"\boxed{9^{9^{9^9}}}"] * 4, ["1", "2", "3", "4"])  # 4 pairs: a batch sends each once
    elapsed = time.monotonic() - start
    assert out.status == ("timeout",) * 4
    assert elapsed < 4 * TIMEOUT_S  # 2 workers: ~2 s; one by one would be >= 4 s


def test_mixed_batch_keeps_order_and_counts(verifier):
    completions = [
        r"\boxed{3}",
        "none",
        r"\boxed{\frac{1}{2}}",
        r"\boxed{7}",
        r"\boxed{\frac{}{}}",
        r"\boxed{3}",
    ]
    golds = ["3", "3", "0.5", "8", "1", r"so \boxed{3}"]
    out = verifier.score(completions, golds)
    assert out.status == ("exact", "no_answer", "verified", "rejected", "parse_error", "exact")
    assert out.rewards.dtype == np.float32 and out.rewards.tolist() == [1, 0, 1, 0, 0, 1]
    assert len(out.status) == len(completions) and set(out.status) <= set(STATUSES)


# ---------------------------------------------------------------- hard limit


def test_stuck_workers_are_killed_and_replaced(monkeypatch):
    # Workers unpickle _stuck_or_check by module name: let them import this file however pytest named it.
    monkeypatch.syspath_prepend(str(Path(__file__).parents[__name__.count(".")]))
    monkeypatch.setattr(MathVerifier, "_check_fn", staticmethod(_stuck_or_check))  # the workers run it by name
    with make(num_workers=2, timeout_s=1, hard_timeout_s=2.0) as v:
        v.score([r"\boxed{x+1}"] * 2, ["1+x"] * 2)  # warm pool
        start = time.monotonic()
        out = v.score([r"\boxed{SLEEP}", r"\boxed{SPIN}"], ["1", "1"])
        elapsed = time.monotonic() - start
        assert out.status == ("timeout", "timeout")
        # Both killed at the 2 s limit, in parallel (~2.1 s). SPIN ignores pebble's Python SIGTERM handler;
        # without the worker's SIG_DFL it would take 2 + 3 s (pebble's grace period before SIGKILL).
        assert elapsed < 2.0 + 1.5
        # The replacements work (each pays a fresh worker start-up, outside any time limit).
        out = v.score([r"\boxed{x+1}", r"\boxed{x+2}"], ["1+x", "1+x"])
        assert out.status == ("verified", "rejected")


def test_close_and_copy_restart_the_pool_lazily():
    v = make(timeout_s=1, hard_timeout_s=2.0)
    assert _one(v, r"\boxed{x+1}", "1+x") == ("verified", 1.0)
    twin = copy.deepcopy(v)  # the live pool is not copied, nor the cache (a checkpoint never carries one)
    assert twin._pool is None and twin.cache_info().size == 0 and v.cache_info().size == 1
    v.close()
    v.close()  # idempotent
    assert _one(v, r"\boxed{x+2}", "1+x") == ("rejected", 0.0)
    v.close()


# ---------------------------------------------------------------- early start, one pool, outcome cache


def _slow_init() -> None:
    """Worker initializer stand-in (picklable by reference): a slow start, then the real one."""
    time.sleep(1.0)
    verifier_module._init_worker()


def test_start_returns_at_once_and_score_uses_the_started_pool(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[__name__.count(".")]))  # workers import this file
    monkeypatch.setattr(MathVerifier, "_init_fn", staticmethod(_slow_init))
    with make(timeout_s=1, hard_timeout_s=3.0) as v:
        begun = time.monotonic()
        assert v.start() is v
        assert time.monotonic() - begun < 0.5  # workers take >= 1 s to be up: start() waited for none of it
        pool = v._pool
        assert v.start()._pool is pool  # idempotent while the pool runs
        assert not v.ready(timeout=0.1)  # still importing
        assert v.ready(timeout=30)
        assert _one(v, r"\boxed{x+1}", "1+x") == ("verified", 1.0)
        assert v._pool is pool and v.cache_info().misses == 1  # the started pool decided it
        v.close()
        assert not v.ready() and v._pool is None
        v.start()
        assert v._pool is not None and v._pool is not pool  # after close(), start() makes a new pool
    assert v._pool is None


class _Counting:
    """Stands in for the pool (``MathVerifier._verify``): records what reaches a worker, answers by a rule."""

    def __init__(self, rule=None, real=None):
        self.sent: list[tuple[str, str]] = []
        self.rule, self.real = rule, real

    def __call__(self, items):
        self.sent.extend(items)
        return self.real(items) if self.real is not None else [self.rule(a, g) for a, g in items]


MIXED = [
    (r"\boxed{3}", "3"),  # exact
    ("no box", "3"),  # no_answer
    (r"\boxed{\frac{1}{2}}", "0.5"),  # verified: equivalent, not exact
    (r"\boxed{0.5}", r"\frac12"),  # verified
    (r"\boxed{7}", "8"),  # rejected
    (r"\boxed{\frac{}{}}", "1"),  # parse_error
    (r"\boxed{7}", "8"),  # the same pair again in the batch
    (r"\boxed{7}", "9"),  # the same answer, another gold
    (r"\boxed{\frac{1}{2}}", "0.5"),
]


def test_cache_gives_a_fresh_verifiers_statuses_and_cached_answers_never_reach_a_worker(verifier, monkeypatch):
    completions, golds = [c for c, _ in MIXED], [g for _, g in MIXED]
    cached = verifier  # the module's warm pool, with an empty cache for this test
    for name, empty in (("_cache", OrderedDict()), ("_hits", 0), ("_misses", 0)):
        monkeypatch.setattr(cached, name, empty)
    sent = _Counting(real=cached._verify)
    monkeypatch.setattr(cached, "_verify", sent)
    first = cached.score(completions, golds)
    with make(cache_size=0) as fresh:  # the behaviour before the cache: every open item goes to a worker
        reference = fresh.score(completions, golds)
    assert first.status == reference.status
    assert first.status == ("exact", "no_answer", "verified", "verified", "rejected", "parse_error") + (
        "rejected",
        "rejected",
        "verified",
    )
    assert first.rewards.tolist() == reference.rewards.tolist()
    # exact and no_answer never reach a worker; a pair repeated in the batch goes once
    assert sent.sent == [(r"\frac{1}{2}", "0.5"), ("0.5", r"\frac12"), ("7", "8"), (r"\frac{}{}", "1"), ("7", "9")]
    assert cached.cache_info() == (2, 5, 5, 100_000)  # hits, misses, size, max size
    again = cached.score(completions, golds)
    assert again.status == first.status and again.rewards.tolist() == first.rewards.tolist()
    assert len(sent.sent) == 5  # nothing new reached a worker
    assert cached.cache_info() == (9, 5, 5, 100_000)


def test_timeouts_and_errors_are_not_cached():
    def rule(answer, gold):
        return {"slow": "timeout", "bad": "error"}.get(answer, "rejected")

    v, sent = make(), _Counting(rule)
    v._verify = sent
    batch = [r"\boxed{slow}", r"\boxed{bad}", r"\boxed{fine}", r"\boxed{slow}"]
    assert v.score(batch, ["1"] * 4).status == ("timeout", "error", "rejected", "timeout")
    assert [a for a, _ in sent.sent] == ["slow", "bad", "fine"]  # the repeat within the batch shares its outcome
    assert v.score(batch, ["1"] * 4).status == ("timeout", "error", "rejected", "timeout")
    assert [a for a, _ in sent.sent[3:]] == ["slow", "bad"]  # tried again; "fine" came from the cache
    assert v.cache_info().size == 1 and v._pool is None


def test_cache_is_bounded_least_recently_used_first_and_size_zero_is_the_old_behaviour():
    v, sent = make(cache_size=2), _Counting(lambda a, g: "rejected")
    v._verify = sent
    box = [rf"\boxed{{{a}}}" for a in "abc"]
    v.score(box[:2], ["1", "1"])  # a, b
    v.score(box[:1], ["1"])  # a used again: b is now the oldest
    v.score(box[2:], ["1"])  # c evicts b
    v.score([box[0], box[1]], ["1", "1"])  # a cached, b sent again
    assert [a for a, _ in sent.sent] == ["a", "b", "c", "b"] and v.cache_info().size == 2
    off, sent = make(cache_size=0), _Counting(lambda a, g: "rejected")
    off._verify = sent
    off.score([box[0]] * 3, ["1"] * 3)
    off.score([box[0]], ["1"])
    assert len(sent.sent) == 4 and off.cache_info() == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="cache_size"):
        make(cache_size=-1)


def test_cache_keys_hold_all_a_worker_is_sent():
    assert make(timeout_s=1)._cache_key("1", "2") != make(timeout_s=2)._cache_key("1", "2")
    assert make()._cache_key("1", "2") != make()._cache_key("1", "3")
    from dibs.core.gym_verifier import GymVerifier

    settings = dict(num_workers=1, timeout_s=1, hard_timeout_s=3.0, max_answer_chars=256, accept_at=1.0)

    def gold(index, task="chain_sum"):
        return json.dumps({"task": task, "seed": 0, "size": 10, "options": {}, "index": index, "answer": "5"})

    v, sent = GymVerifier(**settings), _Counting(lambda a, g: "rejected")
    v._verify = sent
    golds = [gold(0), gold(1), gold(0, "countdown"), gold(0)]
    assert v.score(["<answer>4</answer>"] * 4, golds).status == ("rejected",) * 4
    assert [g for _, g in sent.sent] == golds[:3]  # one answer to three task references: three keys
    half = GymVerifier(**{**settings, "accept_at": 0.5})
    assert half._cache_key("4", gold(0)) != v._cache_key("4", gold(0))
