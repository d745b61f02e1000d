"""The run's loggers (the ``logger`` config group) and what the kit sends them besides scalars.

``cfg.logger`` maps a name to one Lightning logger's config (``conf/logger/``: tensorboard, the default, csv, wandb,
mlflow; ``logger=[tensorboard,csv]`` or ``logger=many`` for several). ``build_loggers`` instantiates them before
the warm start, so a missing package or a bad key fails first; ``log_hyperparams`` gives each the run's settings.

**Scalars** go to every logger: the kit's own ``log_metrics`` calls loop over ``trainer.loggers``, as Lightning
does. **Histograms, figures and texts** go through ``log_histogram``, ``log_figure`` and ``log_text``, to every
logger that can hold that kind (TensorBoard all three; W&B as Histogram, Image and a one-cell Table; MLflow figures
and texts as artifacts); a log line says once which loggers cannot (CSV holds scalars only), instead of dropping
them silently.

**A resumed run** (``ckpt_path=last``) continues the same W&B and MLflow runs: their ids are kept in
``<run_dir>/loggers.json``. ``dibs.resume`` rewinds the logs that live in the run folder (TensorBoard events, the
CSV file, an MLflow file store) to the checkpoint; a W&B offline run's records are not rewound (see
docs/logging.md).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers import MLFlowLogger as LightningMLFlowLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from dibs.core.tags import VAL_ACC
from dibs.lit.logs import info
from dibs.resume import EVENT_PREFIX

__all__ = [
    "IDS_FILE",
    "CSVLogger",
    "MLFlowLogger",
    "build_loggers",
    "holders",
    "log_figure",
    "log_histogram",
    "log_hyperparams",
    "log_text",
    "logger_locations",
]

IDS_FILE = "loggers.json"  # in the run folder: logger name -> the W&B or MLflow run id a resumed run continues
# Loggers whose package is optional (the [loggers] extra): Lightning's class, the module, the pip package.
_PACKAGES = ((WandbLogger, "wandb", "wandb"), (LightningMLFlowLogger, "mlflow", "mlflow-skinny"))
KINDS = ("histogram", "figure", "text")
_MLFLOW_REFUSED = re.compile(r"[^a-zA-Z0-9_/. -]+")  # characters MLflow refuses in a metric name
_told: set[tuple[str, str]] = set()  # (kind, logger class) already named as unable to hold that kind


# ---- loggers Lightning ships, adapted --------------------------------------------------------------------------
class _KeptMetricsFile(ExperimentWriter):
    """Lightning's CSV writer, except that a metrics.csv already in its folder (a resumed run's, rewound to the
    checkpoint by ``dibs.resume``) is appended to, under its own header: Lightning's deletes it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger for runs that may be resumed: the rows of the run's earlier life are kept."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeptMetricsFile(log_dir=self.log_dir)
        return self._experiment


class MLFlowLogger(LightningMLFlowLogger):
    """Lightning's MLFlowLogger, allowed a local file store (a ``file:`` tracking URI), which MLflow 3 refuses
    unless ``MLFLOW_ALLOW_FILE_STORE=true``: one folder per run needs no database (runs side by side never share a
    file) and its append-only metric files can be rewound on resume. ``tracking_uri`` None: ``$MLFLOW_TRACKING_URI``
    when set, else ``file:<save_dir>``.

    Metric names: characters MLflow refuses are dropped (``avg@2`` -> ``avg2``, as Lightning does, without its
    warning per name). A file store keeps a metric as the file ``metrics/<name>``, so no name can also be the
    folder of another (``val/x/avg@2`` beside ``val/x/avg@2/level_1``): there the slashes after the first become
    dots (``val/x.avg2.level_1``; MLflow groups charts by the part before the first slash)."""

    def __init__(self, *, tracking_uri: str | None = None, save_dir: str | None = "./mlruns", **kwargs: Any) -> None:
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"file:{save_dir}"
        self._file_store = tracking_uri.startswith("file:")
        if self._file_store:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        super().__init__(tracking_uri=tracking_uri, save_dir=save_dir, **kwargs)

    def log_hyperparams(self, params: Any) -> None:
        """Only the keys the run does not hold yet: a resumed run continues the MLflow run, which refuses to change
        a logged param (Lightning's own call at fit start included, whose module settings such as
        ``total_updates`` change when a run is resumed with more iterations): the run keeps the settings it was
        started with."""
        params = dict(vars(params) if not isinstance(params, Mapping) else params)
        if rank_zero_only.rank == 0 and self.run_id is not None:
            held = self.experiment.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in held and not any(h.startswith(f"{k}/") for h in held)}
        if params:
            super().log_hyperparams(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({self.metric_name(k): v for k, v in metrics.items()}, step)

    def metric_name(self, tag: str) -> str:
        """The name ``tag`` is logged under in this logger's store."""
        name = _MLFLOW_REFUSED.sub("", tag)
        if self._file_store:
            head, slash, rest = name.partition("/")
            name = head + slash + rest.replace("/", ".")
        return name


# ---- building --------------------------------------------------------------------------------------------------
def build_loggers(config: Any, run_dir: str | os.PathLike) -> list[Logger]:
    """The loggers ``config`` (``cfg.logger``: name -> a logger's config with its ``_target_``; None: none) names,
    in its order. W&B and MLflow runs are named after the run folder unless named, and continue the runs recorded
    in ``<run_dir>/loggers.json`` (a resumed run folder's). Raises ValueError naming the key at fault (a missing
    package, an unknown target or argument)."""
    from hydra.utils import get_object, instantiate
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if not config:
        return []
    if not isinstance(config, Mapping) or "_target_" in config:
        raise ValueError(
            "logger: expected one entry per logger, e.g. logger.tensorboard._target_=... (conf/logger/*.yaml); "
            "choose them with logger=csv, logger=[tensorboard,csv] or logger=many"
        )
    run_dir = Path(run_dir)
    ids_file = run_dir / IDS_FILE
    ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
    loggers, found = [], {}
    for name, entry in config.items():
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise ValueError(f"logger.{name}: not a logger config (a mapping with _target_): {entry!r}")
        try:
            target = get_object(entry["_target_"])
        except Exception as error:  # hydra says what it could not import
            raise ValueError(f"logger.{name}._target_={entry['_target_']}: {error}") from None
        cls = target if isinstance(target, type) else type(None)
        for base, module, package in _PACKAGES:
            if issubclass(cls, base) and importlib.util.find_spec(module) is None:
                raise ValueError(f"logger={name} needs `pip install {package}` (or the [loggers] extra)")
        kwargs = _identity(cls, entry, run_dir, ids.get(name))
        try:
            logger = instantiate(dict(entry), **kwargs)
        except Exception as error:  # hydra's InstantiationException: the constructor's own error is its cause
            raise ValueError(f"logger.{name}: {error.__cause__ or error}") from None
        if issubclass(cls, (WandbLogger, LightningMLFlowLogger)):
            found[name] = logger
        loggers.append(logger)
    if found and rank_zero_only.rank == 0:
        _record_ids(ids_file, ids, found)
    return loggers


def _identity(cls: type, entry: Mapping[str, Any], run_dir: Path, recorded: str | None) -> dict[str, Any]:
    """W&B and MLflow: the run's name (the run folder's, unless set) and the id of the run to continue (the one
    the folder recorded; for W&B a new id otherwise, known before the run starts)."""
    if issubclass(cls, WandbLogger):
        extra = {} if entry.get("name") is not None else {"name": run_dir.name}
        if entry.get("id") is None and entry.get("version") is None:  # W&B's own form: 8 of [a-z0-9]
            extra["id"] = recorded or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        return extra
    if issubclass(cls, LightningMLFlowLogger):
        extra = {} if entry.get("run_name") is not None else {"run_name": run_dir.name}
        if entry.get("run_id") is None and recorded:
            extra["run_id"] = recorded
        return extra
    return {}


def _record_ids(path: Path, ids: dict[str, str], found: dict[str, Logger]) -> None:
    """W&B's id as chosen; MLflow's once its run exists (created here, before the warm start)."""
    now = {**ids, **{name: str(logger.version) for name, logger in found.items()}}
    if now != ids:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(now, indent=1) + "\n")
        os.replace(tmp, path)


def log_hyperparams(loggers: Sequence[Logger], params: Mapping[str, Any]) -> None:
    """The run's settings (flattened, ``algo.lr``) to every logger. TensorBoard also gets its HParams summary with
    ``val/acc`` as the metric, so the HParams tab shows each run's settings beside its accuracy (read from the run's
    own val/acc points: no placeholder point is logged). An MLflow run continued by a resumed run only gets the keys
    it lacks: MLflow refuses to change a logged param."""
    if rank_zero_only.rank != 0:
        return
    params = dict(params)
    for logger in loggers:  # (dibs' MLFlowLogger itself leaves out the keys a continued run holds)
        if isinstance(logger, TensorBoardLogger):
            _hparams_summary(logger, params)
        logger.log_hyperparams(params)


def _hparams_summary(logger: TensorBoardLogger, params: Mapping[str, Any]) -> None:
    if any(Path(logger.log_dir).glob(f"{EVENT_PREFIX}*")):
        return  # a resumed run: its events hold the summary since its start (written before its first checkpoint)
    from torch.utils.tensorboard.summary import hparams

    writer = logger.experiment._get_file_writer()
    for summary in hparams(tensorboard_values(params), {VAL_ACC: None}):  # the metric's values: its own points
        writer.add_summary(summary)


def tensorboard_values(params: Mapping[str, Any]) -> dict[str, int | float | str]:
    """Settings as the HParams plugin takes them, numbers and strings: booleans and null spelt as in YAML, lists
    and anything else as text."""
    out: dict[str, int | float | str] = {}
    for key, value in params.items():
        if isinstance(value, bool) or value is None:
            value = {True: "true", False: "false", None: "null"}[value]
        elif not isinstance(value, (int, float, str)):
            value = str(value)
        out[key] = value
    return out


# ---- histograms, figures, texts --------------------------------------------------------------------------------
def _kinds(logger: Logger) -> tuple[str, ...]:
    if isinstance(logger, (TensorBoardLogger, WandbLogger)):
        return KINDS
    if isinstance(logger, LightningMLFlowLogger):
        return ("figure", "text")
    return ()  # CSV (scalars only), and loggers the kit does not know


def holders(loggers: Sequence[Logger], kind: str) -> list[Logger]:
    """The loggers that can hold ``kind`` (histogram, figure or text); says once per kind and logger class which
    cannot."""
    takers = [logger for logger in loggers if kind in _kinds(logger)]
    for logger in loggers:
        name = type(logger).__name__
        if kind not in _kinds(logger) and (kind, name) not in _told:
            _told.add((kind, name))
            where = f"they go to {', '.join(type(t).__name__ for t in takers)} only" if takers else "not logged"
            info(f"{name} cannot hold {kind}s: {where}")
    return takers


def log_histogram(loggers: Sequence[Logger], tag: str, values: Any, step: int) -> None:
    """A histogram of ``values`` at ``step`` to every logger that holds histograms."""
    values = np.asarray(values, dtype=np.float64)
    for logger in holders(loggers, "histogram"):
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(tag, values, step)
        else:
            import wandb

            logger.log_metrics({tag: wandb.Histogram(values)}, step=step)


def log_figure(loggers: Sequence[Logger], tag: str, figure: Any, step: int) -> None:
    """A matplotlib figure at ``step`` to every logger that holds images (MLflow: artifact
    ``<tag>/step_<step>.png``); the figure is closed."""
    try:
        for logger in holders(loggers, "figure"):
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, figure, step, close=False)
            elif isinstance(logger, WandbLogger):
                import wandb

                logger.log_metrics({tag: wandb.Image(figure)}, step=step)
            else:
                logger.experiment.log_figure(logger.run_id, figure, f"{tag}/step_{step:07d}.png")
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


def log_text(loggers: Sequence[Logger], tag: str, text: str, step: int) -> None:
    """A (markdown) text at ``step`` to every logger that holds texts (W&B: a one-cell table; MLflow: artifact
    ``<tag>/step_<step>.md``)."""
    for logger in holders(loggers, "text"):
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text, step)
        elif isinstance(logger, WandbLogger):
            logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)
        else:
            logger.experiment.log_text(logger.run_id, text, f"{tag}/step_{step:07d}.md")


# ---- where they write ------------------------------------------------------------------------------------------
def logger_locations(loggers: Sequence[Logger]) -> dict[str, str]:
    """Where each logger wrote, for the end-of-run summary: a label (12 characters at most) -> its folder, file or
    store."""
    where: dict[str, str] = {}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            label, place = "tensorboard", logger.log_dir
        elif isinstance(logger, LightningCSVLogger):
            label, place = "csv metrics", os.path.join(logger.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        elif isinstance(logger, WandbLogger):
            label, place = "wandb run", str(Path(logger.experiment.dir).parent)  # dir: the run folder's files/
        elif isinstance(logger, LightningMLFlowLogger):
            store = logger.save_dir or getattr(logger, "_tracking_uri", "?")
            label, place = "mlflow run", f"{store} (experiment {logger.experiment_id}, run {logger.run_id})"
        else:
            label = type(logger).__name__.lower()[:12]
            place = str(getattr(logger, "log_dir", None) or logger.save_dir or "-")
        base, n = label, 2
        while label in where:  # two loggers of one kind
            label, n = f"{base[:10]} {n}", n + 1
        where[label] = place
    return where
