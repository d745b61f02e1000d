"""reasoning-gym as a data source and its reward: real generators, real scorers, in the verifier's process pool."""

import json
import time
from pathlib import Path

import pytest

reasoning_gym = pytest.importorskip("reasoning_gym")

from dibs.core.gym_verifier import GymVerifier, extract_tagged  # noqa: E402
from dibs.data.gym import load_gym  # noqa: E402

SETTINGS = dict(num_workers=1, timeout_s=1, hard_timeout_s=3.0, max_answer_chars=256, accept_at=1.0)


def entry_of(problem):
    """The generator's entry a problem refers to, regenerated as the verifier's workers do."""
    ref = json.loads(problem.gold)
    return reasoning_gym.create_dataset(ref["task"], seed=ref["seed"], size=ref["size"], **ref["options"])[ref["index"]]


def load(tasks, size=30, test_size=10, options=None, level_from="task", seed=0):
    return load_gym(
        tasks=tasks, size=size, test_size=test_size, seed=seed, options=options or {}, level_from=level_from
    )


@pytest.fixture(scope="module")
def verifier():
    with GymVerifier(**SETTINGS) as v:
        yield v


def test_tasks_load_with_their_entries_levels_and_a_held_out_split_apart_from_the_pool():
    splits = load(["chain_sum", "basic_arithmetic", "countdown"], size=12, test_size=4)
    assert len(splits.train) == 36 and {p.level for p in splits.train} == {"chain_sum", "basic_arithmetic", "countdown"}
    assert not {p.problem for p in splits.test} & {p.problem for p in splits.train}
    first = splits.train[0]
    ref = json.loads(first.gold)
    assert first.uid == "chain_sum-train-000000" and ref["task"] == "chain_sum" and ref["index"] == 0
    assert entry_of(first)["question"] == first.problem and entry_of(first)["answer"] == first.answer
    assert first.solution == ""  # no worked solutions
    again = load(["chain_sum", "basic_arithmetic", "countdown"], size=12, test_size=4)
    assert [p.gold for p in again.train + again.test] == [p.gold for p in splits.train + splits.test]
    assert load(["chain_sum"], seed=1).train[0].problem != load(["chain_sum"]).train[0].problem


def test_generator_options_and_a_metadata_level():
    splits = load(["chain_sum"], options={"chain_sum": {"min_terms": 2, "max_terms": 3}}, level_from="num_terms")
    assert {p.level for p in splits.train} == {"2", "3"}
    expressions = [entry_of(p)["metadata"]["expression"] for p in splits.train]
    assert all(len(e.split()) in (3, 5) and e in p.problem for e, p in zip(expressions, splits.train))  # a + b - c


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tasks=["chain_summ"]), "'chain_summ' is not a reasoning-gym task; did you mean chain_sum"),
        (dict(tasks=[]), "data.source.tasks is empty"),
        (dict(tasks=["chain_sum"], options={"countdown": {}}), r"options names \['countdown'\]"),
        (dict(tasks=["chain_sum"], options={"chain_sum": {"max_termz": 3}}), "data.source.options.chain_sum"),
        (dict(tasks=["chain_sum"], level_from="depth"), "level_from='depth'.*num_terms"),
    ],
)
def test_bad_settings_are_named_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load(**kwargs)


def test_each_task_scores_its_own_answers(verifier):
    splits = load(["chain_sum", "countdown"], size=6, test_size=0)
    golds = [p.gold for p in splits.train]
    right = [verifier.format_answer(p.answer) for p in splits.train]
    assert verifier.score(right, golds).status == ("exact",) * 12
    countdown = splits.train[6]
    entry = entry_of(countdown)
    # another spelling of the gold expression is no string match: countdown's scorer evaluates it
    respaced = "<answer>" + entry["answer"].replace(" ", "") + "</answer>"
    wrong_numbers = "<answer>1 + 1</answer>"
    out = verifier.score(
        [respaced, wrong_numbers, "no tag", "<answer>-99999</answer>"], [countdown.gold] * 3 + [golds[0]]
    )
    assert out.status == ("verified", "rejected", "no_answer", "rejected") and out.rewards.tolist() == [1, 0, 0, 0]


def _stalling_check(answer, gold, timeout_s, accept_at):
    """The workers' real check, with the task's scorer stalling on two answers: SLEEP in Python (swallowing every
    Exception, as countdown's scorer does), SPIN ignoring even the timeout."""
    import dibs.core.gym_verifier as gym

    real = gym._dataset

    class Stalling:
        def __init__(self, dataset):
            self.dataset = dataset

        def __getitem__(self, index):
            return self.dataset[index]

        def score_answer(self, text, entry):
            while text in ("SLEEP", "SPIN"):
                try:
                    time.sleep(0.01)
                except Exception:  # noqa: BLE001
                    pass
                except BaseException:
                    if text == "SLEEP":
                        raise
            return self.dataset.score_answer(text, entry)

    gym._dataset = lambda *key: Stalling(real(*key))
    try:
        return gym._gym_check(answer, gold, timeout_s, accept_at)
    finally:
        gym._dataset = real


def test_a_stalling_scorer_is_a_timeout_and_the_pool_recovers(monkeypatch):
    # Workers unpickle _stalling_check by module name: let them import this file however pytest named it.
    monkeypatch.syspath_prepend(str(Path(__file__).parents[__name__.count(".")]))
    monkeypatch.setattr(GymVerifier, "_check_fn", staticmethod(_stalling_check))
    countdown = load(["countdown"], size=1, test_size=0).train[0]
    entry = entry_of(countdown)
    respaced = "<answer>" + entry["answer"].replace(" ", "") + "</answer>"
    with GymVerifier(**SETTINGS) as v:
        assert v.score([respaced], [countdown.gold]).status == ("verified",)  # warm pool
        started = time.monotonic()
        out = v.score(["<answer>SLEEP</answer>"], [countdown.gold])
        assert out.status == ("timeout",) and time.monotonic() - started < SETTINGS["timeout_s"] + 1
        started = time.monotonic()
        out = v.score(["<answer>SPIN</answer>"], [countdown.gold])  # the pool's hard limit kills the worker
        assert out.status == ("timeout",) and time.monotonic() - started < SETTINGS["hard_timeout_s"] + 1.5
        assert v.score([respaced, "<answer>1+1</answer>"], [countdown.gold] * 2).status == ("verified", "rejected")


def test_a_gold_that_is_not_a_gym_entry_is_a_clear_error(verifier):
    with pytest.raises(ValueError, match="reward=reasoning_gym scores reasoning-gym problems"):
        verifier.score(["<answer>3</answer>"], ["3"])


def test_answer_tags_and_settings():
    assert extract_tagged("<answer>1</answer> then <answer>\n 2 \n</answer>") == "2"
    assert extract_tagged("<answer>2") is None
    with pytest.raises(ValueError, match="accept_at=0 must be in"):
        GymVerifier(**{**SETTINGS, "accept_at": 0})


@pytest.mark.slow
def test_every_registered_task_loads_and_its_gold_answers_score_one():
    """Any task name works: every task of the registry generates (or, without gold answers, is refused by name),
    and its own gold passes the pool's exact path and its own scorer, regenerated from the reference."""
    from dibs.core.gym_verifier import _gym_check

    failures, refused = {}, []
    with GymVerifier(**{**SETTINGS, "timeout_s": 5, "hard_timeout_s": 20.0, "max_answer_chars": 100_000}) as v:
        for name in sorted(reasoning_gym.factory.DATASETS):
            try:
                problems = load([name], size=2, test_size=1).train
            except ValueError as error:
                if "tasks without a gold answer" in str(error):
                    refused.append(name)
                elif name == "composite":  # a mix of other tasks: it needs options naming them, and says so
                    assert "data.source.options.composite" in str(error) and "at least one dataset" in str(error)
                else:
                    failures[name] = f"load: {error}"
                continue
            out = v.score([v.format_answer(p.answer) for p in problems], [p.gold for p in problems])
            scored = [_gym_check(p.answer, p.gold, 5, 1.0) for p in problems]  # the scorer itself, in-process
            if out.rewards.tolist() != [1.0, 1.0] or scored != ["verified"] * 2:
                failures[name] = f"gold scored {out.status}, by the scorer {scored}"
    assert not failures, failures
    assert len(refused) < 10, refused
