"""logger=tensorboard|csv|mlflow|wandb, several at once or none: real tiny runs read back with each
logger's own reader (pandas, MLflow's search and metric history, wandb's offline run files), each
stage's final numbers against the run's metrics.json, a resumed stage continuing its logs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import wandb
from helpers import TINY, cfg_of
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto.wandb_internal_pb2 import Record

from fcn_lightning.app.loggers import make_loggers, stage_id
from fcn_lightning.app.train import train
from fcn_lightning.contract import METRIC_NAMES
from fcn_lightning.errors import ConfigError, RunInterrupted

STAGES = ("fcn32s", "fcn16s")
KILLED_AT = 1  # the step of fcn16s that SIGTERM stops; resume=true trains it on to 2
# 8 images, batch 4: one epoch of 2 steps, then its validation (no figures: TINY)
SMALL = [*TINY, "data.train_size=8", "trainer.max_steps=2",
         "+callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor"]  # fmt: skip
KILL = ["+callbacks.kill._target_=interrupts.SigtermAtStep", f"+callbacks.kill.step={KILLED_AT}",
        "+callbacks.kill.stage=fcn16s"]  # fmt: skip
ALL = "logger=[tensorboard,csv,mlflow,wandb]"


def quiet_stores(monkeypatch: pytest.MonkeyPatch, base: Path) -> None:
    """wandb's settings and caches in a test folder, WANDB_MODE restored after (Lightning sets it
    for an offline run), no MLflow telemetry."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(base / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(autouse=True)
def _quiet_stores(tmp_path_factory, monkeypatch):
    quiet_stores(monkeypatch, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def run_all(tmp_path_factory) -> Path:
    """FCN-32s -> FCN-16s with all four loggers, stopped by SIGTERM in FCN-16s, then resumed."""
    out = tmp_path_factory.mktemp("all_loggers")
    with pytest.MonkeyPatch.context() as mp:
        quiet_stores(mp, tmp_path_factory.getbasetemp())
        with pytest.raises(RunInterrupted):
            train(cfg_of("config", ["arch=fcn16s", *SMALL, ALL, *KILL], out))
        train(cfg_of("config", ["arch=fcn16s", *SMALL, ALL, "resume=true"], out))
        wandb.finish()  # the last stage's run: its file complete
        wandb.teardown()  # and wandb's service process stopped
    return out


def final(out: Path, stage: str) -> dict[str, float]:
    """The stage's chosen checkpoint's val metrics as metrics.json holds them."""
    return {k: json.loads((out / "metrics.json").read_text())[stage][k] for k in METRIC_NAMES}


def test_the_group_composes_one_several_or_no_logger():
    one = cfg_of("config", ["logger=csv"], Path("/runs/a"))
    assert list(one.logger) == ["csv"]
    assert one.logger.csv.save_dir == "/runs/a/csv"
    assert list(cfg_of("config", []).logger) == ["tensorboard"]  # the default
    several = cfg_of("config", ["logger=[tensorboard,csv,mlflow,wandb]"], Path("/runs/a"))
    assert list(several.logger) == ["tensorboard", "csv", "mlflow", "wandb"]
    assert several.logger.tensorboard.save_dir == "/runs/a/tensorboard"
    assert several.logger.mlflow.tracking_uri == "sqlite:////runs/a/mlflow.db"
    assert several.logger.mlflow.experiment_name == "fcn_lightning"
    assert several.logger.wandb.offline is True and several.logger.wandb.save_dir == "/runs/a"
    assert several.logger.wandb.project == "fcn_lightning"
    for none in (["logger=none"], ["logger=[]"], ["~logger"]):
        assert make_loggers(cfg_of("config", none).get("logger"), "fcn32s", Path("/runs/a")) == []


@pytest.mark.xdist_group("loggers_run_all")  # one worker trains the module fixture
def test_several_loggers_each_write_one_run_per_stage(run_all):
    for stage in STAGES:
        events = EventAccumulator(str(run_all / "tensorboard" / stage))
        events.Reload()
        assert {"train/loss", "val/mIoU", "hp/mIoU"} <= set(events.Tags()["scalars"])
        assert (run_all / "csv" / stage / "metrics.csv").is_file()
    assert (run_all / "mlflow.db").is_file() and (run_all / "wandb").is_dir()


@pytest.mark.xdist_group("loggers_run_all")  # one worker trains the module fixture
def test_csv_logs_curves_and_final_numbers_and_appends_on_resume(run_all):
    for stage in STAGES:
        rows = pd.read_csv(run_all / "csv" / stage / "metrics.csv")
        loss = rows.dropna(subset="train/loss")
        assert rows.dropna(subset="val/mIoU").shape[0] >= 1
        assert any(c.startswith("lr-") for c in rows.columns)
        hp = rows.dropna(subset="hp/mIoU").iloc[-1]  # the chosen checkpoint's validation
        assert {k: hp[f"hp/{k}"] for k in METRIC_NAMES} == pytest.approx(final(run_all, stage))
        # each step once; fcn16s: its step before the stop kept, the one after appended
        assert len(loss) == 2 and loss["step"].is_unique


@pytest.mark.xdist_group("loggers_run_all")  # one worker trains the module fixture
def test_mlflow_has_one_run_per_stage_continued_on_resume(run_all):
    store = f"sqlite:///{run_all}/mlflow.db"
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["fcn_lightning"]).set_index("tags.mlflow.runName")
    assert sorted(runs.index) == sorted(f"{s} {run_all.name}" for s in STAGES)  # one per stage
    client = MlflowClient(store)
    for stage in STAGES:
        run = runs.loc[f"{stage} {run_all.name}"]
        assert run["status"] == "FINISHED" and run["params.model/arch"] == stage
        assert run["tags.run_folder"] == str(run_all)
        assert {k: run[f"metrics.hp/{k}"] for k in METRIC_NAMES} == pytest.approx(final(run_all, stage))  # fmt: skip
        assert client.get_metric_history(run["run_id"], "val/mIoU")
        steps = [m.step for m in client.get_metric_history(run["run_id"], "train/loss")]
        assert len(steps) == 2 and len(set(steps)) == 2  # fcn16s: 1 before the stop, 1 after
        assert run["artifact_uri"].startswith(str(run_all))  # the figures' store: the run folder


def wandb_records(path: Path):
    """The records of an offline wandb run file: LevelDB-log blocks of 32 KiB (each chunk: crc32,
    length, type) after a 7-byte header, the chunks of a record making one protobuf ``Record``.
    The installed wandb writes the file from its Go service and keeps no Python reader of it."""
    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            yield Record.FromString(chunk)
            chunk = b""


@pytest.mark.xdist_group("loggers_run_all")  # one worker trains the module fixture
def test_wandb_offline_run_per_stage_with_curves_and_final_numbers(run_all):
    for stage in STAGES:
        run_id, folder = stage_id(run_all, stage), run_all / "wandb"
        files = sorted([*folder.glob(f"offline-run-*-{run_id}/*.wandb"),
                        *folder.glob(f"offline-run-*-{run_id}-[0-9]*/*.wandb")])  # fmt: skip
        # offline, a resumed stage writes a second file of the same run id (wandb sync joins
        # them); started in the same second as the first, its folder's name ends in -1
        assert len(files) == (2 if stage == "fcn16s" else 1)
        history, names, losses = [], set(), []
        for f in files:
            for record in wandb_records(f):
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    names.add(record.run.display_name)
                elif kind == "history":
                    items = record.history.item
                    history.append(
                        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                    )
            losses.append(sum("train/loss" in h for h in history) - sum(losses))
        assert names == {f"{stage} {run_all.name}"}
        assert losses == ([1, 1] if stage == "fcn16s" else [2])  # steps before / after the stop
        assert any("val/mIoU" in h for h in history)
        assert any(k.startswith("lr-") for h in history for k in h)
        hp = [h for h in history if "hp/mIoU" in h][-1]
        assert {k: hp[f"hp/{k}"] for k in METRIC_NAMES} == pytest.approx(final(run_all, stage))


def test_no_logger_writes_no_logger_folder(tmp_path):
    train(cfg_of("config", [*TINY, "arch=fcn32s", "staged=false", "logger=none"], tmp_path))
    assert (tmp_path / "metrics.json").is_file()
    left = {"tensorboard", "csv", "wandb", "mlflow.db", "mlflow-artifacts", "mlruns"}
    assert not left & {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    "logger, missing, message",
    [
        ("mlflow", "mlflow", "logger=mlflow needs the mlflow package: pip install -e '.[loggers]' (or pip install mlflow-skinny)"),
        ("mlflow", "alembic", "logger=mlflow needs the alembic package: pip install -e '.[loggers]' (or pip install alembic)"),
        ("wandb", "wandb", "logger=wandb needs the wandb package: pip install -e '.[loggers]' (or pip install wandb)"),
    ],
)  # fmt: skip
def test_a_missing_package_is_named_with_its_install_command(
    tmp_path, monkeypatch, logger, missing, message
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == missing else find_spec(name, *a),
    )
    cfg = cfg_of(
        "config", [*TINY, "arch=fcn32s", "staged=false", f"logger=[csv,{logger}]"], tmp_path
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value) == message
    # refused with the other settings, before the data is read: no run folder begun
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "fcn32s").exists()


def test_one_loggers_settings_in_place_of_the_mapping_is_refused():
    settings = {"_target_": "pytorch_lightning.loggers.CSVLogger", "save_dir": "x"}
    with pytest.raises(ConfigError, match=r"logger: expected one entry per logger"):
        make_loggers(settings, "fcn32s", Path("/runs/a"))
