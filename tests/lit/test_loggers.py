"""The logger group: `python train.py logger=...` in a subprocess, 1 iteration, then what each logger wrote, read back
with its own format: TensorBoard (scalars, the HParams summary against val/acc, histograms, figure, text), the CSV
file, W&B's offline records, MLflow's file store; a run killed and resumed that keeps every point once in the CSV
file and the MLflow store and continues the same W&B and MLflow runs; the grid report reading the CSV file; and
the builder's errors. The policy is untrained (warmstart=none): nothing here depends on what it learns."""

import csv
import json
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from dibs.lit.loggers import IDS_FILE, CSVLogger, build_loggers, log_hyperparams
from dibs.report.events import read_curve
from dibs.resume import log_positions, rewind_event_files
from tests.train_process import run_train

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

SMALL = [
    "warmstart=none",
    "iterations=1",
    "prompts_per_iteration=8",
    "batch_size=8",
    "updates_per_iteration=2",
    "eval.samples=2",
    "eval.pass_k=[1,2]",
    "data.source.n_train=200",
    "data.source.n_test=16",
    "+data.source.level_weights=[3,1,1,0,0]",
    "model.tiny.hidden_size=32",
    "rollout.sampling.max_new_tokens=16",
    "eval.sampling.max_new_tokens=16",
    "rollout.generator.show_progress=false",
    "+trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # the tokenizer and π0's evaluation, built by the first run


def train(run: Path, cache: Path, *overrides: str, kill_after: str | None = None) -> str:
    """Run train.py into ``run``; with ``kill_after``, SIGKILL it as soon as that text appears in its output."""
    args = [f"hydra.run.dir={run}", f"cache_dir={cache}", *SMALL, *overrides]
    code, out = run_train(args, kill_after=kill_after, env={"WANDB_SILENT": "true"})
    assert code == (-signal.SIGKILL if kill_after else 0), f"train.py ended with {code}:\n{out[-6000:]}"
    return out


def csv_points(run: Path, tag: str) -> list[tuple[int, float]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [(int(row["step"]), float(row[tag])) for row in csv.DictReader(f) if row.get(tag)]


def wandb_records(run: Path) -> dict[str, list]:
    """Every W&B offline folder of the run (by start time) -> its history rows and config keys, read from the
    .wandb record log (LevelDB's log format after a 7-byte W&B header, records split over 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {}
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        data, pos, chunks = next(folder.glob("run-*.wandb")).read_bytes(), 7, []
        history, config = [], set()
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if left < 7 or (length == 0 and kind == 0):  # a block's zero-filled tail
                pos += left
                continue
            chunks.append(data[pos + 7 : pos + 7 + length])
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = pb.Record.FromString(b"".join(chunks))
                chunks = []
                if record.WhichOneof("record_type") == "history":
                    row = {}
                    for item in record.history.item:
                        key = item.key or item.nested_key[0]
                        row.setdefault(key, {})["/".join(item.nested_key[1:])] = item.value_json
                    history.append(row)
                elif record.WhichOneof("record_type") == "config":
                    config |= {u.key for u in record.config.update}
        out[folder.name] = [history, config]
    return out


def mlflow_run(run: Path) -> Path:
    runs = [p.parent for p in (run / "mlruns").glob("*/*/meta.yaml") if (p.parent / "metrics").is_dir()]
    assert len(runs) == 1, f"one MLflow run expected in {run / 'mlruns'}: {runs}"
    return runs[0]


def mlflow_points(mlrun: Path, name: str) -> list[tuple[int, float]]:
    lines = (mlrun / "metrics" / name).read_text().split()
    return [(int(lines[i + 2]), float(lines[i + 1])) for i in range(0, len(lines), 3)]  # timestamp value step


def same(points: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """The same steps and, to TensorBoard's float32, the same values."""
    steps, values = zip(*points) if points else ((), ())
    return steps == tuple(s for s, _ in expected) and np.allclose(values, [v for _, v in expected], rtol=1e-6)


def test_every_logger_at_once(tmp_path, cache):
    run = tmp_path / "run"
    out = train(run, cache, "logger=many", "allocation=gvm", "allocation.pilot_samples=2")
    # TensorBoard: the run's own val/acc points, no placeholder; the HParams summary against val/acc
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    tb_acc = [(e.step, e.value) for e in acc.Scalars("val/acc")]
    assert len(tb_acc) == 2 and "hp_metric" not in acc.Tags()["scalars"]
    content = acc.PluginTagToContent("hparams")
    hparams = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    assert [m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos] == ["val/acc"]
    settings = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert settings["algo.loss"].string_value == "raftpp" and settings["iterations"].number_value == 1
    assert settings["pool_size"].string_value == "null" and settings["activation_checkpointing"].string_value == "false"
    assert {"alloc/n", "alloc/p", "alloc/G"} <= set(acc.Tags()["histograms"])
    assert acc.Tags()["images"] == ["alloc/n_vs_p"]
    assert "rollout/sample_texts/text_summary" in acc.Tags()["tensors"]
    # CSV: the same points; the grid report reads it like the event files when there are none
    assert same(csv_points(run, "val/acc"), tb_acc)
    assert "cost/samples" in (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    alone = tmp_path / "csv_only"
    shutil.copytree(run / "csv", alone / "csv")
    from_tb, from_csv = read_curve(run), read_curve(alone)
    assert from_csv.steps.tolist() == from_tb.steps.tolist() and from_csv.acc == pytest.approx(from_tb.acc)
    assert all(np.allclose(from_csv.cost[u], from_tb.cost[u]) for u in from_tb.cost)
    assert from_csv.iterations.keys() == from_tb.iterations.keys() and from_csv.levels.keys() == from_tb.levels.keys()
    # W&B offline: the id kept for a resume, scalars, histograms, the figure, the texts and the config
    ids = json.loads((run / IDS_FILE).read_text())
    records = wandb_records(run)
    assert len(records) == 1 and next(iter(records)).endswith(f"-{ids['wandb']}")
    history, config = next(iter(records.values()))
    assert [float(r["val/acc"][""]) for r in history if "val/acc" in r] == pytest.approx([v for _, v in tb_acc])
    kinds = {key: row[key].get("_type") for row in history for key in row if isinstance(row[key], dict)}
    assert kinds["alloc/n"] == '"histogram"' and kinds["alloc/n_vs_p"] == '"image-file"'
    assert kinds["rollout/sample_texts"] == '"table-file"' and "algo.loss" in config
    # MLflow: one run with the run folder's name, its params, metrics and the figure and texts as artifacts
    mlrun = mlflow_run(run)
    assert mlrun.name == ids["mlflow"] and (mlrun / "tags" / "mlflow.runName").read_text() == "run"
    assert (mlrun / "params" / "algo.loss").read_text() == "raftpp"
    assert same(mlflow_points(mlrun, "val/acc"), tb_acc)
    assert (mlrun / "metrics" / "val" / "embedded.avg2.level_1").is_file()  # avg@2 beside avg@2/level_1
    assert list((mlrun / "artifacts" / "alloc" / "n_vs_p").glob("step_*.png"))
    assert list((mlrun / "artifacts" / "rollout" / "sample_texts").glob("step_*.md"))
    # said once: what CSV and MLflow cannot hold; the summary names every logger's place
    assert out.count("CSVLogger cannot hold histograms") == 1 and out.count("MLFlowLogger cannot hold histograms") == 1
    assert f"tensorboard: {run / 'tb'}" in out and f"csv metrics: {run / 'csv' / 'metrics.csv'}" in out
    assert f"wandb run: {run / 'wandb' / next(iter(records))}" in out and f"run {ids['mlflow']})" in out


def test_csv_wandb_mlflow_resume_keep_every_point_once(tmp_path, cache):
    run = tmp_path / "run"
    loggers = ["logger=[csv,wandb,mlflow]", "logger.csv.flush_logs_every_n_steps=1"]  # every row on disk at once
    killed = train(run, cache, *loggers, kill_after="held-out Average@2 (iteration 1)")
    assert "checkpoint iter_001-update_000.ckpt saved" in killed
    assert len(csv_points(run, "val/acc")) == 2  # π0's and iteration 1's, the latter after the last checkpoint
    ids = json.loads((run / IDS_FILE).read_text())
    out = train(run, cache, *loggers, "ckpt_path=last")
    assert f"resuming {run} from iter_001-update_000.ckpt" in out
    # the resumed run logged iteration 1's evaluation again: each point once in the CSV file and MLflow's store
    points = csv_points(run, "val/acc")
    assert len(points) == 2 and [step for step, _ in points] == sorted(step for step, _ in points)
    assert len(csv_points(run, "iteration")) == 1
    mlrun = mlflow_run(run)
    assert mlrun.name == ids["mlflow"] and same(mlflow_points(mlrun, "val/acc"), points)
    assert json.loads((run / IDS_FILE).read_text()) == ids
    # W&B: two offline folders of one run id (`wandb sync` appends the second to the first)
    records = wandb_records(run)
    assert len(records) == 2 and {name.rsplit("-", 1)[1] for name in records} == {ids["wandb"]}
    second = list(records.values())[1][0]
    assert len([r for r in second if "val/acc" in r]) == 1
    assert list((mlrun / "artifacts" / "rollout" / "sample_texts").glob("step_*.md"))  # texts, with CSV first
    # no TensorBoard: the report reads the CSV file; the summary names the loggers there are
    curve = read_curve(run)
    assert curve.acc == pytest.approx([v for _, v in points]) and curve.cost["samples"][0] == 0
    assert not (run / "tb").exists() and "tensorboard:" not in out and "csv metrics:" in out
    assert killed.count("CSVLogger cannot hold texts") == 1


def test_csv_logger_keeps_a_resumed_runs_rows_and_rewinds_them(tmp_path):
    first = CSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"val/acc": 0.1}, step=0)
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.save()
    saved = log_positions(tmp_path)
    assert saved == {"csv/metrics.csv": 2}
    first.log_metrics({"train/loss": 1.5, "train/lr": 0.1}, step=2)  # after the checkpoint; a new column
    first.save()
    assert len(csv_points(tmp_path, "train/loss")) == 2
    assert rewind_event_files(tmp_path, saved) == (1, 0)
    resumed = CSVLogger(tmp_path, name="csv", version="")  # Lightning's would delete the file here
    resumed.log_metrics({"train/loss": 1.4}, step=2)
    resumed.log_metrics({"val/acc": 0.3, "cost/samples": 5.0}, step=2)
    resumed.finalize("success")
    assert csv_points(tmp_path, "train/loss") == [(1, 2.0), (2, 1.4)]
    assert csv_points(tmp_path, "val/acc") == [(0, 0.1), (2, 0.3)] and csv_points(tmp_path, "cost/samples") == [(2, 5)]
    assert rewind_event_files(tmp_path, {}) == (0, 1) and not (tmp_path / "csv" / "metrics.csv").exists()


def test_a_resumed_run_folder_continues_its_wandb_and_mlflow_runs_rewound(tmp_path):
    config = {
        "wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "save_dir": str(tmp_path), "mode": "offline"},
        "mlflow": {"_target_": "dibs.lit.loggers.MLFlowLogger", "save_dir": str(tmp_path / "mlruns")},
    }
    wandb, mlflow = build_loggers(config, tmp_path)
    log_hyperparams([mlflow], {"seed": 0, "ckpt_path": None})
    mlflow.log_metrics({"val/acc": 0.1, "val/x/avg@2": 0.2}, step=0)
    saved = log_positions(tmp_path)  # a checkpoint
    mlflow.log_metrics({"val/acc": 0.5, "val/x/avg@2/level_1": 0.3}, step=4)  # after it, one a new metric
    assert rewind_event_files(tmp_path, saved) == (1, 1)
    wandb_again, resumed = build_loggers(config, tmp_path)  # the resumed run folder
    log_hyperparams([resumed], {"seed": 0, "ckpt_path": "last"})  # MLflow refuses to change a param: kept
    resumed.log_hyperparams({"total_updates": 96, "ckpt_path": "x"})  # Lightning's own call at fit start: kept too
    resumed.log_metrics({"val/acc": 0.4}, step=4)
    assert (wandb_again.version, resumed.run_id) == (wandb.version, mlflow.run_id)
    assert json.loads((tmp_path / IDS_FILE).read_text()) == {"wandb": wandb.version, "mlflow": mlflow.run_id}
    mlrun = mlflow_run(tmp_path)
    assert mlflow_points(mlrun, "val/acc") == [(0, 0.1), (4, 0.4)]
    assert sorted(p.name for p in (mlrun / "metrics" / "val").iterdir()) == ["acc", "x.avg2"]
    assert (mlrun / "params" / "ckpt_path").read_text() == "None"
    assert (mlrun / "params" / "total_updates").read_text() == "96"  # a key the run lacked is added
    assert (mlrun / "tags" / "mlflow.runName").read_text() == tmp_path.name


def test_builder_names_the_key_at_fault(tmp_path, monkeypatch):
    tensorboard = {"_target_": "lightning.pytorch.loggers.TensorBoardLogger", "save_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=r"^logger: expected one entry per logger"):
        build_loggers(tensorboard, tmp_path)  # the layout before the logger group
    with pytest.raises(ValueError, match=r"^logger\.tb\._target_=no\.such\.Logger"):
        build_loggers({"tb": {**tensorboard, "_target_": "no.such.Logger"}}, tmp_path)
    csv_logger = {"_target_": "dibs.lit.loggers.CSVLogger", "save_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=r"^logger\.csv: .*unexpected keyword argument 'nonsense'$"):
        build_loggers({"csv": {**csv_logger, "nonsense": 1}}, tmp_path)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    wandb = {"_target_": "lightning.pytorch.loggers.WandbLogger", "mode": "offline"}
    with pytest.raises(ValueError, match=r"^logger=wandb needs `pip install wandb` \(or the \[loggers\] extra\)$"):
        build_loggers({"tensorboard": tensorboard, "wandb": wandb}, tmp_path)
    assert build_loggers(None, tmp_path) == [] and not (tmp_path / IDS_FILE).exists()
