"""The errors that are the user's to fix. Library code raises them; only the command entry
points (``fcn_lightning.app.common.as_command``, the prepare CLI) turn them into a message and an
exit status. Each message names the setting, the file or the expected layout."""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors printed as their message, without a traceback."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work; the message names it."""


class DataError(UserError, ValueError):
    """A dataset on disk does not match what the loader expects; the message names the file."""


class PrepareError(DataError):
    """An archive could not be fetched, verified or extracted; the message says what to do."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class RunFolderError(UserError, ValueError):
    """A run folder that this run may not use; the message says what to do instead."""


class ExportError(UserError, RuntimeError):
    """An exported model that does not run as the checkpoint does; nothing was written."""


class RunInterrupted(UserError):
    """Work stopped by Ctrl+C (``signal`` 2) or SIGTERM (15); the message says how to continue.
    The entry point exits 128 + ``signal``, as a shell reports a process the signal ended."""

    def __init__(self, message: str = "", signal: int = 2) -> None:
        super().__init__(message)
        self.signal = signal


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite; the message names the stage, the epoch and
    step, and the last good checkpoint."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed as their message, without a traceback."""
    return (UserError,)


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """The ImageNet weights could be neither downloaded nor found on disk; the message says
    where to put the file, or how to train without them."""
