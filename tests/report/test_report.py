"""dibs.report on fake grids: real TensorBoard event files, resolved configs and Hydra files written by hand, with
curves whose report numbers are derived by hand in the comments (TensorBoard stores float32: compare approx)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from dibs.report import ReportError, build_report
from dibs.report.build import report_from_config
from dibs.report.grid import load_grid
from dibs.report.metrics import acc_at_fraction, compute, estep_numbers, first_reaching, mean_over_run

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0  # event wall times

# Evaluations at steps 0, 10, 20, 30. Per run: cumulative samples and val/acc; tokens = 10 × samples,
# updates = 4 × evaluation index, wall_s = samples / 10. Budget: 200 samples.
CURVES = {
    ("raft", 0): ([0, 60, 130, 200], [0.10, 0.20, 0.25, 0.30]),
    ("raft", 1): ([0, 40, 110, 190], [0.10, 0.30, 0.35, 0.40]),
    ("raftpp", 0): ([0, 50, 100, 200], [0.10, 0.40, 0.45, 0.50]),
    ("raftpp", 1): ([0, 50, 100, 200], [0.20, 0.40, 0.50, 0.60]),
}

# Hydra's saved sweep config; its other interpolations (${now:...}, ${hydra.runtime...}, an unknown resolver) would
# fail or change if resolved: reading the axes must leave them alone.
MULTIRUN = """\
hydra:
  run:
    dir: outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}
  sweep:
    dir: multirun/${grid.name}/${now:%Y-%m-%d_%H-%M-%S}
    subdir: ${hydra.job.override_dirname}
  sweeper:
    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper
    params: PARAMS
  job_logging:
    handlers:
      file:
        filename: ${hydra.runtime.output_dir}/${hydra.job.name}.log
  searchpath:
  - file://${unregistered_resolver:experiments}
  overrides:
    hydra:
    - hydra.mode=MULTIRUN
    task: TASK
seed: 0
grid:
  name: toy
  axes:
    algo: raft,raftpp
    seed: 0,1
"""


def markdown(report: Path) -> str:
    """report.md with each table row's cells stripped of the padding that aligns the columns (``| a | 1 |``), so the
    assertions name the cells, not the column widths."""
    lines = []
    for line in report.read_text().splitlines():
        if line.startswith("|"):
            line = "| " + " | ".join(cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]) + " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_multirun(folder: Path, task: list[str], params: str = "${grid.axes}") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = MULTIRUN.replace("PARAMS", params).replace("TASK", json.dumps(task))
    (folder / "multirun.yaml").write_text(text)


def config(run_dir: Path, algo: str, seed: int, **changes) -> dict:
    cfg = {
        "seed": seed,
        "iterations": 100,
        "prompts_per_iteration": 10,
        "batch_size": 4,
        "updates_per_iteration": 4,
        "eval": {"samples": 2},
        "algo": {"loss": algo, "lr": 0.001 if algo == "raft" else 0.002, "betas": [0.9, 0.999]},
        "allocation": {"_target_": "dibs.core.sampling.Uniform", "n_per_prompt": 4},
        "budget": {"samples": 200, "tokens": None, "updates": None},
        "grid": {"name": "toy", "axes": {"algo": "raft,raftpp", "seed": "0,1"}, "baseline": "algo=raft", "target": 0.3},
        "logger": {"save_dir": str(run_dir), "name": "tb"},  # resolved from run_dir: differs per run, not an axis
        "run_dir": str(run_dir),
        "ckpt_path": None,
    }
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def write_events(
    folder: Path,
    samples: list[float],
    acc: list[float],
    *,
    start: int = 0,
    wall: float = T0,
    levels: dict[str, list[float]] | None = None,
) -> None:
    """``levels``: per-level accuracy per evaluation; default level 1 = acc + 0.2, level 2 = acc / 2."""
    if levels is None:
        levels = {"1": [min(1.0, a + 0.2) for a in acc], "2": [a / 2 for a in acc]}
    writer = SummaryWriter(log_dir=str(folder))
    for i, (s, a) in enumerate(zip(samples, acc)):
        step, t = 10 * (start + i), wall + start + i
        scalars = {
            "val/acc": a,
            **{f"val/acc_level_{level}": values[i] for level, values in levels.items()},
            "cost/samples": s,
            "cost/tokens": 10 * s,
            "cost/updates": 4 * (start + i),
            "cost/wall_s": s / 10,
            "train/loss": 1.0,  # ignored
        }
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step, walltime=t)
    writer.close()


def write_run(
    root: Path,
    algo: str,
    seed: int,
    *,
    name: str | None = None,
    overrides: list[str] | None = None,
    events: bool = True,
    **changes,
) -> Path:
    run = root / (name or f"algo={algo},seed={seed}")
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config(run, algo, seed, **changes)), run / "resolved_config.yaml")
    default = [f"algo={algo}", f"seed={seed}", "+grid=toy", "experiment=smoke"]
    OmegaConf.save(OmegaConf.create(overrides if overrides is not None else default), run / ".hydra" / "overrides.yaml")
    if events:
        write_events(run / "tb", *CURVES[(algo, seed)])
    return run


def make_grid(root: Path, task: list[str] | None = None, **changes) -> Path:
    write_multirun(root, task if task is not None else ["+grid=toy", "experiment=smoke"])
    for algo, seed in CURVES:
        write_run(root, algo, seed, **changes)
    return root


# ---- happy path ---------------------------------------------------------------------------------------------
def test_happy_path(tmp_path):
    grid = make_grid(tmp_path / "grid")
    report = build_report(grid)
    assert report == grid / "report" / "report.md"
    text = markdown(report)
    for section in (
        "## Final metrics",
        "## Accuracy at fractions of the budget",
        "## Cost to reach the target",
        "## Accuracy vs cost",
    ):
        assert section in text
    assert "# Grid report: toy" in text
    assert "4 runs, 2 configurations, 2 seeds (0, 1)" in text
    assert "Declared axes: `algo`, `seed`" in text
    assert "Reproduce: `python train.py -m +grid=toy experiment=smoke`" in text
    assert "Budget: 200 samples per run (`budget.samples`" in text
    assert "`batch_size`=4" in text and "`allocation.n_per_prompt`=4" in text
    assert "`algo.lr`" not in text.split("## Final metrics")[0]  # an axis' sub-key is not "held equal"

    # (a) raft: pi0 0.10, 0.10 → 10.0 ± 0.0; final 0.30, 0.40 → mean 35.0, std |0.1|/√2 = 7.1; gain 0.20, 0.30 →
    # +25.0 ± 7.1; level 1 final 0.50, 0.60 → 55.0 ± 7.1; level 2 0.15, 0.20 → 17.5 ± 3.5; samples 200, 190 →
    # 195 ± 7; tokens 2,000, 1,900 → 1,950 ± 71; updates 12, 12 → 12 ± 0; wall 20.0, 19.0 → 19.5 ± 0.7.
    assert (
        "| algo=raft | 2 | 10.0 ± 0.0 | 35.0 ± 7.1 | +25.0 ± 7.1 | 55.0 ± 7.1 | 17.5 ± 3.5 | 195 ± 7 | 1,950 ± 71 "
        "| 12 ± 0 | 19.5 ± 0.7 |" in text
    )
    # raftpp: pi0 0.10, 0.20 → 15.0 ± 7.1; final 0.50, 0.60 → 55.0 ± 7.1; gain 0.40, 0.40 → +40.0 ± 0.0.
    assert "| algo=raftpp | 2 | 15.0 ± 7.1 | 55.0 ± 7.1 | +40.0 ± 0.0 |" in text

    # (b) thresholds 50/100/150/200 samples; the last evaluation with cost ≤ threshold:
    # raft s0 (0,60,130,200) → 0.10, 0.20, 0.25, 0.30; s1 (0,40,110,190) → 0.30, 0.30, 0.35, 0.40
    # → 20.0 ± 14.1, 25.0 ± 7.1, 30.0 ± 7.1, 35.0 ± 7.1.
    # raftpp (0,50,100,200; 50 ≤ 50 counts) s0 → .40 .45 .45 .50; s1 → .40 .50 .50 .60
    # → 40.0 ± 0.0, 47.5 ± 3.5, 47.5 ± 3.5, 55.0 ± 7.1.
    assert (
        "| Configuration | 25% (≤ 50 samples) | 50% (≤ 100 samples) | 75% (≤ 150 samples) | 100% (≤ 200 samples) |"
        in text
    )
    assert "| algo=raft | 20.0 ± 14.1 | 25.0 ± 7.1 | 30.0 ± 7.1 | 35.0 ± 7.1 |" in text
    assert "| algo=raftpp | 40.0 ± 0.0 | 47.5 ± 3.5 | 47.5 ± 3.5 | 55.0 ± 7.1 |" in text
    assert "LAST evaluation" in text

    # (c) target 0.30 from grid.target. raft: s0 first ≥ 0.30 at index 3 (200 samples), s1 at index 1 (40)
    # → samples 120 ± 113 (std 160/√2), tokens 1,200 ± 1,131, updates 12, 4 → 8 ± 6, wall 20.0, 4.0 → 12.0 ± 11.3.
    # raftpp: both at index 1 (0.40, 50 samples) → 50 ± 0, 500 ± 0, 4 ± 0, 5.0 ± 0.0.
    # Speed-up vs algo=raft: 120/50 = 2.40, 1200/500 = 2.40, 8/4 = 2.00, 12/5 = 2.40.
    assert "Target: 30.0% held-out accuracy (`grid.target` in the runs' config)" in text
    assert "| algo=raft | 2/2 | 120 ± 113 | 1,200 ± 1,131 | 8 ± 6 | 12.0 ± 11.3 |" in text
    assert "| algo=raftpp | 2/2 | 50 ± 0 | 500 ± 0 | 4 ± 0 | 5.0 ± 0.0 |" in text
    assert "| algo=raft | 1.00× | 1.00× | 1.00× | 1.00× |  |" in text
    assert "| algo=raftpp | 2.40× | 2.40× | 2.00× | 2.40× |  |" in text
    assert "ratio of means" in text and "generated samples (the allocation pilot included" in text

    # (d) four valid PNGs, embedded with relative links
    for unit in ("samples", "tokens", "updates", "wall_s"):
        png = grid / "report" / f"acc_vs_{unit}.png"
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert f"](acc_vs_{unit}.png)" in text
    assert "mean ± 1 sample std over seeds" in text

    numbers = json.loads((grid / "report" / "report.json").read_text())
    assert numbers["configurations"] == ["algo=raft", "algo=raftpp"]
    assert numbers["budget"] == {"unit": "samples", "amount": 200.0, "source": "`budget.samples` in the runs' config"}
    raft = numbers["final"]["algo=raft"]
    assert raft["final_acc"]["mean"] == pytest.approx(0.35) and raft["final_acc"]["std"] == pytest.approx(0.0707107)
    assert raft["seeds"] == [0, 1]
    assert [e["acc"]["mean"] for e in numbers["fractions"]["algo=raft"]] == pytest.approx([0.2, 0.25, 0.3, 0.35])
    assert numbers["target"]["value"] == pytest.approx(0.3)
    pp = numbers["target_cost"]["algo=raftpp"]
    assert pp["speedup"] == pytest.approx({"samples": 2.4, "tokens": 2.4, "updates": 2.0, "wall_s": 2.4})
    assert numbers["target_cost"]["algo=raft"]["cost"]["samples"]["values"] == pytest.approx([200, 40])
    assert numbers["plots"]["samples"] == "acc_vs_samples.png"


def test_defaults_target_baseline_budget_out_dir(tmp_path):
    no_budget = {"samples": None, "tokens": None, "updates": None}
    grid = make_grid(tmp_path / "grid", budget=no_budget, **{"grid.target": None, "grid.baseline": None})
    report = build_report(grid, out_dir=tmp_path / "elsewhere")
    assert report == tmp_path / "elsewhere" / "report.md"
    numbers = json.loads((tmp_path / "elsewhere" / "report.json").read_text())
    # the highest accuracy every run reaches: run bests 0.30, 0.40, 0.50, 0.60 → 0.30 (raft seed 0)
    assert numbers["target"]["value"] == pytest.approx(0.30)
    assert (
        "the highest accuracy every run reaches: the best evaluation of algo=raft,seed=0, 30.0%" in report.read_text()
    )
    assert all(row["reached"] == row["n"] for row in numbers["target_cost"].values())
    assert numbers["baseline"]["configuration"] == "algo=raft"
    assert numbers["baseline"]["source"] == "the first configuration"
    # no budget set: samples, the largest final cost/samples (200), said in the report
    assert numbers["budget"]["unit"] == "samples" and numbers["budget"]["amount"] == pytest.approx(200)
    assert "Budget: 200 samples per run (no budget set in the runs' config" in report.read_text()


def test_some_seeds_miss_the_target(tmp_path):
    grid = make_grid(tmp_path / "grid")
    # target 0.40: raft s0 tops at 0.30 (never), s1 reaches 0.40 at 190 samples → 1/2; raftpp both at 50 → 2/2.
    text = markdown(build_report(grid, target=0.4))
    assert "| algo=raft | 1/2 | 190 | 1,900 | 12 | 19.0 |" in text
    assert "| algo=raftpp | n/a | n/a | n/a | n/a | baseline 1/2 seeds reached |" in text
    text = markdown(build_report(grid, target=0.4, baseline="algo=raftpp"))
    assert "| algo=raft | n/a | n/a | n/a | n/a | 1/2 seeds reached |" in text
    assert "| algo=raftpp | 1.00× | 1.00× | 1.00× | 1.00× |  |" in text


def test_runs_ending_above_the_budget(tmp_path):
    grid = make_grid(tmp_path / "grid", **{"budget.samples": 190})
    text = markdown(build_report(grid))
    # 100% = 190 samples: raft s0 reads 0.25 (at 130; 200 > 190), s1 0.40 (at 190) → 32.5 ± 10.6
    assert "| algo=raft | 20.0 ± 14.1 |" in text and "| 32.5 ± 10.6 |" in text
    assert "3 run(s) end above the budget" in text


def test_rules_on_a_curve(tmp_path):
    """The step function at fractions and the first crossing, on raft seed 1 (samples 0, 40, 110, 190)."""
    grid = load_grid(make_grid(tmp_path / "grid"))
    curve = next(r.curve for r in grid.runs if r.label == "algo=raft" and r.seed == 1)
    assert acc_at_fraction(curve, "samples", 39) == pytest.approx(0.10)  # only pi0 is ≤ 39
    assert acc_at_fraction(curve, "samples", 40) == pytest.approx(0.30)  # ≤ is inclusive
    assert acc_at_fraction(curve, "samples", 109.9) == pytest.approx(0.30)  # no interpolation towards 0.35
    assert acc_at_fraction(curve, "samples", 1e9) == pytest.approx(0.40)
    assert first_reaching(curve, 0.35) == 2  # float32(0.35) < 0.35 still counts
    assert first_reaching(curve, 0.41) is None
    data = compute(grid, fractions=(0.2,))  # 40 samples: raft s0 → 0.10, s1 → 0.30
    assert data["fractions"]["algo=raft"][0]["acc"]["values"] == pytest.approx([0.1, 0.3])


# Per-level accuracy (levels 1 and 2) for the per-level section; samples and val/acc are those of CURVES. raftpp
# gains on the hard level 2 only.
LEVEL_CURVES = {
    ("raft", 0): {"1": [0.50, 0.60, 0.60, 0.70], "2": [0.00, 0.00, 0.10, 0.10]},  # samples 0, 60, 130, 200
    ("raft", 1): {"1": [0.50, 0.70, 0.70, 0.70], "2": [0.00, 0.10, 0.10, 0.20]},  # samples 0, 40, 110, 190
    ("raftpp", 0): {"1": [0.50, 0.50, 0.60, 0.60], "2": [0.00, 0.20, 0.30, 0.40]},  # samples 0, 50, 100, 200
    ("raftpp", 1): {"1": [0.60, 0.60, 0.70, 0.70], "2": [0.10, 0.30, 0.30, 0.50]},  # samples 0, 50, 100, 200
}


def make_level_grid(root: Path, levels: dict = LEVEL_CURVES, **changes) -> Path:
    write_multirun(root, ["+grid=toy", "experiment=smoke"])
    for (algo, seed), (samples, acc) in CURVES.items():
        run = write_run(root, algo, seed, events=False, **changes)
        write_events(run / "tb", samples, acc, levels=levels[(algo, seed)])
    return root


def test_per_level_accuracy_at_fractions_and_mean_over_run(tmp_path):
    grid = make_level_grid(tmp_path / "grid")
    text = markdown(build_report(grid))
    section = text.split("## Accuracy per difficulty level vs samples\n")[1].split("\n## ")[0]
    level_1, level_2 = section.split("### Level 1")[1].split("### Level 2")

    # At 50/100/150/200 samples the step function reads evaluation 0, 1, 2, 3 of raft s0 (0, 60, 130, 200),
    # 1, 1, 2, 3 of raft s1 (0, 40, 110, 190) and 1, 2, 2, 3 of raftpp (0, 50, 100, 200; 50 ≤ 50 counts).
    # Mean over run: Σ acc_i × (cost_{i+1} − cost_i), the last evaluation held to 200, / 200; the widths are
    # raft s0 60, 70, 70, 0; raft s1 40, 70, 80, 10; raftpp 50, 50, 100, 0.
    # Level 1, raft: s0 .50 .60 .60 .70, s1 .70 .70 .70 .70 → 60.0 ± 14.1, 65.0 ± 7.1, 65.0 ± 7.1, 70.0 ± 0.0;
    #   mean over run s0 (30 + 42 + 42) / 200 = .57, s1 (20 + 49 + 56 + 7) / 200 = .66 → 61.5 ± 6.4 (.09/√2).
    # Level 1, raftpp: s0 .50 .60 .60 .60, s1 .60 .70 .70 .70 → 55.0 ± 7.1, 65.0 ± 7.1, 65.0 ± 7.1, 65.0 ± 7.1;
    #   s0 (25 + 25 + 60) / 200 = .55, s1 (30 + 30 + 70) / 200 = .65 → 60.0 ± 7.1.
    header = (
        "| Configuration | 25% (≤ 50 samples) | 50% (≤ 100 samples) | 75% (≤ 150 samples) | 100% (≤ 200 samples) "
        "| Mean over run |"
    )
    assert header in level_1 and header in level_2
    assert "| algo=raft | 60.0 ± 14.1 | 65.0 ± 7.1 | 65.0 ± 7.1 | 70.0 ± 0.0 | 61.5 ± 6.4 |" in level_1
    assert "| algo=raftpp | 55.0 ± 7.1 | 65.0 ± 7.1 | 65.0 ± 7.1 | 65.0 ± 7.1 | 60.0 ± 7.1 |" in level_1
    # Level 2, raft: s0 .00 .00 .10 .10, s1 .10 .10 .10 .20 → 5.0 ± 7.1, 5.0 ± 7.1, 10.0 ± 0.0, 15.0 ± 7.1;
    #   s0 (.1 × 70) / 200 = .035, s1 (7 + 8 + 2) / 200 = .085 → 6.0 ± 3.5 (.05/√2).
    # Level 2, raftpp: s0 .20 .30 .30 .40, s1 .30 .30 .30 .50 → 25.0 ± 7.1, 30.0 ± 0.0, 30.0 ± 0.0, 45.0 ± 7.1;
    #   s0 (10 + 30) / 200 = .20, s1 (5 + 15 + 30) / 200 = .25 → 22.5 ± 3.5.
    assert "| algo=raft | 5.0 ± 7.1 | 5.0 ± 7.1 | 10.0 ± 0.0 | 15.0 ± 7.1 | 6.0 ± 3.5 |" in level_2
    assert "| algo=raftpp | 25.0 ± 7.1 | 30.0 ± 0.0 | 30.0 ± 0.0 | 45.0 ± 7.1 | 22.5 ± 3.5 |" in level_2
    assert "area under a seed's step-function accuracy–samples curve from 0 to the budget (200 samples" in section

    png = grid / "report" / "accuracy_vs_samples_by_level.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    assert "](accuracy_vs_samples_by_level.png)" in section

    per = json.loads((grid / "report" / "report.json").read_text())["per_level"]
    assert per["unit"] == "samples" and per["span"] == 200 and per["levels"] == ["1", "2"]
    assert per["plot"] == "accuracy_vs_samples_by_level.png"
    assert per["mean_over_run"]["1"]["algo=raft"]["values"] == pytest.approx([0.57, 0.66])
    assert per["mean_over_run"]["2"]["algo=raftpp"]["values"] == pytest.approx([0.20, 0.25])
    assert [e["acc"]["mean"] for e in per["fractions"]["2"]["algo=raftpp"]] == pytest.approx([0.25, 0.3, 0.3, 0.45])


def test_per_level_rules_on_a_curve(tmp_path):
    """The step function and its area on one level of raft seed 0 (samples 0, 60, 130, 200; level 1 .5 .6 .6 .7)."""
    grid = load_grid(make_level_grid(tmp_path / "grid"))
    curve = next(r.curve for r in grid.runs if r.label == "algo=raft" and r.seed == 0)
    assert acc_at_fraction(curve, "samples", 59, level="1") == pytest.approx(0.50)
    assert acc_at_fraction(curve, "samples", 60, level="2") == pytest.approx(0.00)
    assert acc_at_fraction(curve, "samples", 130, level="2") == pytest.approx(0.10)
    assert acc_at_fraction(curve, "samples", 130) == pytest.approx(0.25)  # no level: val/acc
    # cut at 150: (.5 × 60 + .6 × 70 + .6 × 20) / 150 = 84 / 150 = .56 (the evaluation at 200 has no weight)
    assert mean_over_run(curve, "samples", 150, level="1") == pytest.approx(0.56)
    # a budget past the run's end: the last evaluation holds, (114 + .7 × 50) / 250 = .596
    assert mean_over_run(curve, "samples", 250, level="1") == pytest.approx(0.596)
    # overall val/acc (.10 .20 .25 .30): (6 + 14 + 17.5) / 200 = .1875
    assert mean_over_run(curve, "samples", 200) == pytest.approx(0.1875)


def test_per_level_section_on_the_budget_axis_and_without_levels(tmp_path):
    # a budget in tokens (10 × samples): the same evaluations at 500/1,000/1,500/2,000 tokens, the same numbers
    tokens = {"samples": None, "tokens": 2000, "updates": None}
    text = markdown(build_report(make_level_grid(tmp_path / "tokens", budget=tokens)))
    section = text.split("## Accuracy per difficulty level vs tokens (the budget's unit)\n")[1].split("\n## ")[0]
    assert "| Configuration | 25% (≤ 500 tokens) |" in section
    assert "| algo=raftpp | 25.0 ± 7.1 | 30.0 ± 0.0 | 30.0 ± 0.0 | 45.0 ± 7.1 | 22.5 ± 3.5 |" in section
    assert "from 0 to the budget (2,000 tokens" in section
    assert (tmp_path / "tokens" / "report" / "accuracy_vs_samples_by_level.png").is_file()  # against samples still

    no_levels = {key: {} for key in LEVEL_CURVES}
    text = markdown(build_report(make_level_grid(tmp_path / "plain", levels=no_levels)))
    assert "per difficulty level" not in text and "### Level" not in text
    assert not (tmp_path / "plain" / "report" / "accuracy_vs_samples_by_level.png").exists()


# E-step scalars, one value per EM iteration: iteration i logs them at step 10 × i (before its updates), half a
# second before the evaluation after it (step 10 × (i + 1)). Allocation uniform: no pilot, no alloc/*; gvm: a pilot
# and the alloc/* diagnostics. "samples" is each run's cumulative cost/samples at its four evaluations.
ESTEP_RUNS = {
    ("uniform", 0): {
        "samples": [0, 64, 128, 192],
        "rollout/samples": [64, 64, 64],
        "rollout/accept_rate": [0.25, 0.5, 0.75],
        "pilot/samples_cum": [0, 0, 0],
    },
    ("uniform", 1): {  # an older run: no pilot/samples_cum at all
        "samples": [0, 64, 128, 192],
        "rollout/samples": [64, 64, 64],
        "rollout/accept_rate": [0.125, 0.25, 0.375],
    },
    ("gvm", 0): {
        "samples": [0, 64, 128, 192],
        "rollout/samples": [48, 48, 48],
        "rollout/accept_rate": [0.5, 0.5, 0.75],
        "pilot/samples_cum": [16, 32, 48],
        "alloc/zero_frac": [0.1, 0.2, 0.3],
        "alloc/gini": [0.2, 0.3, 0.4],
        "alloc/variance_vs_uniform": [0.9, 0.8, 0.7],
        "alloc/pilot_unsolved_frac": [0.5, 0.4, 0.3],
        "alloc/predicted_accept": [0.5, 0.6, math.nan],  # no fresh sample in its last iteration
        "alloc/realised_accept": [0.4, 0.5, 0.6],
    },
    ("gvm", 1): {
        "samples": [0, 60, 120, 180],
        "rollout/samples": [40, 40, 40],
        "rollout/accept_rate": [0.5, 0.75, 0.75],
        "pilot/samples_cum": [12, 24, 36],
        "alloc/zero_frac": [0.3, 0.3, 0.3],
        "alloc/gini": [0.4, 0.5, 0.6],
        "alloc/variance_vs_uniform": [0.6, 0.6, 0.6],
        "alloc/pilot_unsolved_frac": [0.5, 0.5, 0.5],
        "alloc/predicted_accept": [0.6, 0.6, 0.6],
        "alloc/realised_accept": [0.5, 0.5, 0.5],
    },
}


def write_iterations(
    folder: Path, scalars: dict[str, list[float]], *, numbers: list[int], steps: list[int] | None = None, wall=T0
) -> None:
    """Per-iteration scalars, the k-th value of each for iteration ``numbers[k]`` (also logged as ``iteration``) at
    ``steps[k]`` (default 10 × the number)."""
    steps = steps if steps is not None else [10 * n for n in numbers]
    writer = SummaryWriter(log_dir=str(folder))
    for k, (number, step) in enumerate(zip(numbers, steps)):
        for tag, value in {**{tag: values[k] for tag, values in scalars.items()}, "iteration": number}.items():
            writer.add_scalar(tag, value, step, walltime=wall + number + 0.5)
    writer.close()


def make_estep_grid(root: Path) -> Path:
    write_multirun(root, ["+grid=toy"], params="{allocation: 'uniform,gvm', seed: '0,1'}")
    targets = {"uniform": "dibs.core.sampling.Uniform", "gvm": "dibs.core.sampling.GVM"}
    for (allocation, seed), scalars in ESTEP_RUNS.items():
        run = write_run(
            root,
            "raft",
            seed,
            name=f"allocation={allocation},seed={seed}",
            overrides=[f"allocation={allocation}", f"seed={seed}", "+grid=toy"],
            events=False,
            allocation={"_target_": targets[allocation], "n_per_prompt": 4},
            **{"grid.baseline": "allocation=uniform", "budget.samples": 192},
        )
        samples, per_iteration = scalars["samples"], {k: v for k, v in scalars.items() if k != "samples"}
        write_events(run / "tb", samples, [0.10, 0.20, 0.25, 0.30])
        write_iterations(run / "tb", per_iteration, numbers=[0, 1, 2])
    return root


def test_estep_diagnostics(tmp_path):
    root = make_estep_grid(tmp_path / "grid")
    text = markdown(build_report(root))
    section = text.split("## E-step diagnostics\n")[1].split("\n## ")[0]
    assert (
        "| Configuration | Generated samples | Pilot share (%) | Accepted / iteration | Zero-sample prompts (%) | Gini "
        "| Variance vs uniform | Pilot-unsolved (%) | Predicted accept (%) | Realised accept (%) |" in section
    )
    # uniform: generated 192, 192 → 192 ± 0; pilot share 0 / 192 = 0 and 0 (no pilot logged) → 0.0 ± 0.0;
    # accepted per iteration s0 .25/.5/.75 × 64 = 16, 32, 48 → 32, s1 .125/.25/.375 × 64 = 8, 16, 24 → 16
    # → 24.0 ± 11.3 (16/√2); no alloc/* → "–" in each alloc column.
    assert "| allocation=uniform | 192 ± 0 | 0.0 ± 0.0 | 24.0 ± 11.3 | – | – | – | – | – | – |" in section
    # gvm: generated 192, 180 → 186 ± 8 (12/√2 = 8.5); pilot share 48/192 = 25%, 36/180 = 20% → 22.5 ± 3.5;
    # accepted s0 .5/.5/.75 × 48 = 24, 24, 36 → 28, s1 .5/.75/.75 × 40 = 20, 30, 30 → 26.67 → 27.3 ± 0.9 (1.33/√2);
    # means over iterations, s0 then s1 → mean ± std (0.1/√2 = 0.0707, 0.2/√2 = 0.1414, 0.05/√2 = 0.0354):
    # zero_frac .2, .3 → 25.0 ± 7.1; gini .3, .5 → 0.400 ± 0.141; variance_vs_uniform .8, .6 → 0.700 ± 0.141;
    # pilot_unsolved .4, .5 → 45.0 ± 7.1; predicted .55 (NaN skipped), .6 → 57.5 ± 3.5; realised .5, .5 → 50.0 ± 0.0
    assert (
        "| allocation=gvm | 186 ± 8 | 22.5 ± 3.5 | 27.3 ± 0.9 | 25.0 ± 7.1 | 0.400 ± 0.141 | 0.700 ± 0.141 "
        "| 45.0 ± 7.1 | 57.5 ± 3.5 | 50.0 ± 0.0 |" in section
    )
    for words in ("*Generated samples*: the run's final `cost/samples`", "*Pilot share*:", "*Accepted / iteration*:"):
        assert words in section
    assert "*Gini*: the mean over iterations of the Gini coefficient" in section
    assert "*Realised accept (%)*:" in section and "– marks a configuration that does not log them" in section

    estep = json.loads((root / "report" / "report.json").read_text())["estep"]
    assert estep["alloc_tags"] == [
        "alloc/zero_frac",
        "alloc/gini",
        "alloc/variance_vs_uniform",
        "alloc/pilot_unsolved_frac",
        "alloc/predicted_accept",
        "alloc/realised_accept",
    ]
    uniform, gvm = estep["configurations"]["allocation=uniform"], estep["configurations"]["allocation=gvm"]
    assert uniform["accepted_per_iteration"]["values"] == pytest.approx([32, 16])
    assert uniform["pilot_share"]["values"] == [0.0, 0.0]
    assert uniform["alloc"]["alloc/gini"] == {"mean": None, "std": None, "n": 0, "values": []}
    assert gvm["generated_samples"]["values"] == pytest.approx([192, 180])
    assert gvm["pilot_share"]["values"] == pytest.approx([0.25, 0.20])
    assert gvm["accepted_per_iteration"]["values"] == pytest.approx([28, 80 / 3])
    assert gvm["alloc"]["alloc/predicted_accept"]["values"] == pytest.approx([0.55, 0.6])
    assert gvm["alloc"]["alloc/variance_vs_uniform"]["mean"] == pytest.approx(0.7)


def test_estep_section_without_alloc_scalars(tmp_path):
    # the toy grid logs no E-step scalar: generated samples from cost/samples (raft 200, 190 → 195 ± 7; raftpp 200,
    # 200 → 200 ± 0), pilot share 0, accepted "–"; no run logs alloc/*, so those columns are left out
    text = markdown(build_report(make_grid(tmp_path / "grid")))
    section = text.split("## E-step diagnostics\n")[1].split("\n## ")[0]
    assert "| Configuration | Generated samples | Pilot share (%) | Accepted / iteration |\n" in section
    assert "| algo=raft | 195 ± 7 | 0.0 ± 0.0 | – |" in section
    assert "| algo=raftpp | 200 ± 0 | 0.0 ± 0.0 | – |" in section
    assert "Gini" not in section and "alloc/" not in section
    assert json.loads((tmp_path / "grid" / "report" / "report.json").read_text())["estep"]["alloc_tags"] == []


def test_estep_iterations_without_updates_and_a_resumed_repeat(tmp_path):
    root = make_estep_grid(tmp_path / "grid")
    run = root / "allocation=gvm,seed=1"
    for f in (run / "tb").iterdir():
        f.unlink()
    write_events(run / "tb", [0, 60, 120, 180], [0.10, 0.20, 0.25, 0.30])
    # iteration 1 accepted nothing, so made no update: iterations 1 and 2 both log at step 10. The run was killed
    # after logging iteration 2 and resumed from the checkpoint after iteration 1: iteration 2 is logged again at
    # step 10, later, with other values (the latest wins). Iteration 3 follows at step 20.
    first = {"rollout/samples": [40, 40, 40], "rollout/accept_rate": [0.5, 0.0, 0.25], "alloc/gini": [0.4, 0.5, 0.9]}
    write_iterations(run / "tb", {**first, "pilot/samples_cum": [12, 24, 36]}, numbers=[0, 1, 2], steps=[0, 10, 10])
    again = {"rollout/samples": [40, 40], "rollout/accept_rate": [0.75, 1.0], "alloc/gini": [0.6, 0.7]}
    write_iterations(
        run / "tb", {**again, "pilot/samples_cum": [36, 48]}, numbers=[2, 3], steps=[10, 20], wall=T0 + 100
    )
    curve = next(r.curve for r in load_grid(root).runs if r.name == "allocation=gvm,seed=1")
    assert curve.iterations["rollout/accept_rate"].tolist() == pytest.approx([0.5, 0.0, 0.75, 1.0])
    assert curve.iterations["alloc/gini"].tolist() == pytest.approx([0.4, 0.5, 0.6, 0.7])
    assert "alloc/zero_frac" not in curve.iterations  # not logged by this run
    numbers = estep_numbers(curve)
    # accepted .5/0/.75/1 × 40 = 20, 0, 30, 40 → 22.5; gini (.4 + .5 + .6 + .7) / 4 = .55; pilot 48 / 180
    assert numbers["accepted_per_iteration"] == pytest.approx(22.5)
    assert numbers["alloc"] == pytest.approx({"alloc/gini": 0.55})
    assert numbers["pilot_share"] == pytest.approx(48 / 180)
    assert numbers["generated_samples"] == pytest.approx(180)


def test_resumed_run_repeat_of_an_evaluation_keeps_the_latest(tmp_path):
    root = make_grid(tmp_path / "grid")
    run = root / "algo=raft,seed=0"
    for f in (run / "tb").iterdir():
        f.unlink()
    # killed after logging the evaluation at step 20 (130 samples) but before its checkpoint: the resumed run
    # re-runs that iteration from the checkpoint and logs step 20 again at the same 130 samples
    write_events(run / "tb", [0, 60, 130], [0.10, 0.20, 0.99])
    write_events(run / "tb", [130, 200], [0.25, 0.30], start=2, wall=T0 + 100)  # steps 20, 30, later wall time
    grid = load_grid(root)
    curve = next(r.curve for r in grid.runs if r.name == "algo=raft,seed=0")
    assert curve.steps.tolist() == [0, 10, 20, 30]
    assert curve.acc.tolist() == pytest.approx([0.10, 0.20, 0.25, 0.30])
    assert curve.cost["samples"].tolist() == pytest.approx([0, 60, 130, 200])


def test_an_iteration_without_updates_keeps_both_evaluations_at_its_step(tmp_path):
    root = make_grid(tmp_path / "grid")
    run = root / "algo=raft,seed=0"
    for f in (run / "tb").iterdir():
        f.unlink()
    writer = SummaryWriter(log_dir=str(run / "tb"))
    # steps 0, 4, 4, 8: the second iteration accepted nothing, so made no update, but spent 60 more samples
    for i, (step, samples, acc) in enumerate([(0, 0, 0.1), (4, 60, 0.2), (4, 120, 0.22), (8, 200, 0.3)]):
        for tag, value in {
            "val/acc": acc,
            "cost/samples": samples,
            "cost/tokens": 10 * samples,
            "cost/updates": step,
            "cost/wall_s": samples / 10,
        }.items():
            writer.add_scalar(tag, value, step, walltime=T0 + i)
    writer.close()
    curve = next(r.curve for r in load_grid(root).runs if r.name == "algo=raft,seed=0")
    assert curve.steps.tolist() == [0, 4, 4, 8]
    assert curve.cost["samples"].tolist() == pytest.approx([0, 60, 120, 200])
    assert curve.acc.tolist() == pytest.approx([0.1, 0.2, 0.22, 0.3])
    assert curve.cost["updates"].tolist() == pytest.approx([0, 4, 4, 8])


def test_command_line_sweep_is_an_axis(tmp_path):
    root = tmp_path / "grid"
    # no sweeper params; the sweep comes from the command line, raftpp first
    write_multirun(root, ["algo=raftpp,raft", "seed=0,1", "experiment=smoke"], params="{}")
    for algo, seed in CURVES:
        write_run(root, algo, seed)
    grid = load_grid(root)
    assert grid.axes == ["algo", "seed"]
    assert grid.configurations == ["algo=raftpp", "algo=raft"]  # declared order, not sorted
    assert grid.commands == ["python train.py -m algo=raftpp,raft seed=0,1 experiment=smoke"]


def test_command_line_sweep_replaces_the_grid_order(tmp_path):
    root = tmp_path / "grid"
    write_multirun(root, ["+grid=toy", "algo=raftpp,raft"])  # grid.axes says raft,raftpp
    for algo, seed in CURVES:
        write_run(root, algo, seed)
    grid = load_grid(root)
    assert grid.axes == ["algo", "seed"] and grid.configurations == ["algo=raftpp", "algo=raft"]


def test_reproduce_command_covers_a_folder_completed_by_several_launches(tmp_path):
    """multirun.yaml keeps the LAST launch's overrides; the command is rebuilt from the runs the folder holds."""
    root = make_grid(tmp_path / "grid")
    write_multirun(root, ["+grid=toy", "experiment=smoke", "algo=raftpp", "seed=1"])  # the launch that finished it
    assert load_grid(root).commands == ["python train.py -m +grid=toy experiment=smoke"]  # the grid's own values
    part = tmp_path / "part"
    write_multirun(part, ["+grid=toy", "algo=raft", "seed=1"])
    for seed in (0, 1):
        write_run(part, "raft", seed)
    assert load_grid(part).commands == ["python train.py -m +grid=toy algo=raft"]  # seeds 0,1 are the grid's


def preset_grid(root: Path, **changes_of) -> Path:
    """A grid swept over presets (``experiment=``, a group of the global package: no key of the config): the
    preset p_raft sets algo.loss=raft and algo.lr=0.001, p_raftpp the RAFT++ ones."""
    write_multirun(root, ["experiment=p_raft,p_raftpp", "seed=0,1"], params="{}")
    for algo, seed in CURVES:
        preset = f"p_{algo}"
        changes = changes_of.get(f"{preset},{seed}", {})
        write_run(
            root,
            algo,
            seed,
            name=f"experiment={preset},seed={seed}",
            overrides=[f"experiment={preset}", f"seed={seed}"],
            **changes,
        )
    return root


def test_a_preset_axis_explains_what_its_presets_set(tmp_path):
    grid = load_grid(preset_grid(tmp_path / "grid"))
    assert grid.configurations == ["experiment=p_raft", "experiment=p_raftpp"]
    assert grid.preset_keys == {"experiment": ["algo.loss", "algo.lr"]}
    text = markdown(build_report(tmp_path / "grid", baseline="experiment=p_raft"))
    preset_line = (
        "- Set by the `experiment` axis (a preset), constant within each configuration: `algo.loss`, `algo.lr`"
    )
    assert preset_line in text


def test_a_preset_axis_does_not_explain_a_difference_within_a_configuration(tmp_path):
    root = preset_grid(tmp_path / "grid", **{"p_raft,1": {"batch_size": 8}})  # one seed of p_raft differs
    with pytest.raises(ReportError, match=r"'batch_size': .* has 4, experiment=p_raft,seed=1 has 8"):
        load_grid(root)


def test_axes_flag_without_multirun(tmp_path):
    root = tmp_path / "runs"
    for algo, seed in CURVES:
        write_run(root, algo, seed)
    with pytest.raises(ReportError, match=r"axes cannot be determined.*axes=\[k1,k2\]"):
        load_grid(root)
    grid = load_grid(root, axes=["algo", "seed"])
    assert grid.configurations == ["algo=raft", "algo=raftpp"]  # sorted
    assert grid.commands == []


def test_parent_of_two_sweeps(tmp_path):
    """A second launch added seed 2: runs are found recursively, axes united, grid.axes may differ."""
    parent = tmp_path / "toy"
    make_grid(parent / "2026-11-22_10-00-00")
    second = parent / "2026-11-23_09-00-00"
    write_multirun(second, ["+grid=toy", "seed=2"])
    CURVES[("raft", 2)] = CURVES[("raft", 0)]
    try:
        write_run(second, "raft", 2, **{"grid.axes": {"algo": "raft", "seed": "2"}})
        text = markdown(build_report(parent))
    finally:
        del CURVES[("raft", 2)]
    assert "5 runs, 2 configurations, 3 seeds (0, 1, 2)" in text
    assert text.count("- Reproduce: `python train.py -m") == 2
    assert "| algo=raft | 3 |" in text


# ---- refusals ---------------------------------------------------------------------------------------------------
def test_refuses_no_runs(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ReportError, match=r"empty: no runs found; a run folder holds resolved_config\.yaml"):
        build_report(tmp_path / "empty")


def test_refuses_run_without_events(tmp_path):
    root = make_grid(tmp_path / "grid")
    write_run(root, "raft", 2, events=False)
    with pytest.raises(ReportError, match=r"algo=raft,seed=2: no TensorBoard event files"):
        build_report(root)


def test_refuses_run_without_cost_scalars(tmp_path):
    root = make_grid(tmp_path / "grid")
    run = root / "algo=raftpp,seed=1"
    for f in (run / "tb").iterdir():
        f.unlink()
    writer = SummaryWriter(log_dir=str(run / "tb"))
    writer.add_scalar("val/acc", 0.1, 0)
    writer.close()
    with pytest.raises(ReportError, match=r"algo=raftpp,seed=1: .*lack the scalar\(s\) cost/samples, cost/tokens"):
        build_report(root)


def test_refuses_settings_beyond_the_axes(tmp_path):
    root = make_grid(tmp_path / "grid")
    write_run(root, "raft", 2, events=False, batch_size=8, rollout={"sampling": {"temperature": 0.7}})
    with pytest.raises(ReportError) as err:
        build_report(root)
    message = str(err.value)
    assert "'batch_size': algo=raft,seed=0 has 4, algo=raft,seed=2 has 8" in message
    assert "'rollout.sampling.temperature': algo=raft,seed=0 has '<absent>', algo=raft,seed=2 has 0.7" in message
    assert "axes: algo, seed" in message
    assert "add the key as an axis" in message and "separately" in message


def test_refuses_duplicates(tmp_path):
    root = make_grid(tmp_path / "grid")
    write_run(root / "again", "raft", 0)
    with pytest.raises(ReportError) as err:
        build_report(root)
    message = str(err.value)
    assert "algo=raft,seed=0 and " in message and "again/algo=raft,seed=0" in message and "duplicates" in message


def test_refuses_unknown_baseline(tmp_path):
    root = make_grid(tmp_path / "grid")
    with pytest.raises(ReportError, match=r"baseline 'raft' .*configurations are: 'algo=raft', 'algo=raftpp'"):
        build_report(root, baseline="raft")


def report_command(cwd: Path, *overrides: str, script: str | None = None) -> subprocess.CompletedProcess:
    """``python -m dibs.report`` (or the console script) as a user runs it, from ``cwd``."""
    command = [script] if script else [sys.executable, "-m", "dibs.report"]
    return subprocess.run([*command, *overrides], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_command_reports_a_grid_and_leaves_nothing_else(tmp_path):
    root = make_grid(tmp_path / "grid")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = report_command(cwd, f"sweep={root}", "target=0.4", "fractions=[0.5,1]")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"report written to {root / 'report' / 'report.md'}"]  # no log chatter
    text = markdown(root / "report" / "report.md")
    assert "| Configuration | 50% (≤ 100 samples) | 100% (≤ 200 samples) |" in text
    assert "Target: 40.0% held-out accuracy (given with target=)" in text
    assert list(cwd.iterdir()) == []  # no outputs/, .hydra/ or report.log of Hydra's own
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("algo=")) == ["multirun.yaml", "report"]


def test_the_command_takes_the_keys_of_conf_report_yaml(tmp_path):
    root = make_grid(tmp_path / "grid")
    proc = report_command(
        tmp_path, f"sweep={root}", f"out={tmp_path / 'elsewhere'}", "baseline='algo=raftpp'", "axes=[algo,seed]"
    )
    assert proc.returncode == 0, proc.stderr
    numbers = json.loads((tmp_path / "elsewhere" / "report.json").read_text())
    assert numbers["baseline"]["configuration"] == "algo=raftpp" and numbers["baseline"]["source"] == "baseline="
    assert not (root / "report").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "sweep=<the grid's folder> is required, e.g. `dibs-report sweep=multirun/"),
        (["sweep=nothing-here"], "sweep=nothing-here: no such folder"),
        (["sweep=GRID", "baseline=nope"], "baseline 'nope' (from baseline=) is neither a configuration of the grid"),
        (["sweep=GRID", "target=abc"], "target='abc': an accuracy in (0, 1]"),
        (["sweep=GRID", "target=1.5"], "target is an accuracy in (0, 1]; got 1.5"),
        (["sweep=GRID", "fractions=[0.5,x]"], "fractions=[0.5, 'x']: a list of budget fractions"),
    ],
)
def test_the_command_refuses_with_the_key_at_fault_and_exits_2(tmp_path, overrides, message):
    root = make_grid(tmp_path / "grid")
    proc = report_command(tmp_path, *(o.replace("GRID", str(root)) for o in overrides))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_console_script_is_the_same_command(tmp_path):
    script = Path(sys.executable).with_name("dibs-report")
    if not script.exists():
        pytest.skip("dibs is not installed in this environment (no dibs-report script)")
    root = make_grid(tmp_path / "grid")
    proc = report_command(tmp_path, f"sweep={root}", script=str(script))
    assert proc.returncode == 0, proc.stderr
    assert (root / "report" / "report.md").is_file()
    assert "dibs-report sweep=" in report_command(tmp_path, "--help", script=str(script)).stdout


def test_report_from_config_reads_the_composed_config(tmp_path):
    root = make_grid(tmp_path / "grid")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="dibs.configs", version_base="1.3"):
        cfg = compose(config_name="report", overrides=[f"sweep={root}", "fractions=[1]"])
    GlobalHydra.instance().clear()
    assert cfg.out == f"{root}/report"  # the default follows the sweep
    report = report_from_config(cfg)
    assert report == root / "report" / "report.md"
    assert "| Configuration | 100% (≤ 200 samples) |" in markdown(report)


def test_a_partial_baseline_is_matched_within_each_value_of_the_other_axes(tmp_path):
    root = tmp_path / "grid"
    write_multirun(root, ["+grid=toy", "allocation.n_per_prompt=4,8"])
    for n in (4, 8):
        for (algo, seed), (samples, acc) in CURVES.items():
            run = write_run(
                root,
                algo,
                seed,
                name=f"algo={algo},seed={seed},allocation.n_per_prompt={n}",
                overrides=[f"algo={algo}", f"seed={seed}", f"allocation.n_per_prompt={n}", "+grid=toy"],
                events=False,
                **{"allocation.n_per_prompt": n},
            )
            write_events(run / "tb", [x * n // 4 for x in samples], acc)  # n = 8 spends twice the samples
    text = markdown(build_report(root))  # grid.baseline is algo=raft, grid.target 0.3
    numbers = json.loads((root / "report" / "report.json").read_text())
    per = numbers["baseline"]["per_configuration"]
    assert per["algo=raftpp, allocation.n_per_prompt=8"] == "algo=raft, allocation.n_per_prompt=8"
    assert per["algo=raftpp, allocation.n_per_prompt=4"] == "algo=raft, allocation.n_per_prompt=4"
    # target 0.30: raft reaches it at 200 and 40 samples (mean 120), raftpp at 50 and 50 (mean 50): 2.4x; with n = 8
    # both costs double, so against its own n = 8 baseline it is 2.4x again (1.2x if matched with raft at n = 4)
    for n in (4, 8):
        row = numbers["target_cost"][f"algo=raftpp, allocation.n_per_prompt={n}"]
        assert row["speedup"]["samples"] == pytest.approx(2.4)
    assert "| Configuration | Baseline |" in text


def test_a_baseline_naming_no_axis_is_refused(tmp_path):
    grid = make_grid(tmp_path / "grid")
    with pytest.raises(ReportError, match="neither a configuration of the grid nor axis=value pairs"):
        build_report(grid, baseline="lr=0.1")
    with pytest.raises(ReportError, match="matches no configuration"):
        build_report(grid, baseline="algo=ppo")


def test_a_run_without_its_start_is_refused(tmp_path):
    root = make_grid(tmp_path / "grid")
    run = root / "algo=raft,seed=0"
    for f in (run / "tb").iterdir():
        f.unlink()
    write_events(run / "tb", [60, 130, 200], [0.20, 0.25, 0.30], start=1)  # resumed into a new folder: no pi0
    with pytest.raises(ReportError, match=r"first evaluation is at 60 samples and 4 updates, not the initial policy"):
        load_grid(root)


def test_a_run_that_stopped_short_of_the_budget_is_flagged(tmp_path):
    root = make_grid(tmp_path / "grid")
    run = root / "algo=raftpp,seed=1"
    for f in (run / "tb").iterdir():
        f.unlink()
    write_events(run / "tb", [0, 50], [0.20, 0.40])  # crashed after its first iteration
    text = markdown(build_report(root))
    # raft seed 1 ends at 190 samples too (its curve), so two runs are flagged
    assert "**Warning:** 2 run(s) ended before spending the budget of 200 samples" in text
    assert "algo=raft,seed=1 (190)" in text
    assert "algo=raftpp,seed=1 (50)" in text


# ---- the arena's pre-registered target and its diagnostics ------------------------------------------------
def test_baseline_final_target_and_the_mean_curve(tmp_path):
    grid = make_grid(tmp_path / "grid", **{"grid.target": "baseline_final"})
    text = markdown(build_report(grid))
    numbers = json.loads((grid / "report" / "report.json").read_text())
    # the baseline raft's finals 0.30 and 0.40 → target 0.35, a rule written in the grid before the runs
    assert numbers["target"]["value"] == pytest.approx(0.35)
    assert (
        "pre-registered in the grid (`grid.target: baseline_final`)" in text
        and "`algo=raft` over its seeds, 35.0%" in text
    )
    reach = numbers["target_cost"]
    # raft's seed-mean step curve at the costs where some seed evaluated: 0 → .10; 40 → (.10 + .30) / 2 = .20;
    # 50, 60 → (.20 + .30) / 2 = .25; 100 → .25; 110 → (.20 + .35) / 2 = .275; 130 → (.25 + .35) / 2 = .30;
    # 190 → (.25 + .40) / 2 = .325; 200 → (.30 + .40) / 2 = .35: reached at 200 (seed 0 alone never is)
    assert reach["algo=raft"]["mean_curve"] == 200 and reach["algo=raft"]["reached"] == 1
    # raftpp: 50 → (.40 + .40) / 2 = .40 ≥ .35 → 50, a quarter of raft's 200
    assert reach["algo=raftpp"]["mean_curve"] == 50 and reach["algo=raftpp"]["mean_curve_ratio"] == pytest.approx(0.25)
    assert "| algo=raftpp | 50 | 25% | 0.25 |" in text and "| algo=raft | 200 | 100% | 1.00 |" in text


def test_a_baseline_final_target_per_regime_when_a_grid_holds_several(tmp_path):
    # two values of lr (two "regimes") x algo: each configuration's target is the mean final accuracy of the raft
    # run with its own lr; the lr=2 runs end 0.1 higher, so their target is 0.45 where lr=1's is 0.35
    grid = tmp_path / "grid"
    write_multirun(grid, ["+grid=toy"], params="{algo: 'raft,raftpp', lr: '1,2', seed: '0,1'}")
    for algo, seed in CURVES:
        for lr in (1, 2):
            run = write_run(
                grid,
                algo,
                seed,
                name=f"algo={algo},lr={lr},seed={seed}",
                overrides=[f"algo={algo}", f"lr={lr}", f"seed={seed}", "+grid=toy"],
                events=False,
                **{"grid.target": "baseline_final", "algo.lr": lr},
            )
            samples, acc = CURVES[(algo, seed)]
            write_events(run / "tb", samples, [a + 0.1 * (lr - 1) for a in acc])
    text = markdown(build_report(grid, axes=["algo", "lr", "seed"]))
    numbers = json.loads((grid / "report" / "report.json").read_text())
    per = numbers["target"]["per_configuration"]
    assert numbers["target"]["value"] is None and "Target: per configuration" in text
    assert per["algo=raftpp, lr=1"] == pytest.approx(0.35) and per["algo=raftpp, lr=2"] == pytest.approx(0.45)
    reach = numbers["target_cost"]
    assert reach["algo=raft, lr=2"]["mean_curve"] == 200 and reach["algo=raftpp, lr=2"]["mean_curve"] == 50


def test_sampling_diagnostics_of_every_strategy(tmp_path):
    root = tmp_path / "grid"
    write_multirun(root, ["+grid=toy"], params="{allocation: 'uniform,skip', seed: '0,1'}")
    per_run = {  # samples per prompt, prompts without a sample, equal-reward fraction, per iteration
        ("uniform", 0): ([4, 4, 4], [0.0, 0.0, 0.0], [0.5, 0.6, 0.7]),
        ("uniform", 1): ([4, 4, 4], [0.0, 0.0, 0.0], [0.6, 0.6, 0.6]),
        ("skip", 0): ([2, 3, 4], [0.5, 0.25, 0.0], [0.1, 0.2, 0.3]),
        ("skip", 1): ([3, 3, 3], [0.25, 0.25, 0.25], [0.2, 0.2, 0.2]),
    }
    for (allocation, seed), (spp, zero, equal) in per_run.items():
        run = write_run(
            root,
            "raft",
            seed,
            name=f"allocation={allocation},seed={seed}",
            overrides=[f"allocation={allocation}", f"seed={seed}", "+grid=toy"],
            events=False,
            **{"grid.baseline": "allocation=uniform", "budget.samples": 192},
        )
        write_events(run / "tb", [0, 64, 128, 192], [0.10, 0.20, 0.25, 0.30])
        scalars = {
            "rollout/samples": [64] * 3,
            "rollout/accept_rate": [0.5] * 3,
            "sampling/samples_per_prompt": spp,
            "sampling/max_per_prompt": [max(spp)] * 3,
            "sampling/zero_sample_frac": zero,
            "rollout/equal_reward_frac": equal,
        }
        write_iterations(run / "tb", scalars, numbers=[0, 1, 2])
    section = markdown(build_report(root)).split("## E-step diagnostics\n")[1].split("\n## ")[0]
    assert "| Samples / prompt | Max / prompt | Prompts without a sample (%) | Equal-reward samples (%) |" in section
    # skip: samples/prompt 3, 3 → 3.00 ± 0.00; max 4, 3 → 3.5 ± 0.7; zero .25, .25 → 25.0 ± 0.0; equal .2, .2
    assert (
        "| allocation=skip | 192 ± 0 | 0.0 ± 0.0 | 32.0 ± 0.0 | 3.00 ± 0.00 | 3.5 ± 0.7 | 25.0 ± 0.0 | 20.0 ± 0.0 |"
        in section
    )
    # uniform: equal .6, .6 → 60.0 ± 0.0
    assert (
        "| allocation=uniform | 192 ± 0 | 0.0 ± 0.0 | 32.0 ± 0.0 | 4.00 ± 0.00 | 4.0 ± 0.0 | 0.0 ± 0.0 | 60.0 ± 0.0 |"
        in section
    )
