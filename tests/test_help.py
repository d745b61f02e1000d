"""``--help`` of the entry points: the groups' options and every key with its YAML comment, from the shipped configs,
with the values the command line gives, quickly and without torch."""

import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dibs.help import describe, documented_keys, group_options, render

REPO = Path(__file__).resolve().parents[1]
CONFIG = files("dibs.configs").joinpath("config.yaml").read_text()


def help_of(*args: str, module: str | None = None) -> subprocess.CompletedProcess:
    """The help as a user gets it, with the imports Python made listed on stderr (-X importtime)."""
    command = [sys.executable, "-X", "importtime", *(["-m", module] if module else ["train.py"]), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def imported(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


def row(text: str, *cells: str) -> bool:
    """Whether one line of the help holds these cells in this order."""
    pattern = r"\s+".join(re.escape(c) for c in cells)
    return re.search(rf"^\s*{pattern}(?!\w)", text, re.M) is not None


def test_train_help_lists_groups_options_and_keys_with_their_comments_without_torch():
    proc = help_of("--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert not {"torch", "lightning", "transformers"} & imported(proc)
    assert "python train.py -m +grid=raft_vs_raftpp" in text and "ckpt_path=last" in text
    # every option of the algo group, with its file's first sentence; the default marked
    for option in ("drgrpo", "grpo", "raft", "raftpp"):
        header = files("dibs.configs").joinpath(f"algo/{option}.yaml").read_text().splitlines()[0]
        words = header.lstrip("# ").split()[:3]
        group, mark = ["algo"] if option == "drgrpo" else [], ["*"] if option == "raftpp" else []
        assert row(text, *group, *mark, option, *words), option
    assert row(text, "+grid", "algos_embedded") and row(text, "uniform8", "Uniform", "best-of-8:")  # experiments/
    # every key of config.yaml but the hidden blocks, with its default and the start of its comment
    cfg = OmegaConf.create(CONFIG)
    assert row(text, "iterations", str(cfg.iterations), "EM", "iterations")
    assert row(text, "checkpoint.keep", str(cfg.checkpoint.keep), "checkpoints", "kept,")
    assert row(text, "budget.samples", "null", "generated", "completions")
    assert row(text, "budget.*", "Equal-cost", "stopping")  # a block: the comment above it
    assert row(text, "run_dir", "${hydra:runtime.output_dir}")  # Hydra's $-template left it alone
    keys = {k.name for k in documented_keys(CONFIG, hide=("evaluate",))}
    assert {k for k in cfg if k not in ("defaults", "hydra", "evaluate")} <= keys
    for key in keys:
        assert re.search(rf"^\s+{re.escape(key)}(\.\*)?\s", text, re.M), key
    assert "evaluate.checkpoint" not in text  # the evaluation's own keys are in its help


def test_help_shows_the_values_the_overrides_give():
    proc = help_of("algo=grpo", "experiment=smoke", "budget.samples=999", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    smoke = OmegaConf.load(files("dibs.configs").joinpath("experiment/smoke.yaml").open())
    assert row(proc.stdout, "*", "grpo") and row(proc.stdout, "*", "smoke")
    assert row(proc.stdout, "iterations", str(smoke.iterations)) and row(proc.stdout, "budget.samples", "999")


def test_evaluate_help_lists_its_block():
    proc = help_of("--help", module="dibs.evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not {"torch", "lightning"} & imported(proc)
    text = proc.stdout
    assert "python -m dibs.evaluate evaluate.checkpoint=" in text
    assert row(text, "evaluate.checkpoint", "null", "a", "Hugging", "Face", "model", "folder")
    assert row(text, "evaluate.device", "auto") and row(text, "eval", "*", "embedded")
    assert not row(text, "iterations") and not row(text, "algo")  # training's keys and groups are train's help


def test_report_help_lists_conf_report_yaml():
    proc = help_of("--help", module="dibs.report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert row(text, "sweep", "???", "the", "grid's", "folder") and row(text, "out", "${sweep}/report")
    assert row(text, "fractions", "[0.25, 0.5, 0.75, 1.0]") and "python -m dibs.report sweep=" in text


def test_comments_are_read_by_key_position_and_indentation():
    text = """\
# @package _global_
# The file's description. More about it.
#   python train.py example=1
top: 1                # top's comment,
                      # continued
quoted: "a # b"       # not fooled by '#' in a value

# The block's own description,
# on two lines.
block:
  inner: [1, 2]       # inner's comment
  # a lead comment of the next key
  bare: x
plain: 3
"""
    keys = {k.name: k for k in documented_keys(text)}
    assert keys["top"].doc == "top's comment, continued" and keys["top"].value == 1
    assert keys["quoted"].value == "a # b" and keys["quoted"].doc == "not fooled by '#' in a value"
    assert keys["block"].block and keys["block"].doc == "The block's own description, on two lines."
    assert keys["block.inner"].doc == "inner's comment" and list(keys["block.inner"].value) == [1, 2]
    assert keys["block.bare"].doc == "a lead comment of the next key" and keys["plain"].doc == ""
    assert describe(text) == "The file's description."  # @package skipped, the first sentence, no example


def test_every_key_of_the_shipped_configs_is_documented():
    undocumented = [k.name for k in documented_keys(CONFIG) if not k.doc and not k.block]
    report = files("dibs.configs").joinpath("report.yaml").read_text()
    undocumented += [k.name for k in documented_keys(report) if not k.doc]
    assert undocumented == []
    for group, options in group_options().items():
        for option, about in options.items():
            assert about, f"{group}/{option}.yaml has no description comment"


@pytest.mark.parametrize("app", ["train", "evaluate", "report"])
def test_render_without_a_composed_config_shows_the_files_defaults(app):
    text = render(app, width=100)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "Keys (key=value" in text
