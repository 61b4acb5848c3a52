"""What the console shows (the project's messages, progress bars, real warnings) and what only
``<command>.log`` keeps, with Hydra's ``conf/hydra/job_logging/``; docs/TRAINING.md ("What a run
prints and logs"). A warning the project's own code triggers is fixed at its cause instead."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")

# Warnings raised inside third-party code that a user of this project cannot act on.
NOT_APPLICABLE = {
    # Lightning's own pytree helper calls torch's deprecated LeafSpec check on every batch
    # transfer; nothing the project (or its user) calls.
    "LeafSpec": re.compile(r"isinstance\(treespec, LeafSpec\)` is deprecated"),
    # a resume's checkpoints are where ModelCheckpoint looks; a folder holding another run is
    # refused before (app/rundir.py)
    "resume": re.compile(r"Checkpoint directory .* exists and is not empty"),
}


class NoAdvertisements(logging.Filter):
    """Drops Lightning's tips advertising its cloud services, from the console and the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


# What :func:`say` prints is also logged under this name, for the log file only.
PRINTED = "fcn_lightning.printed"
PACKAGE = Path(__file__).resolve().parents[1]  # the whole package
_other_format = warnings.formatwarning  # the form other warnings keep (Lightning sets its own)


def on_terminal() -> bool:
    """Whether stderr is a terminal: progress bars are drawn there only (never into a log)."""
    return sys.stderr.isatty()


def say(text: str) -> None:
    """Print ``text`` as it is, and log it for the run's log file (not again on the console)."""
    print(text)
    logging.getLogger(PRINTED).info(text)


class NotPrinted(logging.Filter):
    """For a console handler: leaves out what :func:`say` has printed already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != PRINTED


def format_warning(message, category, filename, lineno, line=None) -> str:
    """``warning: <message>`` for the project's warnings; others keep Python's form."""
    try:
        ours = Path(filename).resolve().is_relative_to(PACKAGE)
    except (OSError, ValueError):
        ours = False
    if ours:
        return f"warning: {message}\n"
    return _other_format(message, category, filename, lineno, line)


class ConsoleFilter(logging.Filter):
    """Keeps Lightning's information and :data:`NOT_APPLICABLE` warnings off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        lightning = record.name.split(".")[0] in LIGHTNING
        if record.name == PRINTED or (lightning and record.levelno < logging.WARNING):
            return False
        if record.name == "py.warnings":
            message = record.getMessage()
            return not any(p.search(message) for p in NOT_APPLICABLE.values())
        return True


class BelowWarning(logging.Filter):
    """Information only: the console's stdout handler; warnings and errors go to stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def route_third_party_logs() -> None:
    """Send Lightning's records (without its own console handler) and Python's warnings to the
    root logger's handlers; nothing without them (outside a command, e.g. in a notebook)."""
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, NoAdvertisements) for f in rank_zero.filters):
        rank_zero.addFilter(NoAdvertisements())
    global _other_format
    if warnings.formatwarning is not format_warning:
        _other_format = warnings.formatwarning
        warnings.formatwarning = format_warning
    logging.captureWarnings(True)
