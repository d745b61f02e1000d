"""Evaluation sets: the five benchmarks of docs/method.md and the data source's own held-out split.

A benchmark is named in ``eval.benchmarks`` and described in ``benchmarks.sets`` (``conf/benchmarks``): a file,
folder or hub name read by the same loader as the prompt pool (``dibs.data.records.load_problems``), with its
field names and whether the gold is the field itself or the last ``\\boxed{}`` of a worked solution (Minerva
Math). ``path: null`` is the data source's held-out split, so the embedded task's test split is evaluated by
exactly the code that evaluates MATH500. Prompts are rendered with the run's template; over-long ones are
dropped and reported with the benchmark, since a dropped problem changes what a score means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dibs.data.prompts import PromptTemplate, encode_prompts
from dibs.data.records import Problem, load_problems

__all__ = ["Benchmark", "check_benchmarks", "load_benchmarks", "sorted_levels"]

_SPEC_KEYS = {"path", "split", "problem_key", "answer_key", "answer_from", "level_key"}


@dataclass(frozen=True)
class Benchmark:
    name: str
    problems: list[Problem]  # those whose prompt fits, in file order
    prompts: list[list[int]]  # token ids of each rendered prompt
    levels: list[str]  # every difficulty level of the set ([""] when it has none)
    dropped: list[str] = field(default_factory=list)  # over-long prompts: "<uid>: ... tokens"
    skipped: list[str] = field(default_factory=list)  # bad rows skipped under on_bad_row=skip


def sorted_levels(levels: Sequence[str]) -> list[str]:
    """Distinct levels, numerically when they all are numbers ("2" before "10")."""
    distinct = set(levels)
    numeric = all(lv.lstrip("-").isdigit() for lv in distinct)
    return sorted(distinct, key=lambda lv: (int(lv) if numeric else 0, lv))


def load_benchmarks(
    names: Sequence[str],
    *,
    sets: Mapping[str, Mapping[str, Any]],
    tokenizer: Any,
    template: PromptTemplate,
    max_prompt_tokens: int,
    held_out: Sequence[Problem] = (),
    dir: str | None = None,
    on_bad_row: str = "error",
) -> list[Benchmark]:
    """The named sets, loaded, validated and tokenised; errors name the setting to fix."""
    check_benchmarks(names, sets, dir=dir, has_held_out=bool(held_out))
    out = []
    for name in names:
        problems, skipped = _problems(name, sets[name], held_out, dir, on_bad_row)
        kept, prompts, dropped = encode_prompts(problems, tokenizer, template, max_prompt_tokens=max_prompt_tokens)
        if not kept:
            raise ValueError(
                f"benchmark {name}: none of its {len(problems)} prompts fits in max_prompt_tokens={max_prompt_tokens}"
            )
        out.append(Benchmark(name, kept, prompts, sorted_levels([p.level for p in problems]), dropped, skipped))
    return out


def check_benchmarks(
    names: Sequence[str], sets: Mapping[str, Mapping[str, Any]], *, dir: str | None, has_held_out: bool
) -> None:
    """The cheap checks, run before a model is loaded: known names, their keys, and where they come from."""
    if not names:
        raise ValueError("eval.benchmarks is empty: name at least one of benchmarks.sets")
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise ValueError(f"eval.benchmarks: unknown benchmark(s) {unknown}; benchmarks.sets has {sorted(sets)}")
    if len(set(names)) != len(names):
        raise ValueError(f"eval.benchmarks names a benchmark twice: {list(names)}")
    for name in names:
        extra = set(sets[name]) - _SPEC_KEYS
        if extra:
            raise ValueError(f"benchmarks.sets.{name}: unknown key(s) {sorted(extra)}; allowed: {sorted(_SPEC_KEYS)}")
        if sets[name].get("path") is None and not has_held_out:
            raise ValueError(
                f"benchmark {name} is the data source's held-out split, but the data source has none "
                "(e.g. data.source.test_path is null): set it, or choose other eval.benchmarks"
            )
        if sets[name].get("path") is not None:
            _resolve(name, str(sets[name]["path"]), dir)


def _problems(
    name: str, spec: Mapping[str, Any], held_out: Sequence[Problem], dir: str | None, on_bad_row: str
) -> tuple[list[Problem], list[str]]:
    if spec.get("path") is None:
        return list(held_out), []
    source = _resolve(name, str(spec["path"]), dir)
    options = {k: spec[k] for k in ("split", "problem_key", "answer_key", "answer_from", "level_key") if k in spec}
    options.setdefault("level_key", None)  # a level only where the set declares one
    problems, skipped = load_problems(
        source, on_bad_row=on_bad_row, solution_key=None, source=f"benchmarks.sets.{name}.path", **options
    )
    if not problems:
        raise ValueError(f"benchmark {name}: no usable problem in {source} ({len(skipped)} rows skipped)")
    return problems, skipped


def _resolve(name: str, path: str, dir: str | None) -> str:
    """A relative file path is taken in ``benchmarks.dir``; absolute paths and hub names are used as given."""
    if Path(path).is_absolute() or ("/" in path and not Path(path).suffix):
        return path  # absolute, or a hub name such as "HuggingFaceH4/MATH-500"
    if dir is None:
        raise ValueError(
            f"benchmark {name} reads {path!r} from benchmarks.dir, which is not set: put the benchmark files in a "
            "folder and pass benchmarks.dir=/path/to/that/folder"
        )
    return str(Path(dir).expanduser() / path)
