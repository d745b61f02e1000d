r"""The reward accepts MATH500's own worked solutions: ``scripts/check_gold.py`` as a test.

MATH500's ``answer`` is byte for byte the last \boxed{} of its ``solution``, so the exact-match shortcut alone
accepts every row; each check is therefore run twice, the second time through math-verify only (the path any
answer not identical to the gold takes). Measured on one worker: all 500 rows 0.1 s (score) + 3-5 s
(math-verify only): cheap enough for the default run.
The benchmark files live outside the checkout; without them these tests skip.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

import dibs.conf
from dibs.core.verifier import MathVerifier

SCRIPT = Path(dibs.conf.ROOT) / "scripts" / "check_gold.py"


def _load_script():
    # scripts/ is not a package: load the file itself, so the test runs exactly what the script runs.
    spec = importlib.util.spec_from_file_location("check_gold", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


check_gold = _load_script()
MATH500 = check_gold.BENCHMARKS / "math500.jsonl"


@pytest.fixture(scope="module")
def verifier():
    if not MATH500.is_file():
        pytest.skip(f"MATH500 not found at {MATH500} (benchmark files sit outside the checkout)")
    with MathVerifier(
        num_workers=1, timeout_s=2, hard_timeout_s=5.0, max_answer_chars=256
    ) as v:  # conf/reward/math_verify.yaml
        yield v


@pytest.mark.parametrize("math_verify_only", [False, True], ids=["score", "math_verify_only"])
def test_math500_gold_solutions_are_accepted(verifier, math_verify_only):
    check = check_gold.check_gold(MATH500, verifier, math_verify_only=math_verify_only)
    assert len(check.golds) == 500
    assert check.accept_rate >= 0.99, check.misses()
