"""The equal-cost budget: parsing, the stop rule and the learning-rate horizon it implies."""

import pytest

from dibs.core.budget import UNITS, Budget


def test_no_budget_never_stops_and_keeps_the_iterations_horizon():
    b = Budget.from_config()
    assert not b.enabled and not b.reached({"samples": 10**12, "tokens": 10**12, "updates": 10**9})
    assert b.planned_iterations(12, samples_per_iteration=2048, updates_per_iteration=32) == 12


@pytest.mark.parametrize("unit", UNITS)
def test_the_budget_is_reached_at_the_amount_not_before(unit):
    b = Budget.from_config(**{unit: 300})
    costs = {u: 0 for u in UNITS}
    costs[unit] = 299
    assert not b.reached(costs)
    costs[unit] = 300
    assert b.reached(costs) and b.spent(costs) == 300
    other = next(u for u in UNITS if u != unit)
    assert not b.reached({**{u: 0 for u in UNITS}, other: 10**9})  # only its own unit counts


def test_horizon_from_samples_and_updates_and_the_cap():
    # 24576 samples at 512 prompts x 4 = 2048 a step: exactly 12 iterations
    assert Budget("samples", 24576).planned_iterations(100, 2048, 32) == 12
    # 24577 needs a 13th iteration (the run stops after the iteration that crosses the budget)
    assert Budget("samples", 24577).planned_iterations(100, 2048, 32) == 13
    assert Budget("updates", 65).planned_iterations(100, 2048, 32) == 3  # ceil(65 / 32)
    assert Budget("samples", 24576).planned_iterations(5, 2048, 32) == 5  # iterations caps
    assert Budget("tokens", 10**6).planned_iterations(40, 2048, 32) == 40  # tokens: unforeseeable


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"samples": 10, "tokens": 10}, "set one budget"),
        ({"samples": 0}, "positive integer"),
        ({"updates": -3}, "positive integer"),
        ({"tokens": 1.5}, "positive integer"),
        ({"samples": True}, "positive integer"),
    ],
)
def test_bad_budgets_are_refused_with_the_key(given, match):
    with pytest.raises(ValueError, match=match):
        Budget.from_config(**given)


def test_unknown_unit_is_refused():
    with pytest.raises(ValueError, match="unit must be one of"):
        Budget("epochs", 3)


def test_unknown_budget_key_is_refused_with_the_units():
    with pytest.raises(ValueError, match=r"budget.wall_s is not a budget: the units are budget.samples"):
        Budget.from_config(samples=None, wall_s=100)
