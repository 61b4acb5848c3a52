"""Sweeps (``-m``, Optuna included): a failing job is marked failed and the sweep goes on;
Ctrl+C or SIGTERM stops it all; the summary at its root (the best job, or a tie) and the exit
status; job folders named by what the sweep varies (``3_arch=fcn16s,optimizer.lr=0.001``); an
Optuna search kept to the keys that act on the run: docs/TRAINING.md, "Several GPUs, SLURM,
sweeps"."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..errors import ConfigError, RunFolderError, UserError
from ..reports import headline, long_form
from . import rundir
from .common import as_command, message_of
from .stages import CHAIN, entry_of, stages_for
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


LEDGER = "jobs.jsonl"  # at the sweep's root: a line when Hydra starts a job, one when it returns
MAX_NAME = 120  # a job folder's name, cut beyond (the job number first keeps names unique)
JOB_NAME = re.compile(r"(\d+)(_.*)?", re.S)
EXCLUDE = "hydra.job.config.override_dirname.exclude_keys"


def job_dir(num: Any, overrides: str) -> str:
    """A sweep job's folder name (the resolver ``fcn.job_dir``): ``<num>_<overrides>``, the
    overrides as ``hydra.job.override_dirname`` writes them, ``/`` made ``_`` (no sub-folders),
    cut to :data:`MAX_NAME` characters."""
    name = f"{num}_{overrides}".replace("/", "_").replace("\\", "_") if overrides else str(num)
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 3] + "..."


OmegaConf.register_new_resolver("fcn.job_dir", job_dir, replace=True)


def task_overrides(config: DictConfig) -> list[str]:
    """The sweep's overrides as typed (``${hydra:job.num}`` left for each job to resolve)."""
    return list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))


def name_jobs_by_what_varies(config: DictConfig) -> None:
    """Leave out of the job folders' names the overrides every job of the sweep shares (not
    swept, not in ``hydra.sweeper.params``): they join ``exclude_keys``, for each job."""
    parsed = OverridesParser.create().parse_overrides(task_overrides(config))
    swept = set(config.hydra.sweeper.get("params") or {})
    fixed = {o.key_or_group for o in parsed if not o.is_sweep_override()} - swept
    keys = [*OmegaConf.select(config, EXCLUDE, default=[]), *sorted(fixed)]
    quoted = ",".join("'" + k.replace("\\", "\\\\").replace("'", "\\'") + "'" for k in keys)
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.overrides.hydra.append(f"{EXCLUDE}=[{quoted}]")
        OmegaConf.update(config, EXCLUDE, keys)


class OptunaScope(Callback):
    """Hydra callback (``hparams_search=optuna``): before the sweeper starts, drops from
    ``hydra.sweeper.params`` the ``stages.*`` keys that do nothing in the stages the run trains,
    saying so in one line; nothing left to search: refused."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = config.hydra.sweeper.get("params") or {}
        try:
            idle, why = idle_params(config, list(params))
        except ConfigError as err:
            raise SystemExit(f"Error: {err}") from None
        if idle:
            print(f"optuna: not searching {', '.join(idle)}: {why}")
            with read_write(config.hydra), open_dict(config.hydra):
                for key in idle:
                    del config.hydra.sweeper.params[key]


SHAPE = ("arch", "arch.name", "staged", "arch.init_from", "arch.init_streams")  # which stages


def idle_params(cfg: DictConfig, params: list[str]) -> tuple[list[str], str]:
    """The ``params`` that act on no stage the run trains (``stages.<stage>.*`` of a stage it
    does not train, a ``lr_factor`` cut it never makes) and why; none where the search (or the
    sweep) varies what decides the stages. :class:`ConfigError` where no param is left."""
    task = OverridesParser.create().parse_overrides(task_overrides(cfg))
    varied = set(params) | {o.key_or_group for o in task if o.is_sweep_override()}
    if varied & set(SHAPE):
        return [], ""
    trained = stages_for(cfg)
    cuts = {"fusion"} if cfg.arch.get("init_streams") else set()
    for i, stage in enumerate(trained):  # the cuts into a stage entered from weights it trained
        if entry_of(cfg, i) not in ("pretrained", "scratch") and stage in CHAIN:
            cuts |= set(CHAIN[1 : CHAIN.index(stage) + 1])
    idle = []
    for key in params:
        head, stage, setting = [*key.split(".", 2), "", ""][:3]
        acts = stage in cuts if setting == "lr_factor" else stage in trained
        if head == "stages" and stage and not acts:
            idle.append(key)
    arch = cfg.arch.name
    if len(trained) > 1:
        why = f"arch={arch} trains {', '.join(trained)}"
    elif cfg.arch.get("init_from") or cfg.arch.get("init_streams"):
        start = "arch.init_from" if cfg.arch.get("init_from") else "arch.init_streams"
        why = f"arch={arch} trains one stage, from {start}"
    else:
        why = f"arch={arch}{'' if cfg.staged else ' staged=false'} trains one stage"
    if idle and len(idle) == len(params):
        raise ConfigError(
            f"hparams_search=optuna: nothing left to search: {', '.join(idle)} do nothing ({why}); "
            "search other keys (hydra.sweeper.params) or train more stages"
        )
    return idle, why


class SweepJobFailed(RuntimeError):
    """A sweep job failed (raised to the sweepers of :data:`RAISE_TO`)."""


def job_folders(root: Path) -> list[Path]:
    """The job folders (``<num>`` or ``<num>_<overrides>``, holding ``.hydra/`` or ``run.json``)
    in numeric order."""
    jobs = [p for p in Path(root).glob("*") if p.is_dir() and JOB_NAME.fullmatch(p.name)]
    jobs = [p for p in jobs if (p / ".hydra").is_dir() or (p / "run.json").exists()]
    return sorted(jobs, key=job_number)


def add_to_ledger(config: DictConfig, **entry: Any) -> None:
    """A line in the sweep's :data:`LEDGER` about the job ``config`` is of (any launcher: each
    job's process appends its own lines)."""
    line = {"job": str(config.hydra.job.num), "folder": config.hydra.runtime.output_dir, **entry}
    with open(Path(config.hydra.sweep.dir) / LEDGER, "a") as f:
        f.write(json.dumps(line) + "\n")


def read_ledger(root: Path) -> list[dict[str, Any]] | None:
    """Each job Hydra started, by number (its last start, and how it returned if it did); None
    where the sweep has no ledger."""
    try:
        lines = (Path(root) / LEDGER).read_text().splitlines()
    except OSError:
        return None
    jobs: dict[str, dict[str, Any]] = {}
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            entry = json.loads(line)
            num = str(entry["job"])
            jobs[num] = entry if "started" in entry else {**jobs.get(num, {}), **entry}
    return [jobs[n] for n in sorted(jobs, key=lambda n: (len(n), n))]


def ledger_job(entry: dict[str, Any]) -> dict[str, Any]:
    """A job's summary entry: its folder's (:func:`read_job`), unless Hydra's return says the
    job failed, which a folder may not show (another job's folder, a refusal before claiming)."""
    job = {
        **read_job(Path(entry.get("folder") or "")),
        "job": entry["job"],
        "folder": entry.get("folder"),
    }
    if isinstance(entry.get("overrides"), list):  # its own, where jobs share a folder
        job["overrides"] = [str(o) for o in entry["overrides"]]
    if entry.get("returned") == "failed" and job["status"] != "interrupted":
        if job["status"] == "finished":  # the folder's record is another job's
            job["metrics"] = {}
        job["status"], job["reason"] = "failed", entry.get("reason") or job["reason"] or "failed"
    return job


def job_number(folder: Path) -> int:
    """A job folder's number, the start of its name."""
    return int(JOB_NAME.fullmatch(Path(folder).name).group(1))


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
    number = JOB_NAME.fullmatch(folder.name)
    return {"job": number.group(1) if number else folder.name, "overrides": overrides, "metrics": metrics or {},
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


def best(jobs: list[dict[str, Any]]) -> str | None:
    """The line naming the finished job with the highest val mIoU (its last stage's), or the
    jobs that share it as written (3 decimals, the table's 0.1 %): a tie. None: none finished."""
    scores = {}
    for job in jobs:
        with contextlib.suppress(TypeError, KeyError, AttributeError, ValueError, IndexError):
            if job["status"] == "finished":
                scores[job["job"]] = f"{headline(list(job['metrics'].values())[-1]):.3f}"
    if not scores:
        return None
    top = max(scores.values(), key=float)
    tied = [job for job, score in scores.items() if score == top]
    if len(tied) > 1:
        return f"tie between jobs {', '.join(tied)} (val mIoU {top})"
    return f"best: job {tied[0]} (val mIoU {top})"


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
        if "overrides" in config.hydra:
            name_jobs_by_what_varies(config)
        SweepSummary.current = self

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.summarize()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            add_to_ledger(config, started=time.time(), overrides=task_overrides(config))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        global _failure
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        value, reason, _failure = job_return._return_value, _failure, None
        if job_return.status == JobStatus.FAILED:
            reason = reason or f"{type(value).__name__}: {value}"
        elif not (isinstance(value, float) and math.isnan(value)):
            reason = None
        add_to_ledger(config, returned="failed" if reason else "finished", reason=reason)

    def jobs_started(self) -> bool:
        """Whether Hydra started a job since the sweep began (not a refused sweep)."""
        since = (self.started or float("inf")) - 2  # coarse file-system clocks
        if self.root is None:
            return False
        if (ledger := read_ledger(self.root)) is not None:
            return any(float(job.get("started", 0)) >= since for job in ledger)
        return any(  # a sweep without a ledger: Hydra wrote a job's config since it began
            max(_mtime(p / ".hydra" / "config.yaml"), _mtime(p / "run.json")) >= since
            for p in job_folders(self.root)
        )

    def summarize(self) -> list[dict[str, Any]]:
        """Write ``summary.json`` and ``summary.txt``, print the table and the outcome."""
        assert self.root is not None, "no sweep started"
        ledger = read_ledger(self.root)
        if ledger is None:  # a sweep without one: its job folders, by name
            self.jobs = [read_job(folder) for folder in job_folders(self.root)]
        else:
            self.jobs = [ledger_job(entry) for entry in ledger]
        if not self.jobs:
            log.warning("sweep summary: no job folder under %s", self.root)
            return self.jobs
        lines, table = format_summary(self.jobs), self.root / "summary.txt"
        lines += [line] if (line := best(self.jobs)) else []
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
_failure: str | None = None  # why this process's job failed, for the ledger (on_job_end)


def train_job(cfg: DictConfig) -> float:
    """train.py's task: ``train`` for a single run, :func:`sweep_job` for a job of a sweep, as a
    command (an interruption, the only error a job lets through, ends the sweep as SystemExit)."""
    return as_command(sweep_job if is_multirun() else train, cfg)


def sweep_job(cfg: DictConfig) -> float:
    """One job of a sweep: a failure is recorded and logged, and NaN is returned (or, to the
    sweepers of :data:`RAISE_TO`, :class:`SweepJobFailed` raised) so that the sweep goes on."""
    global _interrupted, _failure
    out, job = Path(cfg.paths.output_dir), HydraConfig.get().job.get("num", "?")
    try:
        return train(cfg)
    except (Exception, KeyboardInterrupt) as err:
        if _is_interruption(err):
            _interrupted = True
            raise
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        reason = _failure = f"{type(cause).__name__}: {message_of(cause)}"
        # a bug's traceback is worth keeping; a setting's or the pipeline's message says it all
        expected = isinstance(cause, (UserError, ValueError, OSError))
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
