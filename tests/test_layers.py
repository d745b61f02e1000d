"""The import direction (docs/architecture.md): dibs.core imports no Lightning, Hydra, vLLM or transformers; the
E-step (dibs.estep) and the resume checks (dibs.resume) run without Lightning or Hydra. Each check imports in a
fresh interpreter, so what another test imported cannot hide a dependency."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dibs.core

REPO = Path(__file__).resolve().parents[1]
CORE = sorted(m.name for m in pkgutil.walk_packages(dibs.core.__path__, prefix="dibs.core.") if not m.ispkg)


def imported(modules: list[str]) -> set[str]:
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        (CORE, {"lightning", "pytorch_lightning", "hydra", "vllm", "transformers"}),
        (
            ["dibs.estep.step", "dibs.estep.gradnorms", "dibs.resume"],
            {"lightning", "pytorch_lightning", "hydra", "vllm"},
        ),
    ],
    ids=["core", "estep-and-resume"],
)
def test_layers_import_only_what_they_may(modules, forbidden):
    assert len(modules) > 1
    assert not imported(modules) & forbidden
