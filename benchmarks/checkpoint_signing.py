"""Seconds to sign (and so to verify) a distributed checkpoint folder, per GB of its files.

    .venv/bin/python benchmarks/checkpoint_signing.py --gb 1

Writes a folder of random shards (as DCP lays them out: ``.metadata`` and ``__<rank>_0.distcp``) to a temporary
directory, then times ``dibs.resume.signature`` over it, the files read back from the page cache as they
are right after a save.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from dibs.resume import signature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the folder")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "iter_001.ckpt"
        folder.mkdir()
        (folder / ".metadata").write_bytes(os.urandom(1 << 16))
        per_shard, chunk = int(args.gb * 2**30 / args.shards), os.urandom(1 << 24)
        for rank in range(args.shards):
            with open(folder / f"__{rank}_0.distcp", "wb") as f:
                for _ in range(per_shard // len(chunk)):
                    f.write(chunk)
        key = os.urandom(32)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            signature(folder, key)
            times.append(time.perf_counter() - started)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**30
        best = min(times)
        print(f"signed {size:.2f} GB in {best:.2f} s (best of {args.repeats}): {best / size:.2f} s per GB")


if __name__ == "__main__":
    main()
