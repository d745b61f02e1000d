"""``train.py`` in a subprocess for end-to-end tests, killed on cue: the one helper the fit, export, logger and
resume tests share (each asserts on the exit code and output itself)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_train(
    args: list[str], *, kill_after: str | None = None, timeout: float = 600, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run ``train.py args`` from the checkout; with ``kill_after``, SIGKILL it as soon as that text appears in its
    output. Returns (exit code, output)."""
    cmd = [sys.executable, "train.py", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if kill_after is not None and kill_after in line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "train.py ran past the test's time limit"
    proc.stdout.close()
    return proc.wait(timeout=60), "".join(lines)
