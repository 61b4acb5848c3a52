"""Callbacks that interrupt training at a given step, for the reliability tests (Hydra
instantiates them by name from the test's overrides)."""

from __future__ import annotations

import json
import os
import signal

import torch
from pytorch_lightning.callbacks import Callback


class SigtermAtStep(Callback):
    """Sends this process SIGTERM after the given global step, as a pre-empting scheduler would."""

    def __init__(self, step: int, stage: str | None = None) -> None:
        self.step, self.stage = step, stage

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.stage in (None, pl_module.model.spec.arch):
            os.kill(os.getpid(), signal.SIGTERM)


class PoisonAtStep(Callback):
    """Makes one weight infinite before the given step: the loss turns non-finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("inf"))


class CtrlCAtStep(Callback):
    """Sends this process SIGINT (Ctrl+C in the terminal) after the given global step, ``times``
    times in a row."""

    def __init__(self, step: int, times: int = 1) -> None:
        self.step, self.times = step, times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


class RecordLr(Callback):
    """Appends ``[global step, lr of each parameter group]`` to a JSON-lines file before each
    training step: the lr the optimizer trains that step with."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.global_step, lrs]) + "\n")
