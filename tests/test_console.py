"""The console of a run: the stages, progress bars and the project's own messages; Lightning's
information, its advertisements and warnings that do not apply stay off it, and the run's log
file keeps every record (``hydra/job_logging=verbose`` prints them all)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers.launcher import cli

from fcn_lightning.app.console import (
    ConsoleFilter,
    NoAdvertisements,
    format_warning,
    route_third_party_logs,
)
from fcn_lightning.data import base as data_base

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "arch=fcn16s",  # two stages: the lines of a stage change come twice
    "arch.width=0.0625",
    "data.image_size=32",
    "data.train_size=4",
    "data.val_size=2",
    "data.batch_size=4",
    "data.val_batch_size=2",
    "trainer.max_steps=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "images.panel_size=1",
]
# what a user saw on every run before: none of it says anything about the run
NOISE = (
    "LitLogger",
    "litmodels",
    "💡",
    "FLOPs",
    "Total Flops",
    "GPU available",
    "TPU available",
    "Restoring states",
    "Loaded model weights",
    "LeafSpec",
    "validation_step` but have no `val_dataloader",
    "][INFO] - ",  # the project's lines are plain text on the console
)


def train(tmp_path: Path, *extra: str) -> tuple[str, Path]:
    env = {
        k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"
    }  # warnings as users see them
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, *extra, f"hydra.run.dir={out}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    return console, out


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("quiet"))


@pytest.mark.xdist_group("console_quiet_run")  # one worker computes the module fixture once
def test_console_shows_the_stages_and_no_third_party_noise(quiet_run):
    console, _ = quiet_run
    for line in ("[1/2] fcn32s", "[2/2] fcn16s", "fcn16s done: val mIoU", "run folder:"):
        assert line in console
    assert console.count("model: FCN") == 2  # the one-line model summary, once per stage
    found = [n for n in NOISE if n in console]
    assert not found, (found, console[-3000:])


@pytest.mark.xdist_group("console_quiet_run")  # one worker computes the module fixture once
def test_the_log_file_keeps_every_record_but_the_advertisements(quiet_run):
    _, out = quiet_run
    log = (out / "train.log").read_text()
    assert "[fcn_lightning][INFO] - [2/2] fcn16s" in log  # the project's own, with time and level
    assert "GPU available" in log and "Restoring states" in log  # Lightning's, off the console
    assert "LitLogger" not in log and "💡" not in log
    # the blocks printed as they are: the label check and the final table
    assert "label check: synthetic scenes" in log
    assert "Validation metrics of each stage" in log and "mIoU %" in log


@pytest.mark.xdist_group("console_quiet_run")  # one worker computes the module fixture once
def test_eval_console_has_its_table_and_no_warning_of_the_projects_making(quiet_run, tmp_path):
    _, out = quiet_run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [
            sys.executable, str(ROOT / "eval.py"), f"ckpt_path={out / 'fcn16s/checkpoints/best.ckpt'}",
            "data.image_size=32", "data.val_size=2", "trainer.accelerator=cpu",
            f"output={tmp_path / 'eval'}", f"hydra.run.dir={tmp_path / 'eval_run'}",
        ],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "fcn16s val" in console and "IoU per class" in console
    # eval's Trainer has no logger: the module must not ask Lightning to log to one
    assert "but have no logger configured" not in console
    found = [n for n in NOISE if n in console]
    assert not found, (found, console)


def test_verbose_logging_prints_everything_on_the_console(tmp_path):
    # a process forked from helpers.launcher's server (train.py's imports done; warnings ignored,
    # which takes nothing away from what this test looks for: the records verbose logging prints)
    out = tmp_path / "run"
    done = cli(
        *TINY, "arch=fcn32s", "hydra/job_logging=verbose", f"hydra.run.dir={out}", cwd=tmp_path
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "GPU available" in console and "[fcn_lightning][INFO] - [1/1] fcn32s" in console
    assert "GPU available" in (out / "train.log").read_text()


def record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_console_filter_keeps_warnings_and_errors_of_every_logger():
    keep = ConsoleFilter().filter
    assert keep(record("fcn_lightning", logging.INFO, "[1/3] fcn32s"))
    assert keep(record("pytorch_lightning.utilities.rank_zero", logging.WARNING, "real trouble"))
    assert keep(record("lightning_fabric.utilities.seed", logging.ERROR, "bad seed"))
    assert keep(record("py.warnings", logging.WARNING, "data.py:3: UserWarning: a real one"))
    assert not keep(record("pytorch_lightning.utilities.rank_zero", logging.INFO, "GPU available"))
    assert not keep(record("lightning_fabric.utilities.seed", logging.INFO, "Seed set to 1"))
    assert not keep(
        record(
            "py.warnings", logging.WARNING, "x.py:1: `isinstance(treespec, LeafSpec)` is deprecated"
        )
    )
    assert not NoAdvertisements().filter(
        record("pytorch_lightning.utilities.rank_zero", logging.INFO, "💡 Tip: try litlogger")
    )


def test_lightning_records_and_warnings_reach_the_root_handlers():
    """What the console leaves out still reaches the log file: Lightning's records and Python's
    warnings go through the root logger's handlers (Lightning's own handler is removed)."""
    root, pl_logger = logging.getLogger(), logging.getLogger("pytorch_lightning")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    saved = (root.handlers[:], root.level, pl_logger.handlers[:], pl_logger.propagate)
    root.handlers, pl_logger.handlers = [handler], [logging.StreamHandler()]
    root.setLevel(logging.INFO)
    try:
        route_third_party_logs()
        assert pl_logger.propagate and not pl_logger.handlers
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU available: False")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(
                "`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1
            )
    finally:
        logging.captureWarnings(False)
        root.handlers, pl_logger.handlers = saved[0], saved[2]
        root.setLevel(saved[1])
        pl_logger.propagate = saved[3]
    names = {r.name for r in seen}
    assert {"pytorch_lightning.utilities.rank_zero", "py.warnings"} <= names


def test_the_projects_warnings_read_as_sentences_others_keep_their_source():
    ours = format_warning("SIFT Flow train: 2 image(s) without annotation", UserWarning,
                          data_base.__file__, 12)  # fmt: skip
    assert ours == "warning: SIFT Flow train: 2 image(s) without annotation\n"
    theirs = format_warning("deprecated", FutureWarning, "/site-packages/lib/x.py", 3)
    assert "/site-packages/lib/x.py:3" in theirs and "deprecated" in theirs
