"""What the commands share: exit statuses, the configs' ``fcn.on_gpu`` resolver, the DataModule,
a checkpoint loaded, shift-and-stitch, the label check's block, and loggers kept quiet while a
library works."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from tqdm import tqdm

from ..data.base import SegmentationDataModule
from ..errors import CheckpointError, ConfigError, DataError, RunInterrupted, user_errors
from ..models.stitch import SETTING, ShiftAndStitch, check_factor, with_shift_and_stitch
from ..module import FCNModule, load_checkpoint
from ..prepare.datasets import download
from . import console
from .console import say

# error type -> exit status, first match wins; anything else keeps its traceback
EXIT_STATUS: list[tuple[type[BaseException], int]] = [(t, 1) for t in user_errors()]
INTERRUPTED = 130  # Ctrl+C (128 + SIGINT); SIGTERM: 143. What the commands write is atomic


def exit_status(err: BaseException) -> int | None:
    return next((status for kind, status in EXIT_STATUS if isinstance(err, kind)), None)


def message_of(err: BaseException) -> str:
    """An error's message; one raised in a DataLoader worker without the worker's traceback
    that torch puts in front of it (the last line, the error itself)."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def as_command(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """``fn(cfg)`` for an entry point: a typed error prints ``Error: <message>`` and exits with
    :data:`EXIT_STATUS`; Ctrl+C exits 130, an interrupted run 128 + its signal (SIGTERM: 143)."""
    try:
        return fn(cfg)
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except RunInterrupted as err:  # says how to continue
        print(err, file=sys.stderr)
        raise SystemExit(128 + err.signal) from None
    except MissingMandatoryValue as err:  # a ??? key of the config: ckpt_path, input, ...
        print(f"Error: {err.full_key} is not set: pass {err.full_key}=...", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:
        setting = isinstance(err, InstantiationException) and isinstance(err.__cause__, ValueError)
        err = err.__cause__ if setting else err  # a setting refused by the class a config names
        status = 1 if setting else exit_status(err)
        if status is None:
            raise
        print(f"Error: {message_of(err)}", file=sys.stderr)
        raise SystemExit(status) from None


def on_gpu(accelerator: str, gpu: Any, cpu: Any) -> Any:
    """``${fcn.on_gpu:${trainer.accelerator},A,B}`` in a config: A where the trainer runs on a GPU
    (``auto`` with one present, or ``gpu``, ``cuda``, ``mps``), B on the CPU."""
    if accelerator == "auto":
        return gpu if torch.cuda.is_available() or torch.backends.mps.is_available() else cpu
    return cpu if accelerator == "cpu" else gpu


OmegaConf.register_new_resolver("fcn.on_gpu", on_gpu, replace=True)  # conf/*/folder.yaml


def make_datamodule(data_cfg: Mapping[str, Any], **override: Any) -> SegmentationDataModule:
    """The DataModule of a ``data`` node (composed, or a checkpoint's record of one)."""
    if isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    cfg = {**data_cfg, **override}
    if cfg.get("download") is True:  # data.download=true: the prepare command's code
        cfg["download"] = download
    if cfg.get("root") == "???":
        raise ConfigError("data.root is not set: pass data.root=/path/to/the/dataset")
    return instantiate(cfg, _convert_="all")


def load_module(path: Any, **overrides: Any) -> FCNModule:
    if not path:
        raise ConfigError("ckpt_path is not set: pass ckpt_path=/path/to/best.ckpt")
    try:
        return load_checkpoint(path, **overrides).eval()
    except (FileNotFoundError, CheckpointError) as err:
        raise ConfigError(f"ckpt_path: {err}") from None


MANY_FORWARDS = 16  # shift-and-stitch forwards per image from which a bar shows their progress


class StitchBar:
    """Shift-and-stitch's ``progress``: a bar with an ETA on stderr over one batch's forwards,
    gone when they are done (Lightning's own bar counts the batches)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None or done == 1:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, desc=f"{SETTING} forwards", unit="forward",
                            file=sys.stderr, leave=False, dynamic_ncols=True)  # fmt: skip
        self.bar.update(1)
        if done >= total:
            self.bar.close()
            self.bar = None


def show_stitch_progress(module: FCNModule) -> None:
    """Give a shift-and-stitched model (:func:`use_shift_and_stitch`) a :class:`StitchBar` where
    it runs :data:`MANY_FORWARDS` or more forwards per image and stderr is a terminal."""
    net = module.model
    if isinstance(net, ShiftAndStitch) and net.forwards >= MANY_FORWARDS and console.on_terminal():
        net.progress = StitchBar()


def use_shift_and_stitch(module: FCNModule, cfg: DictConfig) -> int:
    """Put shift-and-stitch (``cfg.shift_stitch``, 1: off) in place; return the factor."""
    try:
        shifts = check_factor(cfg.get(SETTING, 1), module.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    module.model = with_shift_and_stitch(module.model, shifts)
    if shifts > 1:
        say(f"{SETTING}={shifts}: shift-and-stitch, {shifts * shifts} forwards per image")
        show_stitch_progress(module)
    return shifts


def label_report(dm: SegmentationDataModule, splits: list[str] | None = None) -> str:
    """The label check's block (its warnings in it, not again); one-class training labels fail."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="label check: ")
        report = dm.check_labels(splits)
    for key, split in report.splits.items():
        present = [n for n, c in zip(split.class_names, split.histogram, strict=True) if c > 0]
        if split.split == dm.train_split and splits is None and len(present) <= 1:
            hint = " Masks saved as 0/255 (object = 255 = ignore)? set data.label_map={255: 1}."
            raise DataError(
                f"the training split '{key}' holds only class {present or 'none'} "
                f"({100 * split.ignored_share:.1f}% of its pixels ignored): there is nothing to "
                f"learn, and every score would read 100%.{hint * bool(split.ignored)}\n"
                + report.format()
            )
    return report.format()


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """The named loggers at WARNING while inside (the exporter's steps, Lightning's notes)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
