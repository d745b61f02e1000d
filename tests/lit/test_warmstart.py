"""The warm start's Lightning SFT: the same numerics as a plain torch loop, single-device inside a multi-process
launch, its curves in the run's loggers and replayed from the cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dibs.core.schedules import warmup_cosine
from dibs.data.prompts import PromptTemplate, encode_prompts, encode_response
from dibs.lit.warmstart import CURVES, _nll, load_curves, sft
from tests.conftest import build_tiny

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def examples(task, tokenizer):
    kept, prompt_ids, _ = encode_prompts(
        task.train[:40], tokenizer, PromptTemplate(None, "", ""), max_prompt_tokens=256
    )
    return [(ids, encode_response(tokenizer, p.solution)) for p, ids in zip(kept, prompt_ids)]


class Probe:
    """A stand-in accuracy probe that samples from the global RNG as the real one does (its draws are recorded:
    the Trainer must not shift that stream) and reports ``accuracies`` in turn."""

    def __init__(self, accuracies: list[float]):
        self.accuracies, self.draws, self.modes = list(accuracies), [], []

    def __call__(self, model) -> float:
        self.modes.append(model.training)
        self.draws.append(torch.rand(3).tolist())
        return self.accuracies.pop(0)


def reference_sft(model, examples, *, steps, batch_size, lr, seed, eval_every, target, measure, horizon):
    """The plain loop the Lightning SFT replaced, step for step: (losses, learning rates, steps run)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup=30, total=horizon))
    losses, lrs, step = [], [], 0
    model.train()
    for step in range(1, steps + 1):
        picks = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        lrs.append(optimizer.param_groups[0]["lr"])
        loss = _nll(model, [examples[i] for i in picks], 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if eval_every > 0 and step % eval_every == 0:
            accuracy = measure(model.eval())
            model.train()
            if accuracy >= target:
                break
    return losses, lrs, step


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lightning_sft_equals_the_plain_loop(tmp_path, tokenizer, examples, schedule):
    settings = dict(steps=40, batch_size=6, lr=5e-3, seed=3, eval_every=4)
    # probes at steps 4, 8, 12: the third reaches the target, so both stop at step 12, before the horizon
    mine, theirs = Probe([0.1, 0.2, 0.6]), Probe([0.1, 0.2, 0.6])
    model, reference = build_tiny(tokenizer), build_tiny(tokenizer)
    assert tokenizer.pad_token_id == 0  # the reference loop pads with 0
    with torch.random.fork_rng():
        torch.manual_seed(7)
        report = sft(model, tokenizer, examples, **settings, target_accuracy=0.5, measure=mine, out_dir=tmp_path,
                     schedule=schedule, show_progress=False)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(7)
        losses, lrs, steps = reference_sft(
            reference, examples, **settings, target=0.5, measure=theirs, horizon=40 if schedule == "cosine" else 0
        )
    assert (report.steps, report.accuracy, report.stopped_by) == (12, 0.6, "target_accuracy") and steps == 12
    assert mine.draws == theirs.draws  # the probe's RNG stream, untouched by the Trainer and its DataLoader
    assert mine.modes == [False, False, False]  # probed in eval mode
    for name, weight in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name  # bit for bit
    curves = load_curves(tmp_path)
    assert [row["step"] for row in curves] == list(range(1, 13))
    assert [row["loss"] for row in curves] == losses and [row["lr"] for row in curves] == lrs
    assert [(row["step"], row["accuracy"]) for row in curves if "accuracy" in row] == [(4, 0.1), (8, 0.2), (12, 0.6)]
    saved = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(saved[k], reference.state_dict()[k]) for k in saved)
    left = {p.name for p in tmp_path.iterdir()}
    assert "lightning_logs" not in left and "checkpoints" not in left and CURVES in left


def test_single_device_inside_a_multi_process_launch(tmp_path, tokenizer, examples, monkeypatch):
    # what torchrun and SLURM set for rank 0 of 2: the inner Trainer must neither join nor create a process group
    launch = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "TORCHELASTIC_RUN_ID": "test",
              "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
              "SLURM_JOB_NAME": "job", "SLURM_NODELIST": "node1"}  # fmt: skip
    for key, value in launch.items():
        monkeypatch.setenv(key, value)

    def refuse(*args, **kwargs):
        raise AssertionError("the warm start tried to create a process group")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    report = sft(build_tiny(tokenizer), tokenizer, examples, steps=3, batch_size=4, lr=1e-3, seed=0, eval_every=0,
                 target_accuracy=1.0, measure=Probe([]), out_dir=tmp_path, schedule="cosine")  # fmt: skip
    assert (report.steps, report.stopped_by, report.accuracy) == (3, "steps", -1.0)
    assert not torch.distributed.is_initialized()


def test_unknown_schedule_is_refused(tmp_path, tokenizer, examples):
    with pytest.raises(ValueError, match="warmstart.schedule='linear'"):
        sft(build_tiny(tokenizer), tokenizer, examples, steps=1, batch_size=1, lr=1e-3, seed=0, eval_every=0,
            target_accuracy=1.0, measure=Probe([]), out_dir=tmp_path, schedule="linear")  # fmt: skip


def test_no_steps_saves_pi0_as_built(tmp_path, tokenizer, examples):
    # warmstart=none on the embedded model: steps 0, batch size 0
    model = build_tiny(tokenizer)
    built = {k: v.clone() for k, v in model.state_dict().items()}
    report = sft(model, tokenizer, examples, steps=0, batch_size=0, lr=0.0, seed=0, eval_every=0,
                 target_accuracy=1.0, measure=Probe([]), out_dir=tmp_path, schedule="constant")  # fmt: skip
    assert (report.steps, report.stopped_by, report.accuracy) == (0, "steps", -1.0) and load_curves(tmp_path) == []
    saved = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(saved[k], built[k]) for k in saved)


def _compose(tmp_path: Path):
    GlobalHydra.instance().clear()
    overrides = ["warmstart.steps=10", "warmstart.eval_every=5", "warmstart.eval_problems=4",
                 "warmstart.eval_samples=2", "warmstart.target_accuracy=1.0", "warmstart.batch_size=4",
                 "data.source.n_train=60", "data.source.n_test=8", "model.tiny.hidden_size=32",
                 "model.tiny.intermediate_size=64", "eval.sampling.max_new_tokens=8",
                 "+trainer.enable_progress_bar=false", f"cache_dir={tmp_path / 'cache'}",
                 f"run_dir={tmp_path}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _tb(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_curves_reach_the_run_loggers_and_are_replayed_from_the_cache(tmp_path, caplog):
    from dibs.lit.assemble import policy_from_config

    cfg = _compose(tmp_path)
    task, verifier = instantiate(cfg.data.source), instantiate(cfg.reward)
    try:
        runs = {}
        for run in ("built", "loaded"):
            loggers = [TensorBoardLogger(tmp_path / run, name="tb", version=""), CSVLogger(tmp_path / run, name="csv")]
            with caplog.at_level(logging.INFO, logger="dibs"):
                policy_from_config(cfg, task, verifier, loggers=loggers)
            for logger in loggers:
                logger.finalize("success")
            runs[run] = _tb(tmp_path / run / "tb")
        (folder,) = (tmp_path / "cache" / "warmstart").iterdir()
        (folder / CURVES).unlink()  # a pi0 cached before curves were saved
        silent = TensorBoardLogger(tmp_path / "old", name="tb", version="")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dibs"):
            policy_from_config(cfg, task, verifier, loggers=[silent])
        silent.finalize("success")
    finally:
        verifier.close()
    built = runs["built"]
    assert set(built) == {"warmstart/loss", "warmstart/lr", "warmstart/accuracy"}
    assert [s for s, _ in built["warmstart/loss"]] == list(range(1, 11))
    assert [s for s, _ in built["warmstart/accuracy"]] == [5, 10]
    assert all(v > 0 for _, v in built["warmstart/loss"])
    assert runs["loaded"] == built  # the second run (a cache hit) shows the same curves
    rows = (tmp_path / "loaded" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "warmstart/accuracy", "warmstart/loss", "warmstart/lr"] and len(rows) == 11
    assert "cached before the warm start saved its curves" in caplog.text
    assert not (tmp_path / "old" / "tb").exists() or not _tb(tmp_path / "old" / "tb")
