"""Held-out evaluation by sampling: Average@k, pass@k and maj@k per benchmark and per level, over all ranks.

Every rank samples k completions for its slice of each benchmark's problems through the same generator and
verifier as the E-step; a ``BenchmarkMetrics`` (torchmetrics) per benchmark sums its state over the ranks when
``torch.distributed`` is initialised, so the numbers do not depend on the number of processes. The same
function serves the training loop and ``python -m dibs.evaluate``, which is what lets the two agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

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
    """The end-of-run table: per benchmark and level, the first evaluation (π0) against the last."""
    k = last.samples
    start = "pi0" if first.iteration == 0 else f"iter {first.iteration}"
    lines = [
        f"Held-out Average@{k} (pass@{k} and maj@{k} of the final policy)",
        f"{'benchmark':>22} | {start:>7} | {'final':>7} | {'change':>7} | {f'pass@{k}':>7} | {f'maj@{k}':>7}",
        "-" * 72,
    ]
    rows = []
    for name, scores in last.scores.items():
        before = first.scores.get(name, {})
        rows.append((name, before.get(f"avg@{k}", float("nan")), scores[f"avg@{k}"], scores))
        prefix = f"avg@{k}/level_"
        for key in (key for key in scores if key.startswith(prefix)):
            level = key[len(prefix) :]
            suffix = f"/level_{level}"
            rows.append((f"level {level}", before.get(key, float("nan")), scores[key], _suffixed(scores, suffix)))
    for label, a, b, scores in rows:
        pass_k, maj_k = scores.get(f"pass@{k}", float("nan")), scores.get(f"maj@{k}", float("nan"))
        lines.append(
            f"{label:>22} | {100 * a:6.1f}% | {100 * b:6.1f}% | {100 * (b - a):+6.1f} | "
            f"{100 * pass_k:6.1f}% | {100 * maj_k:6.1f}%"
        )
    for name, b in last.averages.items():
        a = first.averages.get(name, float("nan"))
        lines.append(f"{name:>22} | {100 * a:6.1f}% | {100 * b:6.1f}% | {100 * (b - a):+6.1f} |")
    lines.append("")
    lines += [f"{name:>12}: {path}" for name, path in where.items()]
    return "\n".join(lines)


def _suffixed(scores: Mapping[str, float], suffix: str) -> dict[str, float]:
    """One level's numbers under the overall keys: ``pass@4/level_3`` → ``pass@4``."""
    return {k[: -len(suffix)]: v for k, v in scores.items() if k.endswith(suffix)}
