"""Checkpointing: best and last checkpoints, written atomically, and a checkpoint on interruption."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .checkpoints import load_weights_only

log = logging.getLogger("fcn_lightning")


def best_checkpoint(dirpath: str | Path, monitor: str = "val/mIoU") -> ModelCheckpoint:
    """``best.ckpt``: the epoch with the highest ``monitor`` so far."""
    return ModelCheckpoint(
        dirpath=dirpath, filename="best", monitor=monitor, mode="max", save_top_k=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )  # fmt: skip


def last_checkpoint(dirpath: str | Path) -> ModelCheckpoint:
    """``last.ckpt``, rewritten after every epoch. (Lightning's own ``save_last`` writes it only
    when the monitored checkpoint is also saved, so a run could resume from a stale epoch.)"""
    return ModelCheckpoint(
        dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )


class InterruptCheckpoint(Callback):
    """On SIGTERM (a pre-empted job) or Ctrl+C, write ``last.ckpt`` so that ``resume=true``
    continues from the step where training stopped. Weights that are no longer finite are never
    written: the previous ``last.ckpt`` is kept."""

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            log.warning("interrupted with non-finite weights: %s left as it was", self.path)
            return
        trainer.save_checkpoint(self.path)
        log.warning(
            "interrupted at epoch %d, step %d: wrote %s",
            trainer.current_epoch,
            trainer.global_step,
            self.path,
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint reads and writes for every Trainer of the project.

    Writes go to a temporary file that is renamed into place, so a kill while writing leaves the
    previous checkpoint intact; a failed write (a full disk) removes the temporary file and says
    which file and what to do. Reads (resuming, ``validate(ckpt_path=...)``) are always
    ``weights_only``: a planted checkpoint cannot run code, whatever torch's default is."""

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
