"""dibs.conf.flatten, the kit's one config flattening: the loggers' hyper-parameters, the resume check and the grid
report all compare configs through it."""

from omegaconf import OmegaConf

from dibs.conf import flatten
from dibs.report.grid import Run, _comparable


def test_nested_mappings_become_dotted_keys_and_lists_stay_values():
    tree = {"seed": 0, "algo": {"lr": 1e-3, "betas": [0.9, 0.999]}, "eval": {"sampling": {"top_k": 0}}}
    assert flatten(tree) == {"seed": 0, "algo.lr": 1e-3, "algo.betas": [0.9, 0.999], "eval.sampling.top_k": 0}


def test_empty_mappings_and_lists_of_mappings_are_leaves():
    tree = {"extra": {}, "sets": [{"name": "a"}], "none": None}
    assert flatten(tree) == {"extra": {}, "sets": [{"name": "a"}], "none": None}


def test_a_composed_config_flattens_as_its_resolved_file_and_the_report_reads_it(tmp_path):
    """The report's view of a run (from resolved_config.yaml) is the flattening of the same settings."""
    cfg = {"run_dir": str(tmp_path), "logger": {"save_dir": str(tmp_path)}, "algo": {"lr": 0.1}, "ckpt_path": None}
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "resolved_config.yaml")
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "resolved_config.yaml"))
    flat = flatten(saved)
    assert flat == flatten(cfg)
    run = Run(path=tmp_path, name="run", config=saved, flat=flat)
    assert _comparable(run) == {"logger.save_dir": "${run_dir}", "algo.lr": 0.1}  # per-run keys left out
