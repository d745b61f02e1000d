"""The verifier's cost per sample in the E-step: before (a pool started by the first call, no cache) and after
(workers started early, kept warm, outcomes cached).

Answers are the default job's: by default an E-step's worth (prompts_per_iteration x n_per_prompt = 512 x 4) sampled
from its pi0 (reused from the warm-start cache, or warm-started first, which takes minutes), for two iterations'
prompt draws A and B; ``--answers mix`` builds them instead from the embedded task's problems with a fixed mix
(correct boxed, wrong boxed, no box, equivalent forms that only math-verify accepts: 56.0, \\frac{112}{2},
5.6 \\times 10^{1}).

    before  cold first call    MathVerifier(cache_size=0): score(A) starts the pool (the old first E-step)
            warm call          the same pool, score(B) (the old later E-steps)
    after   pool start         start() returns at once; the workers are up this much later (off the critical
                               path: it overlaps the warm start and the model build)
            first call         score(A) on the started pool (identical pairs of a batch go to a worker once)
            next E-step        score(B) with A's outcomes cached
            repeated call      score(A) again: every open pair a cache hit

    python benchmarks/verifier_cost.py                      # the default job's pi0 (experiment=embedded_grpo)
    python benchmarks/verifier_cost.py --answers mix
    python benchmarks/verifier_cost.py --override reward.num_workers=2

Keep this file's top-level imports light: the forkserver's workers re-import the launching script (as they do
train.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", choices=("pi0", "mix"), default="pi0")
    parser.add_argument("--experiment", default="embedded_grpo", help="the job whose pi0 and settings are used")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override (repeatable)")
    parser.add_argument("--repeats", type=int, default=3, help="each measurement's repeats (median shown)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    cfg = _compose([f"experiment={args.experiment}", *args.override])
    from hydra.utils import instantiate

    reward = _plain(cfg.reward)
    reward.pop("_target_")
    task = instantiate(cfg.data.source)
    if args.answers == "pi0":
        (a, b), where = _sample_pi0(cfg, task), f"pi0 of experiment={args.experiment}"
    else:
        (a, b), where = _mix(task, cfg), "the embedded task, a fixed mix"
    factory = _verifier_class(cfg)
    print(f"answers: {where}; 2 batches (A, B) of {len(a[0])} samples; reward settings {reward}")
    probe, seen = factory(**reward), set()
    for name, (completions, golds) in (("A", a), ("B", b)):
        triaged = [probe._triage(c, g) for c, g in zip(completions, golds)]
        status = Counter(s or "open" for s, _, _ in triaged)
        pairs = [(answer, gold) for s, answer, gold in triaged if s is None]
        print(
            f"  batch {name}: " + ", ".join(f"{k} {v}" for k, v in status.most_common()) + f"; open pairs: "
            f"{len(set(pairs))} distinct, {len(set(pairs) & seen)} of them also in an earlier batch"
        )
        seen |= set(pairs)
    n = len(a[0])
    before: dict[str, list[float]] = {"cold first call": [], "warm call": []}
    after: dict[str, list[float]] = {"start() returns": [], "pool start": [], "first call": []}
    after |= {"next E-step": [], "repeated call": []}
    for _ in range(args.repeats):
        with factory(**{**reward, "cache_size": 0}) as old:
            before["cold first call"].append(_timed(old.score, *a))
            before["warm call"].append(_timed(old.score, *b))
        with factory(**reward) as new:
            started = time.perf_counter()
            new.start()
            after["start() returns"].append(time.perf_counter() - started)
            new.ready()
            after["pool start"].append(time.perf_counter() - started)
            after["first call"].append(_timed(new.score, *a))
            after["next E-step"].append(_timed(new.score, *b))
            after["repeated call"].append(_timed(new.score, *a))
            info = new.cache_info()
    print(f"\nmedian of {args.repeats}; ms per sample ({n} samples a call), seconds for the one-off start")
    for label, rows in (("before", before), ("after", after)):
        for name, seconds in rows.items():
            median = statistics.median(seconds)
            one_off = name in ("start() returns", "pool start")
            shown = f"{median:8.3f} s (once)" if one_off else f"{1000 * median / n:8.4f} ms/sample ({median:.3f} s)"
            print(f"  {label:6s} {name:16s} {shown}")
    print(f"  after's cache: {info.hits} hits, {info.misses} pairs sent to a worker, {info.size} entries kept")
    print(
        f"\nper E-step: before {1000 * statistics.median(before['cold first call']) / n:.4f} ms/sample on the first, "
        f"{1000 * statistics.median(before['warm call']) / n:.4f} after it; after "
        f"{1000 * statistics.median(after['first call']) / n:.4f} on the first (start overlapped), "
        f"{1000 * statistics.median(after['next E-step']) / n:.4f} on the next"
    )


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from dibs.conf import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _verifier_class(cfg):
    from hydra.utils import get_class

    return get_class(cfg.reward._target_)


def _draws(cfg, task, count: int = 2) -> list[list]:
    """``count`` iterations' prompts, drawn as the default pool sampling does (a random subset of the pool)."""
    pool = task.train[: cfg.pool_size]
    rng = random.Random(cfg.seed)
    return [rng.sample(pool, min(cfg.prompts_per_iteration, len(pool))) for _ in range(count)]


def _sample_pi0(cfg, task) -> list[tuple[list[str], list[str]]]:
    import torch
    import transformers
    from hydra.utils import instantiate

    from dibs.data.prompts import PromptTemplate, encode_prompts
    from dibs.lit.assemble import policy_from_config
    from dibs.rollout.base import SamplingParams

    transformers.utils.logging.disable_progress_bar()
    cache_dir = Path(cfg.cache_dir)
    cache_dir = cache_dir if cache_dir.is_absolute() else ROOT / cache_dir
    template = PromptTemplate(**_plain(cfg.template))
    with instantiate(cfg.reward) as verifier:
        verifier.start()
        policy, tokenizer = policy_from_config(cfg, task, verifier, cache_dir=str(cache_dir))
    policy.eval()
    generator = instantiate(cfg.rollout.generator, show_progress=False)(model=policy, tokenizer=tokenizer)
    sampling = SamplingParams(**_plain(cfg.rollout.sampling))
    n = int(cfg.allocation.n_per_prompt)
    torch.manual_seed(cfg.seed)
    batches = []
    for problems in _draws(cfg, task):
        kept, ids, _ = encode_prompts(problems, tokenizer, template, max_prompt_tokens=cfg.max_prompt_tokens)
        started = time.perf_counter()
        groups = generator.generate(ids, [n] * len(ids), sampling)
        print(f"sampled {n} x {len(ids)} from pi0 in {time.perf_counter() - started:.1f} s")
        batches.append(([c.text for g in groups for c in g], [p.gold for p, g in zip(kept, groups) for _ in g]))
    return batches


def _mix(task, cfg) -> list[tuple[list[str], list[str]]]:
    """Per prompt, n answers drawn from a fixed mix of what a weak policy writes on the embedded task."""
    rng = random.Random(cfg.seed)
    n = int(cfg.allocation.n_per_prompt)
    batches = []
    for problems in _draws(cfg, task):
        completions, golds = [], []
        for p in problems:
            value = int(p.answer)
            for _ in range(n):
                kind = rng.choices(("right", "wrong", "none", "equivalent"), weights=(45, 35, 10, 10))[0]
                if kind == "right":
                    text = f"\\boxed{{{value}}}"
                elif kind == "wrong":
                    text = f"\\boxed{{{value + rng.choice((-10, -2, -1, 1, 2, 10))}}}"
                elif kind == "none":
                    text = f"{value} is the answer"
                else:
                    form = rng.choice((f"{value}.0", f"\\frac{{{2 * value}}}{{2}}", f"{value / 10} \\times 10^{{1}}"))
                    text = f"\\boxed{{{form}}}"
                completions.append(f"{p.solution.rsplit(chr(10), 1)[0]}\n{text}")
                golds.append(p.gold)
        batches.append((completions, golds))
    return batches


if __name__ == "__main__":
    main()
