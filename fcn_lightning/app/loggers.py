"""A stage's loggers from ``cfg.logger``, a mapping name -> a Lightning logger's settings
(conf/logger/: tensorboard, csv, mlflow, wandb, several at once): each logger is Lightning's own,
given the stage's name and, for MLflow and wandb, the run that a resumed stage continues."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from lightning_fabric.utilities.logger import _convert_params, _flatten_dict
from pytorch_lightning import loggers as pl_loggers
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from ..errors import ConfigError

INSTALL = "pip install -e '.[loggers]'"
EXAMPLE = "pytorch_lightning.loggers.CSVLogger"


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing metrics.csv is kept and appended to (Lightning's
    deletes it), its columns read from its header."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class CSVLogger(pl_loggers.CSVLogger):
    """Lightning's CSVLogger, but a resumed stage appends to its metrics.csv, where Lightning's
    would start it over and lose the rows written before the interruption."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class MLFlowLogger(pl_loggers.MLFlowLogger):
    """Lightning's MLFlowLogger, but a resumed run keeps the hyper-parameters it was started with
    (MLflow refuses to change one, and a resume may change e.g. ``data.num_workers``)."""

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        logged = self.experiment.get_run(self.run_id).data.params
        params = _flatten_dict(_convert_params(params))
        super().log_hyperparams({k: v for k, v in params.items() if k not in logged})


def stage_id(out: Path, stage: str) -> str:
    """The stage's id in MLflow and wandb: the same for a resumed run, another for another run
    folder (of the resolved path)."""
    return f"{stage}-{hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:12]}"


def needs(cls: type, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (module, pip package) pairs that a logger of ``cls`` imports."""
    if issubclass(cls, pl_loggers.MLFlowLogger):
        store = str(settings.get("tracking_uri") or "")
        sql = [("sqlalchemy", "sqlalchemy"), ("alembic", "alembic")] * store.startswith("sqlite:")
        return [("mlflow", "mlflow-skinny"), *sql]
    if issubclass(cls, pl_loggers.WandbLogger):
        return [("wandb", "wandb")]
    return []


def logger_classes(settings: Mapping[str, Any] | None) -> dict[str, type]:
    """Each logger's class; a missing package is named with its install command (ConfigError)."""
    if settings and "_target_" in settings:
        raise ConfigError(
            "logger: expected one entry per logger (logger.tensorboard, logger.csv, ...: "
            "conf/logger/*.yaml), got one logger's settings"
        )
    classes = {}
    for name, conf in (settings or {}).items():
        if conf is None:  # logger.csv=null leaves one out
            continue
        if not conf.get("_target_"):
            raise ConfigError(f"logger.{name}: no _target_ (its class, e.g. {EXAMPLE})")
        try:
            classes[name] = cls = get_class(conf["_target_"])
        except (ImportError, ValueError) as err:
            raise ConfigError(f"logger.{name}._target_: {err}") from None
        if not issubclass(cls, Logger):
            raise ConfigError(f"logger.{name}._target_: {cls.__name__} is not a Lightning logger")
        for module, package in needs(cls, conf):
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"logger={name} needs the {module} package: {INSTALL} (or pip install {package})"
                )
    return classes


def make_loggers(settings: Mapping[str, Any] | None, stage: str, out: Path) -> list[Logger]:
    """The loggers of ``stage`` of the run in ``out``: TensorBoard and CSV in ``<save_dir>/<stage>``;
    MLflow and wandb runs named ``<stage> <out's name>``, the same run again on resume."""
    loggers = []
    for name, cls in logger_classes(settings).items():
        conf, key = settings[name], stage_id(out, stage)
        if issubclass(cls, pl_loggers.TensorBoardLogger | pl_loggers.CSVLogger):
            extra = {"name": stage, "version": ""}
        elif issubclass(cls, pl_loggers.MLFlowLogger):
            tags = {**(conf.get("tags") or {}), "run_folder": str(out), "stage_id": key}
            run_id = mlflow_run(conf.get("tracking_uri"), conf.get("experiment_name"), key)
            extra = {"run_name": f"{stage} {out.name}", "tags": tags, "run_id": run_id}
        elif issubclass(cls, pl_loggers.WandbLogger):
            finish_wandb()  # Lightning's WandbLogger would log into the previous stage's run
            extra = {"name": f"{stage} {out.name}", "id": key}
        else:
            extra = {}
        loggers.append(instantiate(conf, **extra))
    return loggers


def mlflow_run(tracking_uri: str | None, experiment: str | None, key: str) -> str | None:
    """The id of the MLflow run of ``key`` that a resumed stage continues; None: a new run."""
    if rank_zero_only.rank != 0:  # only rank zero logs
        return None
    from mlflow.tracking import MlflowClient  # an optional package (the loggers extra)

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment or "lightning_logs")
    if found is None or found.lifecycle_stage == "deleted":
        return None
    runs = client.search_runs([found.experiment_id], f"tags.stage_id = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None


def finish_wandb() -> None:
    """End the wandb run that this process has open (a previous stage's)."""
    import wandb  # an optional package (the loggers extra)

    if wandb.run is not None:
        wandb.finish()
