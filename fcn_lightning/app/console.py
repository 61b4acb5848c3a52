"""What the console shows: the project's own messages, progress bars and real warnings.

The commands (train, eval, predict, export) run under Hydra, whose job logging
(``conf/hydra/job_logging/quiet.yaml``) writes to the console, filtered by
:class:`ConsoleFilter` (information on stdout, warnings and errors on stderr), and to the run
folder's ``<command>.log``, which keeps every record.
:func:`route_third_party_logs` sends Lightning's messages and Python's warnings through those
handlers (Lightning otherwise prints on a handler of its own, and warnings go straight to
stderr), so that nothing is lost: what the console leaves out is in the log file, and
``hydra/job_logging=verbose`` prints it all.

Left out of the console:

- Lightning's informational lines (accelerator found, "Restoring states from...", the seed):
  the project says what it runs in its own words; its tips advertising its cloud services are
  dropped from the log file too;
- third-party warnings that do not apply to this project (:data:`NOT_APPLICABLE`), each with
  the reason. A warning the project's own code triggers is fixed at its cause instead.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

# Loggers of Lightning: their records below WARNING stay off the console.
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")

# Warnings raised inside third-party code that a user of this project cannot act on.
NOT_APPLICABLE = {
    # Lightning's own pytree helper calls torch's deprecated LeafSpec check on every batch
    # transfer; nothing the project (or its user) calls.
    "LeafSpec": re.compile(r"isinstance\(treespec, LeafSpec\)` is deprecated"),
}


class NoAdvertisements(logging.Filter):
    """Drops Lightning's tips that advertise its cloud services (litlogger, litmodels), from the
    console and the log file alike: they say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


# What :func:`say` prints is also logged under this name, for the log file only.
PRINTED = "fcn_lightning.printed"
PACKAGE = Path(__file__).resolve().parents[1]  # the whole package
_other_format = warnings.formatwarning  # the form other warnings keep (Lightning sets its own)


def say(text: str) -> None:
    """Print ``text`` (a block: the label check, a results table) as it is, and write it to the
    run's log file too (its console handlers leave this record out: it is printed already)."""
    print(text)
    logging.getLogger(PRINTED).info(text)


class NotPrinted(logging.Filter):
    """For a console handler: leaves out what :func:`say` has printed already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != PRINTED


def format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning the project raises reads ``warning: <message>`` (its message names the file
    or setting); others keep Python's form, with the file and line that raised them."""
    try:
        ours = Path(filename).resolve().is_relative_to(PACKAGE)
    except (OSError, ValueError):
        ours = False
    if ours:
        return f"warning: {message}\n"
    return _other_format(message, category, filename, lineno, line)


def _is_lightning(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in LIGHTNING)


class ConsoleFilter(logging.Filter):
    """Keeps a record off the console when it is Lightning's information or a warning of
    :data:`NOT_APPLICABLE`; every record still reaches the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == PRINTED or (
            _is_lightning(record.name) and record.levelno < logging.WARNING
        ):
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
    """Send Lightning's log records and Python's warnings to the root logger's handlers (the
    console, filtered, and the run's log file). Lightning installs a console handler of its
    own when it is imported before logging is configured; that one is removed. Does nothing
    when the root logger has no handlers (outside a command, e.g. in a notebook)."""
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
