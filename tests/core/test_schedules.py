import math

import pytest

from dibs.core.schedules import warmup_cosine


def test_warmup_then_constant():
    # warm-up over 4 steps: (s + 1) / 4, then 1
    assert [warmup_cosine(s, warmup=4, total=0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_to_the_floor_and_stays():
    # floor 0.1, total 10: halfway → 0.1 + 0.9 · ½ (1 + cos(π/2)) = 0.55; at and past 10 → 0.1
    assert warmup_cosine(5, warmup=1, total=10, floor=0.1) == pytest.approx(0.55)
    assert warmup_cosine(10, warmup=1, total=10, floor=0.1) == pytest.approx(0.1)
    assert warmup_cosine(50, warmup=1, total=10, floor=0.1) == pytest.approx(0.1)
    # warm-up and decay multiply: step 1 of warmup 4 → 0.5 · ½ (1 + cos(π/10))
    assert warmup_cosine(1, warmup=4, total=10) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 10)))
