"""Checkpointing: best and last checkpoints, written atomically, and a checkpoint on interruption."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ModelSummary
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.model_summary import get_human_readable_count

from ..checkpoints import load_weights_only

log = logging.getLogger("fcn_lightning")


def best_checkpoint(dirpath: str | Path, monitor: str = "val/mIoU") -> ModelCheckpoint:
    """``best.ckpt``: the epoch with the highest ``monitor`` so far."""
    return ModelCheckpoint(
        dirpath=dirpath, filename="best", monitor=monitor, mode="max", save_top_k=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip


def last_checkpoint(dirpath: str | Path) -> ModelCheckpoint:
    """``last.ckpt``, rewritten after every epoch (Lightning's ``save_last`` can go stale)."""
    return ModelCheckpoint(
        dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )


class InterruptCheckpoint(Callback):
    """On SIGTERM or a first Ctrl+C, stop at the end of the step and write ``last.ckpt`` for an
    exact ``resume=true``; a second Ctrl+C stops at once and writes nothing, nor do non-finite
    weights. docs/TRAINING.md tells the rest."""

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.ctrl_c = False  # the stop came from Ctrl+C, not SIGTERM
        self._previous: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.ctrl_c = False

        def first_ctrl_c(signum: int, frame: Any) -> None:
            if self.ctrl_c:  # the second one
                signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
                raise KeyboardInterrupt
            connector = getattr(trainer, "_signal_connector", None)
            if connector is None or not hasattr(connector, "received_sigterm"):
                raise KeyboardInterrupt  # this Lightning cannot stop after the step: at once
            self.ctrl_c = True
            connector.received_sigterm = True  # Lightning's SIGTERM path: stop after this step
            print(
                "\nCtrl+C: finishing this step, then writing last.ckpt (Ctrl+C again stops at "
                "once, without it)",
                file=sys.stderr,
                flush=True,
            )

        self._previous = signal.signal(signal.SIGINT, first_ctrl_c)

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        if isinstance(exception, KeyboardInterrupt):
            return log.warning("stopped at once (Ctrl+C twice): %s left as it was", self.path)
        if not isinstance(exception, SIGTERMException):
            return
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            return log.warning("interrupted with non-finite weights: %s left as it was", self.path)
        # Stopped between two epochs: the finished epoch's batch count would make a resume skip
        # the next epoch, which starts from its first batch.
        epochs = trainer.fit_loop.epoch_progress.current
        batches = trainer.fit_loop.epoch_loop.batch_progress
        if epochs.completed == epochs.started and batches.current.ready:
            batches.reset_on_run()
        trainer.save_checkpoint(self.path, weights_only=False)
        at = trainer.current_epoch, trainer.global_step, self.path
        log.warning("interrupted at epoch %d, step %d: wrote %s", *at)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint IO for every Trainer: writes renamed into place (a failed one removed, a full
    disk named); reads always ``weights_only``, so a planted checkpoint cannot run code."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError | RuntimeError) and _disk_full(err, path):
                raise OSError(
                    errno.ENOSPC,
                    f"no space left on the device while writing {path}: free some space (or "
                    "train into a folder on a larger disk: hydra.run.dir=...), then continue "
                    f"with resume=true hydra.run.dir={path.parents[2]}. "
                    + ("The previous checkpoint is kept." if path.is_file() else ""),
                ) from err
            raise

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_weights_only(path, map_location=map_location or "cpu")


def _disk_full(err: BaseException, path: Path) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's zip writer reports a full disk as a RuntimeError ("... file write failed")
    if "write failed" in str(err) or "No space left" in str(err):
        return True
    try:
        return shutil.disk_usage(path.parent).free < 1 << 20
    except OSError:
        return False


class ParameterSummary(ModelSummary):
    """The model summary as one line of the run's log (parameters trained and fixed, size), in
    place of Lightning's table, whose FLOPs read 0 (``fcn_lightning.bench.model_cost`` counts)."""

    @staticmethod
    def summarize(summary_data, total: int, trained: int, model_size: float, *_, **__) -> None:
        columns = dict(summary_data)
        names = zip(columns.get("Name", []), columns.get("Type", []), strict=False)
        model = next((f"{t}" for n, t in names if n == "model"), "?")
        counts = [get_human_readable_count(n) for n in (total, trained, total - trained)]
        log.info(
            "model: %s, %s parameters (%s trained, %s fixed), %.1f MB", model, *counts, model_size
        )


class ValidationSteps(Callback):
    """The global steps at which the fit validated (the sanity check and ``validate`` aside)."""

    def __init__(self) -> None:
        self.validated: list[int] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self.validated.append(trainer.global_step)
