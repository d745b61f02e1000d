"""Held-out evaluation by sampling: Average@k, pass@k and maj@k per benchmark and per level, over all ranks.

Every rank samples k completions for its slice of each benchmark's problems through the same generator and
verifier as the E-step; a ``BenchmarkMetrics`` (torchmetrics) per benchmark sums its state over the ranks when
``torch.distributed`` is initialised, so the numbers do not depend on the number of processes. The same
function serves the training loop and ``python -m dibs.evaluate``, which is what lets the two agree.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from dibs.core.metrics import suite_averages
from dibs.core.tags import VAL_ACC, VAL_LEVEL
from dibs.core.verifier import extract_boxed
from dibs.data.benchmarks import Benchmark
from dibs.lit.metrics import BenchmarkMetrics
from dibs.rollout.base import Generator, SamplingParams

__all__ = ["EvalPlan", "EvalResult", "evaluate", "eval_seed", "format_summary", "val_metrics"]


@dataclass(frozen=True)
class EvalPlan:
    """What the loop evaluates and when (the ``eval`` config group, benchmarks loaded)."""

    benchmarks: Sequence[Benchmark]
    samples: int
    pass_k: Sequence[int]
    sampling: SamplingParams
    every: int
    every_samples: int  # 0: by iterations (``every``); else after each iteration that crosses a multiple
    before_training: bool
    averages: Mapping[str, Sequence[str]]  # suite name -> its benchmarks (the benchmarks group's)
    reuse_pi0: bool = True  # π0's evaluation read back when made before (dibs.lit.eval_cache)

    def __post_init__(self) -> None:
        if self.every_samples < 0:
            raise ValueError(f"eval.every_samples={self.every_samples} must be >= 0 (0: by iterations, eval.every)")
        if self.every < 1:
            raise ValueError(f"eval.every={self.every} must be >= 1 (iterations between evaluations)")
        if self.samples < 1:
            raise ValueError(f"eval.samples={self.samples} must be >= 1")
        bad = [k for k in self.pass_k if not 1 <= k <= self.samples]
        if bad or len(set(self.pass_k)) != len(self.pass_k):
            raise ValueError(
                f"eval.pass_k={list(self.pass_k)} must be distinct values in [1, eval.samples={self.samples}]"
            )

    def due(self, iteration: int, last: bool, samples: tuple[int, int] = (0, 0)) -> bool:
        """Whether the evaluation after ``iteration`` (1-based) runs: every ``every``-th, or, with
        ``every_samples``, each iteration whose generated samples (cumulative ``samples`` before and after it)
        cross a multiple of it, so runs that spend samples at different paces are evaluated at the same costs;
        and always the last."""
        if self.every_samples > 0:
            before, after = samples
            return last or after // self.every_samples > before // self.every_samples
        return last or iteration % self.every == 0


@dataclass(frozen=True)
class EvalResult:
    samples: int  # k
    iteration: int  # the EM iterations the policy had finished (0: π0)
    scores: dict[str, dict[str, float]]  # benchmark -> BenchmarkMetrics.compute() (avg@k, pass@j, maj@k, ...)
    averages: dict[str, float] = field(default_factory=dict)  # "3-average" / "5-average" of avg@k, when complete

    @property
    def accuracy(self) -> float:
        """The headline: the unweighted mean of the benchmarks' Average@k (the one benchmark's when alone)."""
        values = [s[f"avg@{self.samples}"] for s in self.scores.values()]
        return sum(values) / len(values)


def eval_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """The RNG seed of the evaluation after ``iteration`` (0 = π0) on ``rank``: rank 0's is the standalone
    evaluation's, and other ranks draw independently of it."""
    return seed * 1_000_003 + 7_777_777 + iteration + 7_919 * rank


def evaluate(
    generator: Generator,
    verifier,
    benchmarks: Sequence[Benchmark],
    *,
    samples: int,
    pass_k: Sequence[int],
    sampling: SamplingParams,
    averages: Mapping[str, Sequence[str]],
    iteration: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Every rank must call this with the same benchmarks: ``compute()`` is a collective when distributed."""
    scores = {}
    for bench in benchmarks:
        shard = list(range(rank, len(bench.problems), world_size))
        prompts = [bench.prompts[i] for i in shard]
        groups = generator.generate(prompts, [samples] * len(shard), sampling) if shard else []
        texts = [c.text for group in groups for c in group]
        golds = [bench.problems[i].gold for i, group in zip(shard, groups) for _ in group]
        result = verifier.score(texts, golds) if texts else None
        rewards = torch.as_tensor(result.rewards if result is not None else [], dtype=torch.float32)
        metric = BenchmarkMetrics(levels=bench.levels, samples=samples, pass_k=pass_k).to(device)
        metric.update(
            rewards.reshape(len(shard), samples).to(device),  # [P, k]
            [[extract_boxed(c.text) for c in group] for group in groups],
            [bench.problems[i].level for i in shard],
            list(result.status) if result is not None else [],
        )
        scores[bench.name] = {k: float(v) for k, v in metric.compute().items()}
    k = f"avg@{samples}"
    return EvalResult(samples, iteration, scores, suite_averages({n: s[k] for n, s in scores.items()}, averages))


def val_metrics(result: EvalResult) -> dict[str, float]:
    """TensorBoard scalars: ``val/<benchmark>/<key>`` for every number, the averages, and the headline
    ``val/acc`` with ``val/acc_level_<level>`` of the first benchmark (what the grid reports read)."""
    metrics = {f"val/{name}/{key}": value for name, scores in result.scores.items() for key, value in scores.items()}
    metrics.update({f"val/{name}": value for name, value in result.averages.items()})
    metrics[VAL_ACC] = result.accuracy
    first = next(iter(result.scores.values()))
    prefix = f"avg@{result.samples}/level_"
    metrics.update({f"{VAL_LEVEL}{k[len(prefix) :]}": v for k, v in first.items() if k.startswith(prefix)})
    return metrics


def format_summary(first: EvalResult, last: EvalResult, *, where: dict[str, str]) -> str:
    """The end-of-run table: per benchmark and level, the first evaluation (π0) against the last, then where the
    run's files are. Drawn by rich as plain text (no colour), for the console and the log alike."""
    k = last.samples
    start = "pi0" if first.iteration == 0 else f"iter {first.iteration}"
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("benchmark")
    for column in (start, "final", "change", f"pass@{k}", f"maj@{k}"):
        table.add_column(column, justify="right")
    for name, scores in last.scores.items():
        before = first.scores.get(name, {})
        table.add_row(name, *_cells(before.get(f"avg@{k}", float("nan")), scores[f"avg@{k}"], scores, k))
        prefix = f"avg@{k}/level_"
        for key in (key for key in scores if key.startswith(prefix)):
            level = key[len(prefix) :]
            level_scores = _suffixed(scores, f"/level_{level}")
            table.add_row(f"  level {level}", *_cells(before.get(key, float("nan")), scores[key], level_scores, k))
    for name, b in last.averages.items():
        table.add_row(name, *_cells(first.averages.get(name, float("nan")), b, None, k))
    files = Table.grid(padding=(0, 1))
    files.add_column(justify="right", no_wrap=True)
    files.add_column(no_wrap=True)
    for name, path in where.items():
        files.add_row(f"{name}:", str(path))
    console = Console(file=io.StringIO(), width=1000, color_system=None, highlight=False, emoji=False, markup=False)
    console.print(f"Held-out Average@{k} (pass@{k} and maj@{k} of the final policy)")
    console.print(table)
    console.print()
    console.print(files)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def _cells(before: float, after: float, scores: Mapping[str, float] | None, k: int) -> list[str]:
    """The row's numbers in %: before, after, the change in points, and the final pass@k and maj@k (blank for a
    suite average, which has neither)."""
    cells = [f"{100 * before:.1f}%", f"{100 * after:.1f}%", f"{100 * (after - before):+.1f}"]
    if scores is None:
        return [*cells, "", ""]
    return [*cells, *(f"{100 * scores.get(f'{m}@{k}', float('nan')):.1f}%" for m in ("pass", "maj"))]


def _suffixed(scores: Mapping[str, float], suffix: str) -> dict[str, float]:
    """One level's numbers under the overall keys: ``pass@4/level_3`` → ``pass@4``."""
    return {k[: -len(suffix)]: v for k, v in scores.items() if k.endswith(suffix)}
