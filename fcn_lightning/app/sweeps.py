"""Sweeps (``-m``, Optuna included): a failing job is marked failed and the sweep goes on;
Ctrl+C or SIGTERM stops it all; the summary at its root and the exit status: docs/TRAINING.md,
"Several GPUs, SLURM, sweeps"."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..errors import RunFolderError, UserError
from ..reports import long_form
from . import rundir
from .common import as_command
from .train import RunInterrupted, is_multirun, train

log = logging.getLogger("fcn_lightning")

NO_METRICS = "no metrics.json: the job died before finishing a stage"
STILL_RUNNING = "run.json still says running: the job ended without recording how (killed?)"
STALE_METRICS = (
    "no run.json, and metrics.json is older than the job (an earlier run's): the job stopped "
    "before it could use its folder (see the job's log)"
)
FAIL_WHEN = ("any", "all", "never")
# sweepers told of a failed job by an exception (a NaN breaks them; Optuna records a FAIL)
RAISE_TO = ("optuna",)
STOPPED = (KeyboardInterrupt, SIGTERMException, RunInterrupted)  # Ctrl+C, SIGTERM


class SweepJobFailed(RuntimeError):
    """A sweep job failed (raised to the sweepers of :data:`RAISE_TO`)."""


def job_folders(root: Path) -> list[Path]:
    """The job folders (numbered, holding ``.hydra/`` or ``run.json``) in numeric order."""
    jobs = [p for p in Path(root).glob("*") if p.is_dir() and p.name.isdigit()]
    jobs = [p for p in jobs if (p / ".hydra").is_dir() or (p / "run.json").exists()]
    return sorted(jobs, key=lambda p: int(p.name))


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object in ``path``, or None and what is wrong with it (None: no file)."""
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{path.name} is unreadable ({err})"
    if isinstance(data, dict):
        return data, None
    return None, f"{path.name} is unreadable (it holds a {type(data).__name__})"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def read_job(folder: Path) -> dict[str, Any]:
    """One job's entry: ``job``, ``overrides``, ``metrics``, ``status``, ``reason``."""
    folder = Path(folder)
    metrics, metrics_problem = _read(folder / "metrics.json")
    record, record_problem = _read(folder / "run.json")
    said = (record or {}).get("status")
    status, reason = "finished", None  # metrics, and a finished (or no, or unreadable) record
    if said in ("failed", "interrupted"):
        status, reason = said, str(record.get("reason") or "run.json gives no reason")
    elif said == "running":
        status, reason = "failed", STILL_RUNNING
    elif metrics is None:
        status, reason = "failed", metrics_problem or NO_METRICS
        if said is not None:
            reason = f"run.json says {said}, but {metrics_problem or 'there is no metrics.json'}"
        reason += f"; {record_problem}" if record_problem else ""
    elif record is None and _mtime(folder / "metrics.json") < _mtime(folder / ".hydra/config.yaml"):
        status, reason, metrics = "failed", STALE_METRICS, None  # an earlier run's metrics
    try:
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        overrides = []
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    return {"job": folder.name, "overrides": overrides, "metrics": metrics or {},
            "status": status, "reason": reason}  # fmt: skip


def format_summary(jobs: list[dict[str, Any]]) -> list[str]:
    """summary.txt's lines: a row per finished stage of each job, a FAILED (or INTERRUPTED) row
    with the reason's first line for each job that did not finish; only the swept settings."""
    common = set.intersection(*(set(j["overrides"]) for j in jobs)) if len(jobs) > 1 else set()
    lines = [f"{'job':<5}{'stage':<14}{'mIoU %':>8}{'pix acc':>9}  swept settings"]
    for job in jobs:
        varied = " ".join(o for o in job["overrides"] if o not in common)
        for stage, block in job["metrics"].items():
            try:
                m = next(iter(long_form(block).values()))
                row = f"{100 * m['mIoU']:>8.1f}{100 * m['pixel_acc']:>9.1f}"
            except (TypeError, KeyError, AttributeError, StopIteration):
                row = f"{'?':>8}{'?':>9}"
            lines.append(f"{job['job']:<5}{stage:<14}{row}  {varied}")
        if job["status"] != "finished":
            why = (job["reason"] or "").strip().split("\n")[0]
            why = why if len(why) <= 120 else why[:117] + "..."
            lines.append(f"{job['job']:<5}{job['status'].upper():<14}{'-':>8}{'-':>9}  "
                         f"{varied}{'  ' if varied else ''}({why})")  # fmt: skip
    return lines


def outcome(jobs: list[dict[str, Any]]) -> str:
    """A line saying how many of the jobs failed."""
    bad = [j for j in jobs if j["status"] != "finished"]
    if not bad:
        return f"all {len(jobs)} jobs finished"
    interrupted = sum(j["status"] == "interrupted" for j in bad)
    return (
        f"{len(bad) - interrupted} of {len(jobs)} jobs failed"
        + (f", {interrupted} interrupted" if interrupted else "")
        + f" (job{'s' if len(bad) > 1 else ''} {', '.join(j['job'] for j in bad)})"
    )


class SweepSummary(Callback):
    """Hydra callback: writes the summary when a sweep ends. ``fail_when``: ``any`` (grid sweeps)
    exits non-zero when a job did not finish, ``all`` (``hparams_search=optuna``) only when none
    finished, or ``never``. ``SweepSummary.current``: the sweep this process launched, if any."""

    current: ClassVar[SweepSummary | None] = None

    def __init__(self, fail_when: str = "any") -> None:
        if fail_when not in FAIL_WHEN:
            raise ValueError(f"fail_when must be one of {FAIL_WHEN}, got {fail_when!r}")
        self.fail_when, self.root, self.started = fail_when, None, None
        self.jobs: list[dict[str, Any]] | None = None  # set once the summary is written

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.root, self.jobs, self.started = Path(config.hydra.sweep.dir), None, time.time()
        SweepSummary.current = self

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.summarize()

    def jobs_started(self) -> bool:
        """Whether Hydra wrote a job's config since the sweep began (not a refused sweep)."""
        since = (self.started or float("inf")) - 2  # coarse file-system clocks
        return self.root is not None and any(
            max(_mtime(p / ".hydra" / "config.yaml"), _mtime(p / "run.json")) >= since
            for p in job_folders(self.root)
        )

    def summarize(self) -> list[dict[str, Any]]:
        """Write ``summary.json`` and ``summary.txt``, print the table and the outcome."""
        assert self.root is not None, "no sweep started"
        self.jobs = [read_job(folder) for folder in job_folders(self.root)]
        if not self.jobs:
            log.warning("sweep summary: no job folder under %s", self.root)
            return self.jobs
        lines, table = format_summary(self.jobs), self.root / "summary.txt"
        (self.root / "summary.json").write_text(json.dumps(self.jobs, indent=2) + "\n")
        table.write_text("\n".join(lines) + "\n")
        print(f"\nSweep summary ({table}):", *lines, outcome(self.jobs), sep="\n")
        return self.jobs

    def exit_message(self) -> str | None:
        """Why the sweep's process should exit non-zero (None: it should not)."""
        failed = [j for j in self.jobs or [] if j["status"] != "finished"]
        if not failed or self.fail_when == "never":
            return None
        if len(failed) == len(self.jobs):
            return f"every job of the sweep failed: see {self.root / 'summary.txt'}"
        if self.fail_when == "any":
            return f"sweep: {outcome(self.jobs)}: see {self.root / 'summary.txt'}"
        return None


_interrupted = False  # a job of this process was interrupted: the sweep stops, unsummarised


def train_job(cfg: DictConfig) -> float:
    """train.py's task: ``train`` for a single run, :func:`sweep_job` for a job of a sweep, as a
    command (an interruption, the only error a job lets through, ends the sweep as SystemExit)."""
    return as_command(sweep_job if is_multirun() else train, cfg)


def sweep_job(cfg: DictConfig) -> float:
    """One job of a sweep: a failure is recorded and logged, and NaN is returned (or, to the
    sweepers of :data:`RAISE_TO`, :class:`SweepJobFailed` raised) so that the sweep goes on."""
    global _interrupted
    out, job = Path(cfg.paths.output_dir), HydraConfig.get().job.get("num", "?")
    try:
        return train(cfg)
    except (Exception, KeyboardInterrupt) as err:
        if _is_interruption(err):
            _interrupted = True
            raise
        reason = f"{type(err).__name__}: {err}"
        # a bug's traceback is worth keeping; a setting's or the pipeline's message says it all
        expected = isinstance(err, (UserError, ValueError, OSError))
        log.error("job %s failed (the sweep goes on): %s", job, reason, exc_info=not expected)
    try:  # failed before claiming its folder: mark it, unless it holds a record or a run's files
        if rundir.read_record(out) is None and not rundir.holds_run(out):
            rundir.mark(out, "failed", reason)
    except (RunFolderError, OSError) as err:
        log.warning("could not record the failure in %s: %s", out, err)
    if any(name in str(HydraConfig.get().sweeper.get("_target_", "")).lower() for name in RAISE_TO):
        raise SweepJobFailed(f"job {job} failed: {reason}")
    return float("nan")


def _is_interruption(err: BaseException | None) -> bool:
    """Ctrl+C or SIGTERM: the training run's RunInterrupted, or an error caused by one of them."""
    while err is not None and not isinstance(err, STOPPED):
        err = err.__cause__ or err.__context__
    return err is not None


def run_with_sweep_status(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function, then exit with the sweep's status (after its summary)."""
    try:
        main()
    except SystemExit as stop:  # Hydra's own exit: did the sweeper fail after its jobs ran?
        sweep = SweepSummary.current
        ran = sweep is not None and sweep.jobs is None and sweep.jobs_started()
        if stop.code not in (0, None) and not _interrupted and ran:
            jobs = sweep.summarize()
            if jobs and all(j["status"] != "finished" for j in jobs):
                n, table = len(jobs), sweep.root / "summary.txt"
                print(
                    f"every job of the sweep failed ({n} of {n}): nothing to compare (an Optuna "
                    f"study has no best trial: the error above). See {table}",
                    file=sys.stderr,
                )
        raise
    if SweepSummary.current is not None and (message := SweepSummary.current.exit_message()):
        sys.exit(message)
