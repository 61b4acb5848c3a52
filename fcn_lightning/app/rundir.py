"""One run per folder: ``run.json`` (who made the run, how it went, earlier launches under
``history``), the refusals, the resume check and SLURM requeues (docs/TRAINING.md, "Outputs",
"Resume" and "Several GPUs, SLURM, sweeps")."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ..atomic import write_atomically
from ..errors import RunFolderError

log = logging.getLogger("fcn_lightning")

RECORD = "run.json"
ENV_ID = "FCN_LIGHTNING_RUN_ID"  # the launch's id: DDP workers inherit it from the claim
# what a resume may change; anything else would mix two runs in one folder
RESUME_MAY_CHANGE = (
    "resume", "paths", "data.root", "data.num_workers", "data.pin_memory",
    "data.persistent_workers", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "trainer.max_steps", "trainer.max_epochs", "callbacks", "logger", "images", "perf",
)  # fmt: skip
NEW_FOLDER = "leave out hydra.run.dir (each run gets a new folder)"


def read_record(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path} is unreadable ({err}): move the folder aside") from None
    return record if isinstance(record, dict) else {}


def holds_run(out: str | Path) -> bool:
    """Whether ``out`` holds what a run leaves that is worth keeping: metrics or checkpoints."""
    out = Path(out)
    return (out / "metrics.json").is_file() or any(out.glob("*/checkpoints/*.ckpt"))


def _running_elsewhere(record: dict[str, Any]) -> bool:
    """The record's run may still be running in another process (on another host: assume so)."""
    if record.get("status") != "running":
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (KeyError, ValueError, OSError):
        return True
    return int(record["pid"]) != os.getpid()


def _slurm() -> dict[str, Any] | None:
    job = os.environ.get("SLURM_JOB_ID")  # an array task's own id, kept when it is requeued
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    return {"job_id": job, "restart_count": restarts} if job else None


def launch_id() -> str | None:
    """The id every process of this launch shares, if known yet (a SLURM job's tasks: the job's)."""
    slurm = _slurm()
    if ENV_ID not in os.environ and slurm and os.environ.get("SLURM_NTASKS", "1") != "1":
        return f"slurm-{slurm['job_id']}-{slurm['restart_count']}"
    return os.environ.get(ENV_ID)


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: then -> now`` for each (flattened) key that differs and a resume may not change."""

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix[:-1]: tree}
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}

    then, now = flat(then), flat(now)
    return [
        f"{k}: {then.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
        for k in sorted(set(then) | set(now))
        if then.get(k) != now.get(k)
        and not any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE)
        and not re.fullmatch(r"stages\.\w+\.max_(steps|epochs)", k)  # a stage's budget
    ]


def comparable(config: Any) -> dict[str, Any]:
    """A run's config as run.json keeps it: unresolved, without Hydra's own node."""
    return {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k != "hydra"}


def claim(
    out: str | Path,
    resume: bool,
    *,
    fresh_if_empty: bool = False,
    sweep_job: bool = False,
    config: dict[str, Any] | None = None,
) -> bool:
    """Make ``out`` this run's folder; return whether to resume the run it holds. Refused: a
    folder in use, one holding another run (without ``resume``), one holding nothing (with
    ``resume``, unless ``fresh_if_empty``: a sweep's job that never started), a resume whose
    ``config`` differs from the run's own. ``sweep_job``: the refusals speak of the sweep's
    folders."""
    out, me, record = Path(out).absolute(), launch_id(), read_record(out)
    if record is not None and me is not None and record.get("run_id") == me:
        return bool(record.get("resuming", resume))  # claimed already by this launch
    old, mine, held = record or {}, _slurm(), holds_run(out)
    theirs = old.get("slurm") or {}
    same_job = mine is not None and mine["job_id"] == theirs.get("job_id")
    if same_job and mine["restart_count"] > int(theirs.get("restart_count", 0)):
        log.info("SLURM requeued job %s: resuming its run in %s", mine["job_id"], out)
        resume = True
    elif _running_elsewhere(old):
        raise RunFolderError(
            f"run folder {out} is in use by a running run (pid {old.get('pid')} on "
            f"{old.get('host')}, started {old.get('started')}): {NEW_FOLDER} (if that run is "
            f"dead, delete {out / RECORD})"
        )
    if held and not resume and sweep_job:
        raise RunFolderError(
            "hydra.sweep.subdir gives jobs one folder: keep ${hydra.job.num} in it (this job's "
            f"folder {out} already holds a run, started {old.get('started', '?')}, status "
            f"{old.get('status', '?')})"
        )
    if held and not resume:
        raise RunFolderError(
            f"run folder {out} already holds a run (started {old.get('started', '?')}, status "
            f"{old.get('status', '?')}). Continue it with\n"
            f"  python train.py <its overrides> resume=true hydra.run.dir={out}\n"
            f"or start a new run: {NEW_FOLDER}"
        )
    if resume and not held and record is None and not fresh_if_empty:
        near = [r.parent for r in out.parent.glob(f"*/{RECORD}")]  # the folder's siblings
        near = sorted(near, key=lambda p: (p / RECORD).stat().st_mtime, reverse=True)
        raise RunFolderError(
            f"resume=true, but there is nothing to resume in {out} (no {RECORD}, metrics.json or "
            "checkpoint): point hydra.run.dir at the run to continue, or drop resume=true"
            + "".join(f"\n  a run nearby: {p}" for p in near[:3])
        )
    if resume and not held:
        log.info("resume=true: the run in %s saved nothing yet; it starts from the beginning", out)
    elif resume and config and (changes := differences(old.get("config") or config, config)):
        raise RunFolderError(
            f"resume=true continues the run in {out} with its own settings; these differ:\n  "
            + "\n  ".join(changes[:12])
            + f"\nUse its command (in run.json, .hydra/overrides.yaml), or {NEW_FOLDER}"
        )
    os.environ[ENV_ID] = me or uuid.uuid4().hex
    entry = {
        "run_id": os.environ[ENV_ID], "resuming": resume, "status": "running", "argv": sys.argv,
        "started": _now(), "host": socket.gethostname(), "pid": os.getpid(), "slurm": mine,
        "config": old.get("config", config) if resume else config,
        "history": [*old.pop("history", []), old] if record is not None else [],
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    try:
        if record is None:  # of two runs claiming the folder at once, one creates the file
            with open(out / RECORD, "x") as f:
                f.write(json.dumps(entry, indent=2) + "\n")
        else:
            _write(out, entry)
    except FileExistsError:
        release()
        raise RunFolderError(f"another run claimed {out} a moment ago: {NEW_FOLDER}") from None
    return resume


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def _write(out: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2) + "\n"
    write_atomically(Path(out) / RECORD, lambda f: f.write(text.encode()))


def release() -> None:
    """Forget this process's run id: the next ``claim`` in this process is a new run."""
    os.environ.pop(ENV_ID, None)


def annotate(out: str | Path, **entries: Any) -> None:
    """Add ``entries`` to the run's record (each stage's plan, how it went); one given as None
    is removed."""
    record = entries
    with contextlib.suppress(RunFolderError):  # an unreadable record is replaced
        record = {**(read_record(out) or {}), **entries}
    try:
        _write(out, {k: v for k, v in record.items() if v is not None or k not in entries})
    except OSError as err:  # e.g. a full disk: the run's own error matters more
        log.warning("could not update %s: %s", Path(out) / RECORD, err)


def mark(out: str | Path, status: str, reason: str | None = None, **extra: Any) -> None:
    """Record how the run went (``finished``, ``interrupted``, ``failed`` with the reason)."""
    annotate(out, status=status, ended=_now(), **extra, reason=reason)


def refused(out: str | Path, reason: str) -> None:
    """A run refused before any work: ``failed`` in its record if this launch claimed ``out``
    already (Hydra's callback does)."""
    with contextlib.suppress(RunFolderError):
        if launch_id() is not None and (read_record(out) or {}).get("run_id") == launch_id():
            mark(out, "failed", reason)


def check_folder(path: str | Path, setting: str) -> None:
    """Refuse the folder ``setting`` names where it cannot be made or written in (empty, a file,
    one under a file, a read-only place: tried with a temporary file, as root too) or where it
    lies in a run's folder."""
    if not str(path).strip():
        raise RunFolderError(f"{setting} is empty (an unset variable?): name the folder")
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{setting}={path} is a file, not a folder: name a folder")
    holder = [p for p in [path, *path.parents] if (p / RECORD).is_file()]
    if holder and (holder[0] != path or setting != "hydra.run.dir"):  # its own: claim() decides
        raise RunFolderError(
            f"{setting}={path} lies in the run folder {holder[0]} (it holds {RECORD}): name a "
            "folder outside any run"
        )
    made = next(p for p in [path, *path.parents] if p.exists() or p == p.parent)
    if not made.is_dir():
        raise RunFolderError(f"{setting}={path} lies under {made}, which is a file: name a folder")
    try:
        tempfile.TemporaryFile(dir=made).close()
    except OSError as err:
        raise RunFolderError(
            f"{setting}={path}: cannot write in {made} ({err.strerror}): name a folder you can "
            "write to"
        ) from None


def is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


class RunFolderGuard(Callback):
    """Hydra callback: claims the run folder before Hydra writes ``.hydra/`` (a resume's command
    goes to ``.hydra/resume-<n>/``); refuses a sweep folder holding another sweep, or a resumed
    sweep of other values. Hydra turns a callback's exceptions into warnings: a refusal exits."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "resume" not in config or (not is_rank_zero() and launch_id()):
            return  # not a training run, or a worker of a claimed one
        out = Path(config.hydra.run.dir)
        try:
            check_folder(config.hydra.run.dir, "hydra.run.dir")
            resume = claim(out, bool(config.resume), config=comparable(config))
        except RunFolderError as err:
            raise SystemExit(f"Error: {err}") from None
        except OSError as err:  # Hydra would make a callback's error a warning, and go on
            raise SystemExit(f"Error: hydra.run.dir={out}: {err}") from None
        sub = config.hydra.output_subdir
        if resume and sub is not None and (out / sub).is_dir():  # keep how the run was made
            n = 1 + len(list(out.glob(f"{sub}/resume-*")))
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = f"{sub}/resume-{n}"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir).absolute()
        try:
            check_folder(config.hydra.sweep.dir, "hydra.sweep.dir")
        except RunFolderError as err:
            raise SystemExit(f"Error: {err}") from None
        saved = root / "multirun.yaml"  # Hydra's record of how the sweep was made
        if "resume" not in config or (config.resume and not saved.is_file()):
            return
        if config.resume:
            then = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task") or []
            now = config.hydra.overrides.task
            pairs = [dict(o.lstrip("+~").split("=", 1) for o in t if "=" in o) for t in (then, now)]
            if diff := differences(*pairs):
                raise SystemExit(
                    f"Error: resume=true continues the sweep in {root} with its own overrides "
                    "(multirun.yaml there); these differ:\n  " + "\n  ".join(diff) + "\n"
                    "Use them, or leave out hydra.sweep.dir for a new sweep"
                )
        elif taken := sorted(r.parent.name for r in root.glob(f"*/{RECORD}")):
            raise SystemExit(
                f"Error: sweep folder {root} already holds the jobs of another sweep "
                f"({', '.join(taken[:5])}): continue it with resume=true and the same overrides, "
                "or leave out hydra.sweep.dir (each sweep gets a new folder)"
            )
