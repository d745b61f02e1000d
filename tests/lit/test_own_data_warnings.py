"""A run on the user's own data that cannot work says why: the prompt template is named when nothing is accepted,
and a pool smaller than prompts_per_iteration is reported, both in the run's log, before or at the first E-step."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dibs.data.synthetic import make_task

ROOT = Path(__file__).resolve().parents[2]


def test_an_own_data_run_that_accepts_nothing_names_its_template_and_its_small_pool(tmp_path):
    task = make_task(seed=0, n_train=40, n_test=8)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n" for p in task.train))
    test.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n" for p in task.test))
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "data=jsonl",  # selects template=paper
        f"data.source.train_path={train}",
        f"data.source.test_path={test}",
        "iterations=1",
        "prompts_per_iteration=64",
        "updates_per_iteration=1",
        "eval.samples=1",
        "eval.pass_k=[1]",
        "warmstart.steps=5",  # a model that has barely trained: it states no answer the verifier reads
        "warmstart.eval_every=0",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "prompt pool: 40 prompts (data=jsonl), fewer than prompts_per_iteration=64: every iteration draws all" in log
    warning = next(line for line in log.splitlines() if "was accepted (reward 0 for every one)" in line)
    assert "[WARNING]" in warning and "iteration 1:" in warning
    assert "template=paper (system_prompt 'Please reason step by step" in warning
