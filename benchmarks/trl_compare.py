"""The kit's GRPO preset against TRL's GRPOTrainer on the same work: loop speed and whole-process time.

    python benchmarks/trl_compare.py                  # 3 interleaved repeats, all cores (run alone on the machine)
    python benchmarks/trl_compare.py --quick          # smoke check, ~2 min: a fraction of the work, 1 repeat
    python benchmarks/trl_compare.py --repeats 5 --threads 2 --out /tmp/trl_compare

Needs TRL (``pip install -e '.[bench]'``). Every run is a subprocess with the same thread count (``--threads``:
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` for both, and ``torch.set_num_threads`` in the TRL job); the kit runs
through its public entry point, ``python train.py experiment=embedded_grpo hydra.run.dir=... [overrides]``, and TRL
through ``benchmarks/trl_grpo_job.py``, which reads every setting that defines the work from the resolved config of
the kit run just before it (``matched_settings`` there; the script prints the table of matched settings and the
differences that cannot be matched).

Before the timed runs, one small kit run (1 iteration of 16 prompts) builds or reuses the cached warm start π0; its
cache folder, read from that run's log, is loaded and saved again as a Hugging Face folder (model and tokenizer)
that the TRL job loads; one small TRL run follows, so both start from warm page caches. Then, per repeat, in
this order: kit (a), TRL (a), kit (b), TRL (b).

(a) **Loop speed**, the preset as it is (``experiment=embedded_grpo``: 12 iterations of 512 prompts x 4 samples,
    each iteration's 2,048 samples trained once in 32 updates of 64 sequences: 24,576 samples, 384 updates).
    Printed as seconds per 1,000 generated samples, medians over the repeats. The clocks:
    - kit: its ``cost/wall_s`` TensorBoard scalar at the last evaluation, the sum of every E-step (weight push
      into the generator, generation, verification, the old and reference log-prob passes) and every M-step
      (Lightning's epoch start to end: the updates with their per-update TensorBoard logging). Evaluations, HF
      exports and checkpoints happen between those intervals and are not counted.
    - TRL: from ``on_train_begin`` (model, reference, optimiser and dataloader built) to ``on_train_end`` (after
      the last update and its logging) inside ``trainer.train()``: generation, reward, old and reference log-prob
      passes, updates, per-step TensorBoard logging. No evaluation or checkpoint runs inside it
      (``eval_strategy='no'``, ``save_strategy='no'``).
    So both cover the same work from the first generation to the last update and exclude process start-up.
(b) **Whole process of a one-iteration run**, start-up included (parent's clock from ``Popen`` to exit): ``train.py
    experiment=embedded_grpo iterations=1`` (2,048 samples, 32 updates) with the kit's defaults, which evaluate
    π0 and the policy after the iteration (200 held-out problems x 4 samples each time), export the policy and
    write checkpoints, against the TRL job on one iteration's work with TRL's defaults, which evaluate nothing;
    the job saves the policy at the end, as a user's script would. The kit's evaluation seconds
    (``time/eval_s``) are printed beside it. π0 is cached for both beforehand.

The default takes roughly 35 min on 2 cores (mostly TRL's (a) runs); ``--iterations 3`` runs (a) on 3 of the preset's
iterations (6,144 samples, 96 updates), about a quarter of that. ``--quick`` runs 1 repeat of smaller work:
(a) 2 iterations and (b) 1 iteration of 128 prompts x 4 samples in 8 updates of 64, in about 2-3 min. Runs are kept
under ``--out`` (default: a new folder under the temporary directory): kit run folders, TRL output folders with
``result.json``, and each run's console log.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = Path(__file__).resolve().with_name("trl_grpo_job.py")
BENCH_EXTRA = "pip install -e '.[bench]'"
WARM_UP = ["iterations=1", "prompts_per_iteration=16", "updates_per_iteration=1", "eval.before_training=false"]
QUICK_WORK = ["prompts_per_iteration=128", "updates_per_iteration=8"]  # 512 samples an iteration, each trained once
PI0_FOLDER = re.compile(r"(\S*warmstart/[0-9a-f]{16})")
KIT_THREADS = re.compile(r"torch threads: (\d+)")


def load_job_module():
    """benchmarks/trl_grpo_job.py as a module (``matched_settings``; it imports nothing heavy at its top)."""
    spec = importlib.util.spec_from_file_location("trl_grpo_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each kind, interleaved kit/TRL")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads for both")
    parser.add_argument("--quick", action="store_true", help="smoke check: a fraction of the work, 1 repeat")
    parser.add_argument(
        "--iterations", type=int, default=None, help="(a): iterations of the preset (default: the preset's own)"
    )
    parser.add_argument("--experiment", default="embedded_grpo", help="the kit preset (uniform GRPO or Dr.GRPO)")
    parser.add_argument("--out", type=Path, default=None, help="where runs are kept (default: a new temp folder)")
    parser.add_argument("--cache-dir", default=None, help="the kit's cache_dir (default: the kit's own default)")
    args = parser.parse_args()
    if importlib.util.find_spec("trl") is None:
        sys.exit(f"trl is not installed: {BENCH_EXTRA}")
    repeats = 1 if args.quick else args.repeats
    out = args.out or Path(tempfile.mkdtemp(prefix="trl_compare_"))
    out.mkdir(parents=True, exist_ok=True)
    job = load_job_module()
    bench = Bench(out, args.threads, args.experiment, args.cache_dir)
    loop_work = ["iterations=2", *QUICK_WORK] if args.quick else []
    if args.iterations is not None:  # the same work per iteration, fewer of them
        loop_work = [f"iterations={args.iterations}", *(QUICK_WORK if args.quick else [])]
    one_work = ["iterations=1", *(QUICK_WORK if args.quick else [])]
    print(f"runs under {out}; {args.threads} threads for both; {repeats} repeat(s); experiment={args.experiment}")

    print("warm-up: a small kit run (pi0 cached or built), then a small TRL run", flush=True)
    warm = bench.kit("warmup_kit", WARM_UP)
    pi0 = bench.export_pi0(warm["log"])
    job.matched_settings(bench.config(warm))  # an unmatched preset fails here, before the long runs
    bench.trl("warmup_trl", warm, pi0)

    runs: dict[str, list[dict]] = {"kit_a": [], "trl_a": [], "kit_b": [], "trl_b": []}
    for r in range(repeats):
        kit_a = bench.kit(f"a{r}_kit", loop_work)
        runs["kit_a"].append(kit_a)
        runs["trl_a"].append(bench.trl(f"a{r}_trl", kit_a, pi0))
        kit_b = bench.kit(f"b{r}_kit", one_work)
        runs["kit_b"].append(kit_b)
        runs["trl_b"].append(bench.trl(f"b{r}_trl", kit_b, pi0))

    settings, rows, unmatched = job.matched_settings(bench.config(runs["kit_a"][0]))
    print_matched(rows, unmatched, settings)
    print_loop(runs["kit_a"], runs["trl_a"])
    print_process(runs["kit_b"], runs["trl_b"])


class Bench:
    """Launches the runs as subprocesses with the same environment and records what each one measured."""

    def __init__(self, out: Path, threads: int, experiment: str, cache_dir: str | None) -> None:
        self.out, self.threads, self.experiment = out, threads, experiment
        self.cache = [f"cache_dir={cache_dir}"] if cache_dir else []
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def kit(self, name: str, overrides: list[str]) -> dict:
        run_dir = self.out / name
        cmd = [sys.executable, "train.py", f"experiment={self.experiment}", f"hydra.run.dir={run_dir}"]
        wall, log = self._run(name, cmd + self.cache + overrides)
        found = scalars(run_dir / "tb")
        threads = KIT_THREADS.findall(log.read_text())  # the kit logs its count (versions with a `threads` setting)
        if threads and int(threads[-1]) != self.threads:
            print(f"WARNING: {name} ran {threads[-1]} torch threads, not {self.threads}")
        result = {
            "wall_s": wall,
            "loop_s": found["cost/wall_s"][-1],
            "samples": int(found["cost/samples"][-1]),
            "tokens": int(found["cost/tokens"][-1]),
            "updates": int(found["cost/updates"][-1]),
            "eval_s": sum(found.get("time/eval_s", [])),
            "run_dir": str(run_dir),
            "log": str(log),
        }
        print(f"  {name}: {_line(result)}, evaluation {result['eval_s']:.1f} s", flush=True)
        return result

    def trl(self, name: str, kit_run: dict, pi0: Path) -> dict:
        folder = self.out / name
        cmd = [sys.executable, str(JOB), "--kit-config", str(Path(kit_run["run_dir"]) / "resolved_config.yaml")]
        wall, log = self._run(name, cmd + ["--model", str(pi0), "--out", str(folder), "--threads", str(self.threads)])
        result = {**json.loads((folder / "result.json").read_text()), "wall_s": wall, "log": str(log)}
        print(f"  {name}: {_line(result)}, set-up {result['setup_s']:.1f} s", flush=True)
        return result

    def config(self, kit_run: dict) -> dict:
        import yaml

        return yaml.safe_load((Path(kit_run["run_dir"]) / "resolved_config.yaml").read_text())

    def export_pi0(self, log: str) -> Path:
        """The kit's cached warm start (its folder named in the run's log), saved as an HF folder for TRL."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        found = PI0_FOLDER.findall(Path(log).read_text())
        if not found:
            sys.exit(f"no warm-start cache folder named in {log}: cannot find the kit's pi0")
        cached = Path(found[-1]).expanduser()
        cached = cached if cached.is_absolute() else ROOT / cached
        target = self.out / "pi0"
        AutoModelForCausalLM.from_pretrained(cached, local_files_only=True).save_pretrained(target)
        AutoTokenizer.from_pretrained(cached).save_pretrained(target)
        print(f"  pi0: {cached} saved as {target}", flush=True)
        return target

    def _run(self, name: str, cmd: list[str]) -> tuple[float, Path]:
        log = self.out / f"{name}.log"
        with open(log, "w") as sink:
            started = time.perf_counter()
            code = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT).returncode
            wall = time.perf_counter() - started
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            sys.exit(f"{name} failed (exit {code}): {' '.join(cmd)}\n--- last lines of {log} ---\n{tail}")
        return wall, log


def scalars(folder: Path) -> dict[str, list[float]]:
    """Every scalar of a kit run's TensorBoard events, values in step order, per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            points.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: [v for _, v in sorted(p, key=lambda x: x[0])] for tag, p in points.items()}


def per_thousand(run: dict) -> float:
    return 1000 * run["loop_s"] / run["samples"]


def _line(run: dict) -> str:
    return (
        f"process {run['wall_s']:.1f} s, loop {run['loop_s']:.1f} s for {run['samples']} samples / "
        f"{run['updates']} updates / {run['tokens']} tokens ({per_thousand(run):.2f} s per 1k samples)"
    )


def print_matched(rows: list[tuple[str, str, str]], unmatched: list[str], settings: dict) -> None:
    print("\nHow the work is matched (TRL's settings derived from the kit run's resolved config)")
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f"{'setting':<{width[0]}} | {'kit':<{width[1]}} | TRL")
    print("-" * (width[0] + width[1] + 60))
    for setting, kit, trl in rows:
        print(f"{setting:<{width[0]}} | {kit:<{width[1]}} | {trl}")
    print("GRPOConfig: " + ", ".join(f"{k}={v!r}" for k, v in settings.items()))
    print("Not matched:")
    for line in unmatched:
        print(f"  - {line}")


def print_loop(kit: list[dict], trl: list[dict]) -> None:
    print(f"\n(a) the loop, first generation to last update (median of {len(kit)}; clocks in the docstring)")
    _check_same_work(kit, trl)
    table = [
        ("loop seconds", "loop_s", ".1f"),
        ("generated samples", "samples", ",.0f"),
        ("optimiser updates", "updates", ",.0f"),
        ("response tokens (EOS incl.)", "tokens", ",.0f"),
    ]
    rows = [(label, format(_median(kit, key), fmt), format(_median(trl, key), fmt)) for label, key, fmt in table]
    k_tok, t_tok = _median(kit, "tokens") / _median(kit, "samples"), _median(trl, "tokens") / _median(trl, "samples")
    rows.append(("tokens per sample", f"{k_tok:.1f}", f"{t_tok:.1f}"))
    k, t = statistics.median(map(per_thousand, kit)), statistics.median(map(per_thousand, trl))
    rows.append(("seconds per 1,000 samples", f"{k:.2f}", f"{t:.2f}"))
    _print_table(rows)
    print(f"TRL / kit: {t / k:.2f}x the kit's seconds per 1,000 samples")


def print_process(kit: list[dict], trl: list[dict]) -> None:
    print(f"\n(b) one iteration, whole process from start to exit (median of {len(kit)})")
    _check_same_work(kit, trl)
    k_wall, t_wall = _median(kit, "wall_s"), _median(trl, "wall_s")
    rows = [
        ("process seconds", f"{k_wall:.1f}", f"{t_wall:.1f}"),
        ("  of which the loop (clocks as in (a))", f"{_median(kit, 'loop_s'):.1f}", f"{_median(trl, 'loop_s'):.1f}"),
        ("  of which evaluation (kit default; TRL none)", f"{_median(kit, 'eval_s'):.1f}", f"{0.0:.1f}"),
        ("samples / updates", _work(kit), _work(trl)),
    ]
    _print_table(rows)
    print(f"TRL / kit: {t_wall / k_wall:.2f}x the kit's process seconds")


def _print_table(rows: list[tuple[str, str, str]]) -> None:
    """The kit's and TRL's numbers side by side (rich, plain text off a terminal)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("")
    table.add_column("kit", justify="right")
    table.add_column("TRL", justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=120).print(table)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _work(runs: list[dict]) -> str:
    return f"{runs[0]['samples']}/{runs[0]['updates']}"


def _check_same_work(kit: list[dict], trl: list[dict]) -> None:
    for a, b in zip(kit, trl):
        if (a["samples"], a["updates"]) != (b["samples"], b["updates"]):
            print(
                f"WARNING: not the same work: kit {a['samples']} samples / {a['updates']} updates, "
                f"TRL {b['samples']} / {b['updates']}"
            )


if __name__ == "__main__":
    main()
