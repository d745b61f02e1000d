"""The config schema: the shipped configs pass it; each bad value fails, naming the key, the value and the rule."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dibs.conf import ROOT, register_resolvers
from dibs.schema import ConfigError, validate_config

register_resolvers()


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=/tmp/run", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_preset_passes_the_schema(preset):
    validate_config(resolved(f"experiment={preset}"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("allocation.n_per_prompt=0", "allocation.n_per_prompt=0: input should be greater than or equal to 1"),
        ("iterations=two", "iterations='two': input should be a valid integer"),
        ("rollout.sampling.top_p=1.5", "rollout.sampling.top_p=1.5: input should be less than or equal to 1"),
        ("algo.loss=ppo", "algo.loss: 'ppo' is not one of ['drgrpo', 'grpo', 'raft', 'raftpp']"),
        ("algo.loss_agg=token-sum", "algo.loss_agg='token-sum': input should be 'token-mean',"),
        ("algo.loss_scope=batch", "algo.loss_scope='batch': input should be 'update' or 'micro_batch'"),
        ("algo.micro_batch_size=0", "algo.micro_batch_size=0: input should be greater than or equal to 1"),
        ("algo.kl_coef=-0.1", "algo.kl_coef=-0.1: input should be greater than or equal to 0"),
        ("algo=grpo algo.clip_ratio_c=1.0", "algo.clip_ratio_c=1.0: input should be greater than 1"),
        ("allocation=gvm allocation.grad_param=bias", "allocation.grad_param='bias': input should be"),
        ("pool_sampling=shard", "pool_sampling='shard': input should be 'random' or 'shards'"),
        ("checkpoint.every_updates=-2", "checkpoint.every_updates=-2: input should be greater than or equal to 0"),
        ("+checkpoint.evry_updates=2", "checkpoint.evry_updates=2: not a known key of this group"),
        ("eval.pass_k=[0]", "eval.pass_k=[0]: each k must be between 1 and samples=4 (got [0])"),
        ("allocation=gvm allocation.max_per_prompt=1 allocation.min_per_prompt=2", "max_per_prompt=1 is below"),
    ],
)
def test_a_bad_value_names_the_key_the_value_and_the_rule(override, message):
    with pytest.raises(ConfigError, match="config error") as error:
        validate_config(resolved(*override.split()))
    assert message in str(error.value)


def test_every_fault_is_listed_at_once():
    with pytest.raises(ConfigError) as error:
        validate_config(resolved("iterations=0", "batch_size=0"))
    assert "iterations=0" in str(error.value) and "batch_size=0" in str(error.value)
