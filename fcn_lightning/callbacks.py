"""Checkpointing: the best checkpoint by val mIoU and the last one, each in its own file."""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint


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
