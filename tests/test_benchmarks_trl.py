"""benchmarks/trl_grpo_job.py: the TRL settings derived from a kit preset do the kit's work, and TRL accepts them."""

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dibs.conf import register_resolvers

trl = pytest.importorskip("trl", reason="needs the bench extra: pip install -e '.[bench]'")
register_resolvers()
ROOT = Path(__file__).resolve().parents[1]


def job_module():
    spec = importlib.util.spec_from_file_location("trl_grpo_job", ROOT / "benchmarks" / "trl_grpo_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kit_config(overrides: list[str]) -> dict:
    """The preset resolved as train.py writes it (resolved_config.yaml), with a made-up run folder."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "run_dir=/nonexistent/run"])
    return OmegaConf.to_container(cfg, resolve=True)


def grpo_config(settings: dict, tmp_path: Path):
    return trl.GRPOConfig(output_dir=str(tmp_path), **settings)


def test_embedded_grpo_work_matches(tmp_path):
    job = job_module()
    kit = kit_config(["experiment=embedded_grpo"])
    settings, rows, unmatched = job.matched_settings(kit)
    args = grpo_config(settings, tmp_path)
    samples_per_iteration = kit["prompts_per_iteration"] * kit["allocation"]["n_per_prompt"]  # 512 x 4
    assert args.generation_batch_size == samples_per_iteration == 2048
    assert args.num_generations == 4 and args.num_iterations == 1
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == kit["batch_size"] == 64
    assert args.steps_per_generation == kit["updates_per_iteration"] == 32  # each sample trained once
    assert args.max_steps == kit["iterations"] * kit["updates_per_iteration"] == 384
    assert (args.temperature, args.top_p, args.top_k, args.max_completion_length) == (1.0, 1.0, 0, 64)
    assert (args.loss_type, args.scale_rewards, args.beta, args.delta) == ("bnpo", "group", 0.001, 3.0)
    assert (args.epsilon, args.epsilon_high) == (0.2, 0.2)
    assert not (args.bf16 or args.fp16 or args.activation_checkpointing)  # GRPOConfig's defaults are bf16 and on
    assert len({setting for setting, _, _ in rows}) == len(rows) and unmatched


def test_one_iteration_and_micro_batches(tmp_path):
    job = job_module()
    one = job.matched_settings(kit_config(["experiment=embedded_grpo", "iterations=1"]))[0]
    assert one["max_steps"] == 32
    settings = job.matched_settings(kit_config(["experiment=embedded_grpo", "algo.micro_batch_size=16"]))[0]
    args = grpo_config(settings, tmp_path)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 4)
    assert args.steps_per_generation == 128 and args.generation_batch_size == 2048


@pytest.mark.parametrize(
    "overrides",
    [["allocation=gvm", "algo=grpo"], ["experiment=embedded_raftpp"], ["experiment=embedded_grpo", "batch_size=32"]],
)
def test_work_trl_cannot_do_is_refused(overrides):
    job = job_module()
    with pytest.raises(job.Unmatched):
        job.matched_settings(kit_config(overrides))
