"""Compare two runs' TensorBoard scalars point by point: the check that a change left training unchanged.

    python benchmarks/same_scalars.py <run A> <run B>

Reads every scalar of every event file below each run folder (TensorBoard's own reader) and prints, per tag,
whether the two runs hold the same (step, value) points bit for bit. Timing (``time/*``, ``cost/wall_s``) and
memory (``memory/*``) scalars are wall-clock measurements and are listed apart; ``--ignore`` adds tags whose
change is intended. Exit status 0 when every other tag is identical.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CLOCK = ("time/", "memory/", "cost/wall_s", "epoch")


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--ignore", nargs="*", default=[], help="tags whose change is intended")
    args = parser.parse_args()
    a, b = scalars(args.a), scalars(args.b)
    same, differ, clock, only = [], [], [], []
    for tag in sorted(set(a) | set(b)):
        if tag not in a or tag not in b:
            only.append(f"{tag} (only in {'A' if tag in a else 'B'})")
        elif tag.startswith(CLOCK):
            clock.append(tag)
        elif a[tag] == b[tag]:
            same.append(tag)
        else:
            diverged = next((pa for pa, pb in zip(a[tag], b[tag]) if pa != pb), None)
            differ.append(f"{tag}: {len(a[tag])} vs {len(b[tag])} points, first difference at {diverged}")
    points = sum(len(a[t]) for t in same)
    print(f"identical: {len(same)} tags, {points} points")
    print(f"wall-clock, not compared: {len(clock)} tags")
    for line in only:
        print(f"in one run only: {line}")
    intended = [d for d in differ if d.split(":")[0] in args.ignore]
    for line in intended:
        print(f"differs (intended): {line}")
    unexpected = [d for d in differ if d not in intended]
    for line in unexpected:
        print(f"DIFFERS: {line}")
    return 1 if unexpected or only else 0


if __name__ == "__main__":
    sys.exit(main())
