"""Every config file composes, and every part it names instantiates (the experiment presets included)."""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dibs.conf import register_resolvers
from dibs.core.losses import get_algorithm
from dibs.core.sampling import RoundTally, Uniform
from dibs.lit.datamodule import check_update_accounting
from dibs.lit.module import EMModule
from dibs.lit.rollout import RolloutCallback

register_resolvers()
CONF = Path(__file__).resolve().parents[1] / "conf"
GRIDS = sorted((CONF.parent / "experiments" / "grid").glob("*.yaml"))
GROUP_OPTIONS = [(g.name, f.stem) for g in sorted(CONF.iterdir()) if g.is_dir() for f in sorted(g.glob("*.yaml"))]


def required(group: str, option: str, tmp_path: Path) -> list[str]:
    """Values a user must give (``???`` in their YAML) where data=jsonl or model=hf is chosen, by the option
    itself or by a preset that selects it (the paper_* ones)."""
    cfg = compose_with([f"{group}={option}"])
    out = []
    if "train_path" in cfg.data.source.keys() and OmegaConf.is_missing(cfg.data.source, "train_path"):
        for name in ("train", "test"):
            (tmp_path / f"{name}.jsonl").write_text(json.dumps({"problem": "1 + 1?", "answer": "2"}) + "\n")
        out += [f"data.source.train_path={tmp_path}/train.jsonl", f"data.source.test_path={tmp_path}/test.jsonl"]
    if OmegaConf.is_missing(cfg.model, "path"):
        out.append(f"model.path={tmp_path}/model")
    return out


def run_rounds(strategy, prompts: int = 3) -> int:
    """Round after round on made-up results (the first prompt solved once per round, the second twice, the third
    never) until the strategy stops; the samples it drew."""
    request, drawn = strategy.begin(0, np.arange(prompts)), 0
    while request is not None:
        counts = request.counts
        drawn += int(counts.sum())
        hits = np.minimum(counts, np.resize([1, 2, 0], prompts)).astype(float)
        grad = np.where(hits > 0, 1.0, 0.0) if request.grad_norms else None
        request = strategy.next(RoundTally(counts.astype(float), hits, hits, grad))
    return drawn


def compose_with(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_config_file_composes_and_instantiates(group, option, tmp_path, tiny_model):
    overrides = [f"{group}={option}", *required(group, option, tmp_path)]
    if (group, option) == ("allocation", "reinforce_ada"):  # its advantages need GRPO's loss (refused otherwise)
        overrides.append("algo=grpo")
    cfg = compose_with(overrides)
    cfg.run_dir = str(tmp_path)
    OmegaConf.resolve(cfg)
    if group == "experiment":  # a preset must change something
        default = compose_with([])
        default.run_dir = str(tmp_path)
        OmegaConf.resolve(default)
        mine, base = OmegaConf.to_container(cfg), OmegaConf.to_container(default)
        mine.pop("hydra"), base.pop("hydra")  # the override list differs by construction
        assert mine != base
    else:
        assert cfg["algo" if group == "optim" else group] is not None  # optim's keys live under algo.
    task = instantiate(cfg.data.source)
    assert task.train and task.test
    strategy = instantiate(cfg.allocation)
    assert 0 < run_rounds(strategy) <= strategy.max_samples(3)
    instantiate(cfg.reward).close()
    assert callable(instantiate(cfg.rollout.generator))  # partial: train.py adds the model and tokenizer
    instantiate(cfg.logger)
    trainer_cfg = instantiate(cfg.trainer)
    assert trainer_cfg["devices"] >= 1
    check_update_accounting(cfg.update_accounting, cfg.algo.lr_schedule)
    algo = OmegaConf.to_container(cfg.algo)
    algorithm = get_algorithm(algo.pop("loss"))
    e_step = {k: algo.pop(k) for k in ("keep_rejected", "recompute_old_logprobs", "filter_equal_groups")}
    module = EMModule(tiny_model, algorithm, **algo, total_updates=0, activation_checkpointing=False)  # every key
    assert (module.reference is not None) == (algo["kl_coef"] > 0)
    RolloutCallback(None, None, strategy, None, algorithm=algorithm, sampling=None, seed=0, **e_step)


def test_group_options_were_found():
    assert {"data", "model", "rollout", "algo", "allocation", "trainer", "logger"} <= {g for g, _ in GROUP_OPTIONS}


@pytest.mark.parametrize("grid", [g.stem for g in GRIDS])
def test_every_grid_composes_and_names_existing_axes(grid, tmp_path):
    cfg = compose_with([f"+grid={grid}"])
    cfg.run_dir = str(tmp_path)
    axes = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    assert axes == OmegaConf.to_container(cfg.grid.axes) and "seed" in axes
    default = compose_with([])
    options = {}  # conf/ and the grids' search path, experiments/ (e.g. experiments/allocation/uniform8.yaml)
    for root in (CONF, CONF.parent / "experiments"):
        for path in root.glob("*/*.yaml"):
            options.setdefault(path.parent.name, set()).add(path.stem)
    for key in axes:  # an axis is a config group or an existing key: a typo would sweep nothing
        (override,) = OverridesParser.create().parse_overrides([f"{key}={axes[key]}"])
        assert override.is_sweep_override(), f"{grid}: axis {key} sweeps nothing ({axes[key]!r})"
        if key.lstrip("+~") in options:  # a group (e.g. experiment, null by default): every value an option
            missing = set(override.sweep_string_iterator()) - options[key.lstrip("+~")]
            assert not missing, f"{grid}: {key} has no option {sorted(missing)}"
        else:
            assert OmegaConf.select(default, key.lstrip("+~"), default="<absent>") != "<absent>", key
    # the budget may come with a preset of the grid's `experiment` axis (the arena's regimes): each one has one
    presets = str(axes.get("experiment", "")).split(",") if "experiment" in axes else [None]
    for preset in presets:
        composed = compose_with([f"+grid={grid}"] + ([f"experiment={preset}"] if preset else []))
        assert sum(v is not None for v in composed.budget.values()) == 1, f"{grid} {preset}: equal cost needs a budget"


def test_grids_were_found():
    assert GRIDS, "experiments/grid/ holds no grid"


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF.parent / "experiments" / "allocation").glob("*.yaml")))
def test_experiment_allocation_variants_compose_and_allocate(option):
    cfg = compose_with([f"allocation={option}"])
    strategy = instantiate(cfg.allocation)
    assert 0 < run_rounds(strategy) <= strategy.max_samples(3)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        # the reference's runs: N' = 8, N = 8 per prompt, alpha 1e-3, beta 2, embed_tokens, pilot discarded
        ("gvm_reference", dict(pilot_samples=8, n_per_prompt=8, grad_param="embed_tokens", reuse_pilot=False)),
        # the kit's (measured in experiments/README.md): a reused pilot of 2 that all trains, a Beta(1, 1) prior,
        # lm_head from the generator
        (
            "gvm_recommended",
            dict(
                pilot_samples=2,
                n_per_prompt=4,
                min_per_prompt=2,
                prior=[1.0, 1.0],
                grad_param="lm_head",
                reuse_pilot=True,
                grad_in_generator=True,
            ),
        ),
    ],
)
def test_gvm_presets_set_what_they_promise(preset, expected, tmp_path):
    cfg = compose_with([f"experiment={preset}"])
    cfg.run_dir = str(tmp_path)
    allocator = instantiate(cfg.allocation)
    assert {k: getattr(allocator, k) for k in expected} == expected
    assert (allocator.alpha, allocator.beta, allocator.rounding) == (1e-3, 2.0, "largest_remainder")
    assert cfg.algo.loss == "raftpp"


PAPER = ["paper_raftpp", "paper_grpo", "paper_gvm_raftpp", "paper_gvm_grpo"]
EMBEDDED = ["embedded_raftpp", "embedded_grpo", "embedded_gvm_raftpp", "embedded_gvm_grpo"]


@pytest.mark.parametrize("preset", PAPER)
def test_paper_presets_hold_the_papers_hyper_parameters(preset, tmp_path):
    cfg = compose_with([f"experiment={preset}", *required("experiment", preset, tmp_path)])
    algo, sampling = cfg.algo, cfg.rollout.sampling
    assert algo.loss == ("grpo" if preset.endswith("grpo") else "raftpp")
    # the GVM paper's settings (docs/method.md): AdamW lr 1e-6 constant, wd 0.01, clip 1.0, T = 1.0,
    # 3072 tokens, KL 0.001, eps 0.2
    assert (algo.lr, algo.lr_schedule, algo.warmup_updates, algo.weight_decay) == (1e-6, "constant", 0, 0.01)
    assert (algo.grad_clip, algo.kl_coef, algo.clip_low, algo.clip_high) == (1.0, 0.001, 0.2, 0.2)
    assert (algo.loss_agg, algo.keep_rejected, algo.filter_equal_groups) == ("token-mean", True, False)
    assert (
        (sampling.temperature, sampling.max_new_tokens)
        == (1.0, 3072)
        == tuple(cfg.eval.sampling[k] for k in ("temperature", "max_new_tokens"))
    )
    assert (cfg.model.path, cfg.warmstart.steps, cfg.update_accounting) == (f"{tmp_path}/model", 0, "reference")
    if preset.endswith("grpo"):
        assert algo.clip_ratio_c == 3.0
    allocator = instantiate(cfg.allocation)
    assert allocator.n_per_prompt == 8  # N = 8 per prompt
    if "gvm" in preset:  # the reference's allocation: N' = 8, alpha 1e-3, beta 2, embed_tokens, pilot discarded
        expected = (8, 1e-3, 2.0, "embed_tokens", "sum", "largest_remainder", False)
        got = (allocator.pilot_samples, allocator.alpha, allocator.beta, allocator.grad_param)
        got += (allocator.grad_reduction, allocator.rounding, allocator.reuse_pilot)
        assert got == expected


@pytest.mark.parametrize("preset", EMBEDDED)
def test_embedded_presets_generate_four_samples_per_prompt(preset):
    cfg = compose_with([f"experiment={preset}"])
    allocator = instantiate(cfg.allocation)
    assert cfg.algo.loss == ("grpo" if preset.endswith("grpo") else "raftpp") and cfg.algo.keep_rejected
    if "gvm" in preset:
        # a pilot of 2, all reused since every prompt gets at least 2: 2 + (4 - 2) generated per prompt on average
        assert (allocator.n_per_prompt, allocator.pilot_samples, allocator.min_per_prompt) == (4, 2, 2)
        assert allocator.reuse_pilot and list(allocator.prior) == [1.0, 1.0]  # the kit's recommended allocation
    else:
        assert isinstance(allocator, Uniform) and allocator.n_per_prompt == 4
