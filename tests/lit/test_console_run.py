"""A short run's console as a CI log sees it (`python train.py` in a subprocess, its output captured, no
terminal): every message once, on a line of its own, no tips, no redraws; iterations numbered from 1 in the
messages, the checkpoints, the exports and the logged ``iteration``; the run's log file holds the same lines."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]
RECORD = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]\[([\w.]+)\]\[(INFO|WARNING|ERROR)\] - (.*)")


def records(text: str) -> list[tuple[str, str]]:
    """(logger, message) of every log line, asserting that each one starts its line."""
    found = []
    for line in text.splitlines():
        if re.search(r"\]\[(INFO|WARNING|ERROR)\] - ", line):
            match = RECORD.fullmatch(line)
            assert match, f"a log record glued to other output: {line!r}"
            found.append((match[1], match[3]))
    return found


def test_a_short_runs_console_prints_each_message_once_on_a_line_of_its_own(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable, "train.py", "experiment=smoke", "iterations=1", "warmstart.steps=30",
        f"hydra.run.dir={run}", f"cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out, err = proc.stdout, proc.stderr

    # no redraws, no terminal codes, no generation bar, no Lightning handler of its own, no tips
    both = out + err
    assert "\r" not in both and "\x1b[" not in both and "generating" not in both
    assert "Tip" not in both and "litlogger" not in both and not re.search(r"^INFO: ", both, re.M)
    assert records(err) == []  # every record goes to stdout, once

    # every message once, each on its own line
    console = records(out)
    repeated = [record for record, count in Counter(console).items() if count > 1]
    assert not repeated, f"printed more than once: {repeated}"
    messages = [message for _, message in console]
    assert messages.count("GPU available: False, used: False") == 1

    # iterations numbered from 1 everywhere: messages, checkpoints, exports, the logged scalar
    for expected in ("iteration 1: E-step", "iteration 1: M-step", "iteration 1: evaluation",
                     "held-out Average@2 (iteration 1)", "held-out Average@2 (pi0)",
                     "checkpoint iter_001-update_000.ckpt saved", "checkpoint iter_001.ckpt saved"):  # fmt: skip
        assert sum(m.startswith(expected) for m in messages) == 1, expected
    assert not [m for m in messages if re.search(r"iteration 0\b|iter_000", m)]
    assert (run / "checkpoints" / "iter_001.ckpt").exists() and (run / "hf" / "iter_001" / "config.json").exists()
    assert not (run / "hf" / "iter_000").exists()
    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.value for e in events.Scalars("iteration")] == [1.0]

    # the acceptance the training bar shows: the E-step's accepted and generated samples, kept in the checkpoint
    state = torch.load(run / "checkpoints" / "iter_001.ckpt", weights_only=True)["callbacks"]["RolloutCallback"]
    accepted, generated = state["acceptance"][0]
    assert generated == events.Scalars("rollout/generated_samples")[0].value == 32 * 4  # smoke: 32 prompts x 4
    assert accepted == round(events.Scalars("rollout/accept_rate")[0].value * generated)  # uniform: all are kept

    # the run folder's log: plain text, the same records
    log = (run / "train.log").read_text()
    assert "\x1b[" not in log and records(log) == console
