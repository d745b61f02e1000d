r"""Does the verifier accept a benchmark's own worked solutions? The reward's sanity check, no model involved.

    accept_rate = #{rows: MathVerifier(last \boxed{} of the row's solution, the row's gold answer) pays 1} / #rows

Rows are read with the training loader (``dibs.data.records.load_problems``), so the gold is the string the
reward sees during validation: a list of answers (OlympiadBench) is joined with ", ", a list of solutions
keeps the first. A miss is either a verifier bug (fix it generally, with a unit test) or a dataset quirk
(the gold disagrees with its own solution). A solution without a \boxed{} (OlympiadBench's) is "no_answer".

    python scripts/check_gold.py                       # MATH500, needs >= 99 %
    python scripts/check_gold.py --math-verify-only    # the same pairs without the exact-match shortcut
    python scripts/check_gold.py --file aime24.jsonl
    python scripts/check_gold.py --file olympiad_bench.jsonl --id-key id
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

import dibs.conf
from dibs.core.verifier import STATUSES, MathVerifier, VerifyResult, extract_boxed
from dibs.data.records import load_problems

BENCHMARKS = Path(dibs.conf.ROOT).parent / "shared" / "data" / "benchmarks"  # outside the checkout, never copied


@dataclass(frozen=True)
class GoldCheck:
    ids: tuple[str, ...]  # [N] the row's id field, else "<file>:<line>"
    boxed: tuple[str | None, ...]  # [N] last \boxed{} of the solution
    golds: tuple[str, ...]  # [N] gold answer as the loader gives it
    result: VerifyResult  # [N] rewards and statuses
    seconds: float  # scoring only

    @property
    def accept_rate(self) -> float:
        return float(self.result.rewards.mean()) if len(self.golds) else 0.0

    def misses(self) -> list[tuple[str, str | None, str, str]]:
        """(id, boxed value of the solution, gold, status) of every row not paid."""
        rows = zip(self.ids, self.boxed, self.golds, self.result.status, self.result.rewards)
        return [(i, b, g, s) for i, b, g, s, r in rows if r < 0.5]


def check_gold(
    path: Path,
    verifier: MathVerifier,
    *,
    solution_key: str = "solution",
    answer_key: str = "answer",
    id_key: str = "unique_id",
    every: int = 1,
    math_verify_only: bool = False,
) -> GoldCheck:
    """Score every ``every``-th row's solution against its gold.

    ``math_verify_only`` skips the exact-match shortcut: MATH500's ``answer`` is byte for byte its solution's
    boxed value, so the shortcut alone accepts all of it; this asks whether math-verify, the path of any
    answer that is not identical to the gold, accepts it too.
    """
    problems, _ = load_problems(path, answer_key=answer_key, solution_key=solution_key, level_key=None)
    ids = _row_ids(path, id_key)
    assert len(ids) == len(problems)  # load_problems raises on a bad row, so the rows align
    rows = range(0, len(problems), every)
    solutions = [problems[i].solution for i in rows]
    golds = [problems[i].answer for i in rows]
    boxed = [extract_boxed(s) for s in solutions]
    start = time.perf_counter()
    result = _math_verify_only(verifier, boxed, golds) if math_verify_only else verifier.score(solutions, golds)
    return GoldCheck(
        ids=tuple(ids[i] if ids[i] is not None else problems[i].uid for i in rows),
        boxed=tuple(boxed),
        golds=tuple(golds),
        result=result,
        seconds=time.perf_counter() - start,
    )


def _math_verify_only(verifier: MathVerifier, boxed: list[str | None], golds: list[str]) -> VerifyResult:
    # The pool behind score() without its exact shortcut (a private call: this is a diagnostic of it).
    todo = [i for i, b in enumerate(boxed) if b is not None]
    gold_answers = [extract_boxed(g) or g.strip() for g in golds]  # as score() reduces Minerva's golds
    status = ["no_answer"] * len(boxed)
    for i, s in zip(todo, verifier._verify([(boxed[i], gold_answers[i]) for i in todo]), strict=True):
        status[i] = s
    rewards = np.array([s in ("exact", "verified") for s in status], dtype=np.float32)  # [N]
    return VerifyResult(rewards=rewards, status=tuple(status))


def _row_ids(path: Path, id_key: str) -> list[str | None]:
    with path.open(encoding="utf-8-sig") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    return [None if r.get(id_key) is None else str(r[id_key]) for r in records]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--file",
        type=Path,
        default=BENCHMARKS / "math500.jsonl",
        help="a JSONL file; a bare name is looked up in %(default)s's folder",
    )
    parser.add_argument("--solution-key", default="solution")
    parser.add_argument("--answer-key", default="answer")
    parser.add_argument("--id-key", default="unique_id", help="shown for misses; '<file>:<line>' if absent")
    reward = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "reward" / "math_verify.yaml")
    parser.add_argument("--workers", type=int, default=reward.num_workers, help="default: conf/reward")
    parser.add_argument("--timeout-s", type=int, default=reward.timeout_s)
    parser.add_argument("--hard-timeout-s", type=float, default=reward.hard_timeout_s)
    parser.add_argument("--math-verify-only", action="store_true", help="skip the exact-match shortcut")
    parser.add_argument("--min-rate", type=float, default=0.0, help="exit 1 below this acceptance rate")
    args = parser.parse_args(argv)
    path = args.file if args.file.exists() or args.file.parent != Path() else BENCHMARKS / args.file

    settings = dict(num_workers=args.workers, timeout_s=args.timeout_s, hard_timeout_s=args.hard_timeout_s)
    with MathVerifier(**settings, max_answer_chars=reward.max_answer_chars) as v:
        check = check_gold(
            path,
            v,
            solution_key=args.solution_key,
            answer_key=args.answer_key,
            id_key=args.id_key,
            math_verify_only=args.math_verify_only,
        )
    n, accepted = len(check.golds), int(check.result.rewards.sum())
    print(
        f"{path.name}: {accepted}/{n} gold solutions accepted ({100 * check.accept_rate:.1f} %) "
        f"in {check.seconds:.1f} s with {args.workers} worker(s)"
    )
    counts = Counter(check.result.status)
    print("status: " + ", ".join(f"{k}={counts[k]}" for k in STATUSES))
    for uid, boxed, gold, status in check.misses():
        print(f"MISS {uid}  [{status}]  boxed={boxed!r}  gold={gold!r}")
    return int(check.accept_rate < args.min_rate)


if __name__ == "__main__":
    raise SystemExit(main())
