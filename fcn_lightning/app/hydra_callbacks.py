"""Hydra callback: a summary of every job of a multirun sweep, at the sweep's root.

``SweepSummary`` writes ``<sweep dir>/summary.json`` and ``summary.txt`` when the sweep ends. A
job is a numbered folder of the sweep dir holding ``.hydra/`` or ``run.json`` (jobs in numeric
order: 10 after 9); each is listed, the failed ones too, with its overrides, the val metrics of
its finished stages (``metrics.json``), its ``status`` (``finished``, ``failed``,
``interrupted``) and the ``reason`` (from the job's ``run.json``; a job without either file died
before finishing a stage).

Exit status (decided by ``fail_when``, applied by ``train.py`` after the summary is written and
every job has run): ``any`` (the default, grid sweeps): non-zero when any job did not finish,
so that scripts notice; ``all`` (``hparams_search=optuna``): non-zero only when no job finished,
since a study whose best trial exists did its work and diverging trials are an expected
outcome of a search; ``never``: always zero.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..reports import long_form

log = logging.getLogger("fcn_lightning")

NO_METRICS = "no metrics.json: the job died before finishing a stage"
STILL_RUNNING = "run.json still says running: the job ended without recording how (killed?)"
STALE_METRICS = (
    "no run.json, and metrics.json is older than the job (an earlier run's): the job stopped "
    "before it could use its folder (see the job's log)"
)
FAIL_WHEN = ("any", "all", "never")


class SweepJobFailed(RuntimeError):
    """A sweep job failed; raised (instead of returning NaN) to sweepers that must see failures,
    such as Optuna's, which records the trial as FAIL."""


def job_folders(root: Path) -> list[Path]:
    """The job folders of the sweep at ``root``, in numeric order."""
    root = Path(root)
    if not root.is_dir():
        return []
    jobs = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.isdigit()
        and ((p / ".hydra").is_dir() or (p / "run.json").exists())
    ]
    return sorted(jobs, key=lambda p: int(p.name))


def _overrides(folder: Path) -> list[str]:
    try:
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def _read_dict(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object in ``path``, or None and what is wrong with it (None: no file)."""
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{path.name} is unreadable ({err})"
    if not isinstance(data, dict):
        return None, f"{path.name} is unreadable (it holds a {type(data).__name__})"
    return data, None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def _older(path: Path, than: Path) -> bool:
    return path.exists() and than.exists() and _mtime(path) < _mtime(than)


def read_job(folder: Path) -> dict[str, Any]:
    """One job's entry of the summary: ``job``, ``overrides``, ``metrics``, ``status``,
    ``reason`` (None for a finished job)."""
    folder = Path(folder)
    metrics, metrics_problem = _read_dict(folder / "metrics.json")
    record, record_problem = _read_dict(folder / "run.json")
    said = (record or {}).get("status")
    status, reason = "finished", None  # metrics, and a finished (or no, or an unreadable) record
    if said in ("failed", "interrupted"):
        status, reason = said, str(record.get("reason") or "run.json gives no reason")
    elif said == "running":
        status, reason = "failed", STILL_RUNNING
    elif metrics is None:  # a finished record without readable metrics, or no record at all
        status = "failed"
        if said is None:
            reason = metrics_problem or NO_METRICS
        else:
            reason = f"run.json says {said}, but {metrics_problem or 'there is no metrics.json'}"
        if record_problem:
            reason += f"; {record_problem}"
    elif record is None and _older(folder / "metrics.json", folder / ".hydra" / "config.yaml"):
        # the job stopped before claiming its folder, which held an earlier run's metrics
        status, reason, metrics = "failed", STALE_METRICS, None
    return {
        "job": folder.name,
        "overrides": _overrides(folder),
        "metrics": metrics or {},
        "status": status,
        "reason": reason,
    }


def _short(reason: str, limit: int = 120) -> str:
    line = reason.strip().splitlines()[0] if reason.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def format_summary(jobs: list[dict[str, Any]]) -> list[str]:
    """summary.txt's lines: a row per finished stage of each job, a FAILED (or INTERRUPTED)
    row with a short reason for each job that did not finish."""
    # show only the overrides that differ between jobs: what the sweep varied
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
            lines.append(
                f"{job['job']:<5}{job['status'].upper():<14}{'-':>8}{'-':>9}  {varied}"
                f"{'  ' if varied else ''}({_short(job['reason'] or '')})"
            )
    return lines


def summarize(root: Path) -> list[dict[str, Any]]:
    """Write ``summary.json`` and ``summary.txt`` for the sweep at ``root``, print the table and
    how many jobs failed; return the jobs' entries."""
    root = Path(root)
    jobs = [read_job(folder) for folder in job_folders(root)]
    if not jobs:
        log.warning("sweep summary: no job folder under %s", root)
        return jobs
    (root / "summary.json").write_text(json.dumps(jobs, indent=2) + "\n")
    lines = format_summary(jobs)
    (root / "summary.txt").write_text("\n".join(lines) + "\n")
    print(f"\nSweep summary ({root / 'summary.txt'}):\n" + "\n".join(lines))
    print(outcome(jobs))
    return jobs


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


_current: SweepSummary | None = None


def current_sweep() -> SweepSummary | None:
    """The summary callback of the sweep this process launched (None outside ``-m``)."""
    return _current


class SweepSummary(Callback):
    """Writes ``<sweep dir>/summary.json`` and ``summary.txt`` when a sweep ends (see the module
    docstring); ``fail_when`` (``any`` | ``all`` | ``never``) says when the sweep's process should
    exit non-zero: when any job failed, when every job failed, never."""

    def __init__(self, fail_when: str = "any") -> None:
        if fail_when not in FAIL_WHEN:
            raise ValueError(f"fail_when must be one of {FAIL_WHEN}, got {fail_when!r}")
        self.fail_when = fail_when
        self.root: Path | None = None
        self.started: float | None = None
        self.jobs: list[dict[str, Any]] | None = None  # set once the summary is written

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _current
        self.root, self.jobs, self.started = Path(config.hydra.sweep.dir), None, time.time()
        _current = self

    def jobs_started(self) -> bool:
        """Whether this sweep started a job (Hydra wrote a job's config since the sweep began):
        a sweep refused at its start has nothing of its own to summarise."""
        if self.root is None or self.started is None:
            return False
        since = self.started - 2  # coarse file-system clocks
        return any(
            _mtime(p / ".hydra" / "config.yaml") >= since or _mtime(p / "run.json") >= since
            for p in job_folders(self.root)
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.root = Path(config.hydra.sweep.dir)
        self.summarize()

    def summarize(self) -> list[dict[str, Any]]:
        assert self.root is not None, "no sweep started"
        self.jobs = summarize(self.root)
        return self.jobs

    def exit_message(self) -> str | None:
        """Why the sweep's process should exit non-zero (None: it should not)."""
        if not self.jobs or self.fail_when == "never":
            return None
        failed = [j for j in self.jobs if j["status"] != "finished"]
        if len(failed) == len(self.jobs):
            return f"every job of the sweep failed: see {self.root / 'summary.txt'}"
        if failed and self.fail_when == "any":
            return f"sweep: {outcome(self.jobs)}: see {self.root / 'summary.txt'}"
        return None
