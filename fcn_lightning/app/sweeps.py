"""Sweep jobs that fail without ending the sweep, and the sweep's exit status.

A single run stops with a non-zero exit status when training fails. In a sweep (``-m``, Optuna
included) a job that fails (a non-finite loss, a bad setting, any error) is recorded as failed
in its folder's run.json and the sweep goes on with the next job; Ctrl+C or SIGTERM stops the
whole sweep at once. When the sweep is over, summary.json and summary.txt list every job, and
the exit status is non-zero if any job failed (with ``hparams_search=optuna``: if every trial
failed; see ``hydra_callbacks.SweepSummary``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

from . import hydra_callbacks, rundir
from .common import as_command
from .train import RunInterrupted, is_multirun, train

log = logging.getLogger("fcn_lightning")

# sweepers that must be told a job failed by an exception (a NaN return breaks them): Optuna's
# records the trial as FAIL and, within hydra.sweeper.max_failure_rate, goes on
RAISE_TO = ("optuna",)
_interrupted = False  # a sweep job of this process was interrupted: the sweep stops


def train_job(cfg: DictConfig) -> float:
    """``pipeline.train`` for a single run, :func:`sweep_job` for a job of a sweep."""
    if not is_multirun():
        return as_command(train, cfg)
    return sweep_job(cfg)


def sweep_job(cfg: DictConfig) -> float:
    """One job of a sweep: a failure is recorded and logged, and NaN is returned (or, to the
    sweepers of RAISE_TO, SweepJobFailed raised) so that the sweep goes on."""
    global _interrupted
    out = Path(cfg.paths.output_dir)
    job = HydraConfig.get().job.get("num", "?")
    try:
        return train(cfg)
    except (Exception, SystemExit) as err:
        if _is_interruption(err):
            _interrupted = True
            raise
        reason = str(err.code) if isinstance(err, SystemExit) else f"{type(err).__name__}: {err}"
        # a bug's traceback is worth keeping; a setting's or the pipeline's message says it all
        expected = isinstance(err, (SystemExit, ValueError, OSError))
        log.error("job %s failed (the sweep goes on): %s", job, reason, exc_info=not expected)
    _record_failure(out, reason)
    sweeper = str(HydraConfig.get().sweeper.get("_target_", "")).lower()
    if any(name in sweeper for name in RAISE_TO):
        raise hydra_callbacks.SweepJobFailed(f"job {job} failed: {reason}")
    return float("nan")


def _is_interruption(err: BaseException) -> bool:
    """Ctrl+C or SIGTERM, whichever way it reached here: the pipeline's RunInterrupted, the
    ``sys.exit(1)`` Lightning makes of Ctrl+C, or an error caused by either."""
    if isinstance(err, RunInterrupted) or (
        isinstance(err, SystemExit) and not isinstance(err.code, str)
    ):
        return True
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, (KeyboardInterrupt, SIGTERMException)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _record_failure(out: Path, reason: str) -> None:
    """Mark the job failed in its run.json if the pipeline could not (it failed before claiming
    the folder); never in a folder that holds a record or another run's files."""
    try:
        if rundir.read_record(out) is None and not rundir.run_files(out):
            rundir.mark(out, "failed", reason)
    except (rundir.RunFolderError, OSError) as err:
        log.warning("could not record the failure in %s: %s", out, err)


def run_with_sweep_status(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function, then give the sweep's exit status: non-zero when jobs
    failed (after the summary is written)."""
    try:
        main()
    except SystemExit as stop:
        sweep = hydra_callbacks.current_sweep()
        if (
            stop.code not in (0, None)
            and not _interrupted
            and sweep is not None
            and sweep.jobs is None
            and sweep.jobs_started()
        ):  # the sweeper itself failed after its jobs ran: summarise them anyway
            jobs = sweep.summarize()
            if jobs and all(j["status"] != "finished" for j in jobs):
                print(
                    f"every job of the sweep failed ({len(jobs)} of {len(jobs)}): nothing to "
                    "compare (an Optuna study has no best trial: the error above). See "
                    f"{sweep.root / 'summary.txt'}",
                    file=sys.stderr,
                )
        raise
    sweep = hydra_callbacks.current_sweep()
    message = sweep.exit_message() if sweep is not None else None
    if message:
        sys.exit(message)
