"""Run folder names: Hydra's override_dirname of the run, made a safe and short file name."""

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dibs.conf import MAX_NAME, NOT_IN_RUN_NAMES, register_resolvers, run_name

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_is_named_by_its_overrides():
    assert run_name("algo=grpo,allocation=gvm,seed=1") == "algo=grpo,allocation=gvm,seed=1"
    assert run_name("model.path=/data/qwen,seed=0") == "model.path=_data_qwen,seed=0"  # one folder, not three


def test_no_override_names_the_default_run_or_the_job():
    assert run_name("") == "default"
    assert run_name("", 4) == "job4"


def test_long_names_are_shortened_with_a_hash_and_stay_distinct():
    a, b = run_name("x=" + "a" * 300), run_name("x=" + "a" * 299 + "b")
    assert len(a) <= MAX_NAME and len(b) <= MAX_NAME and a != b


def test_the_config_leaves_out_the_keys_that_do_not_say_what_a_run_is():
    with initialize_config_module("dibs.configs", version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    excluded = OmegaConf.to_container(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert sorted(excluded) == sorted(NOT_IN_RUN_NAMES)


def test_run_and_sweep_folders_are_named_by_the_overrides(tmp_path):
    """The real Hydra resolves the folder names: a single run and a grid's runs (with the grid and the cache
    left out), printed by --cfg hydra without running anything."""
    register_resolvers()

    def hydra_cfg(*args: str) -> dict:
        out = subprocess.run(
            [sys.executable, "train.py", *args, "--cfg", "hydra", "--resolve"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return OmegaConf.to_container(OmegaConf.create(out))["hydra"]

    single = hydra_cfg("algo=grpo", "seed=1", "cache_dir=/tmp/x")
    head, stamp = single["run"]["dir"].split("/")[-2:]
    assert single["run"]["dir"].startswith("outputs/") and head == "algo=grpo,seed=1" and stamp[:2] == "20"
    default = hydra_cfg()
    assert default["run"]["dir"].split("/")[1] == "default"
