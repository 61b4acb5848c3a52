"""One run per folder.

A training run owns its folder: ``run.json`` records who made it (when, the command, the
SLURM job if any) and how it went (``status``: running, finished, interrupted, failed, with the
reason); each resume adds its own launch and keeps the earlier ones under ``history``. A folder that holds a run (``run.json``, ``metrics.json`` or a checkpoint) is refused
to a new run, unless ``resume=true``; ``resume=true`` on a folder that holds nothing is refused
too. A job that SLURM requeues (same job id, higher ``SLURM_RESTART_COUNT``) is the same run and
resumes by itself.

The processes of one launch share the run: DDP workers started by Lightning inherit
``FCN_LIGHTNING_RUN_ID`` from the process that claimed the folder, and the tasks of one SLURM
job derive the same id from the job's variables.

The checks run twice on the command line: first in :class:`RunFolderGuard`, a Hydra callback
that runs before Hydra writes ``.hydra/`` into the folder (so that a refused run changes
nothing, and a resumed run records its own command in ``.hydra/resume-<n>/`` beside the
original), then in ``pipeline.train`` (which Python callers call directly).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ..atomic import write_atomically
from ..errors import RunFolderError

log = logging.getLogger("fcn_lightning")

RECORD = "run.json"
ENV_ID = "FCN_LIGHTNING_RUN_ID"


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def read_record(out: Path) -> dict[str, Any] | None:
    path = Path(out) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(
            f"{path} is unreadable ({err}): this folder's run record is damaged. Move the folder "
            "aside, or delete run.json if you know which run the folder holds."
        ) from None
    return record if isinstance(record, dict) else {}


def _write_record(out: Path, record: dict[str, Any], exclusive: bool = False) -> None:
    path = Path(out) / RECORD
    text = json.dumps(record, indent=2) + "\n"
    if exclusive:  # the claim itself: exactly one of two racing runs gets the folder
        with open(path, "x") as f:
            f.write(text)
        return
    write_atomically(path, lambda f: f.write(text.encode()))


def run_files(out: Path) -> list[Path]:
    """What a run leaves that is worth keeping: its metrics and its checkpoints."""
    out = Path(out)
    if not out.is_dir():
        return []
    metrics = [out / "metrics.json"] if (out / "metrics.json").is_file() else []
    return metrics + sorted(out.glob("*/checkpoints/*.ckpt"))


def _running_elsewhere(record: dict[str, Any] | None) -> bool:
    """The record's run may still be running (in another process)."""
    if not record or record.get("status") != "running":
        return False
    if record.get("host") != socket.gethostname():
        return True  # cannot tell: assume it runs
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OSError):
        return True
    return int(record.get("pid", 0)) != os.getpid()


def _slurm() -> dict[str, Any] | None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return {
        "job_id": f"{array}_{task}" if array and task else job,
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
    }


def launch_id() -> str | None:
    """The id every process of this launch shares, if one is known yet."""
    if os.environ.get(ENV_ID):
        return os.environ[ENV_ID]
    slurm = _slurm()
    if slurm is not None and os.environ.get("SLURM_NTASKS", "1") != "1":
        return f"slurm-{slurm['job_id']}-{slurm['restart_count']}"
    return None


def _is_requeue_of(record: dict[str, Any]) -> bool:
    """This process is a SLURM requeue of the job that made ``record``."""
    mine, theirs = _slurm(), record.get("slurm")
    return bool(
        mine
        and theirs
        and mine["job_id"] == theirs.get("job_id")
        and mine["restart_count"] > int(theirs.get("restart_count", 0))
    )


def _recent_runs(out: Path, n: int = 3) -> list[Path]:
    """Run folders near ``out`` (its siblings and cousins), newest first: where the user may
    have meant to point."""
    seen: set[Path] = set()
    for base in (out.parent, out.parent.parent):
        if base.is_dir():
            for record in [*base.glob(f"*/{RECORD}"), *base.glob(f"*/*/{RECORD}")]:
                seen.add(record.parent)
    return sorted(seen, key=lambda p: (p / RECORD).stat().st_mtime, reverse=True)[:n]


def _describe(out: Path, record: dict[str, Any] | None) -> str:
    metrics = out / "metrics.json"
    try:
        stages = list(json.loads(metrics.read_text())) if metrics.is_file() else []
    except ValueError:
        stages = []
    parts = []
    if record:
        parts.append(f"started {record.get('started', '?')}, status {record.get('status', '?')}")
    parts.append(f"finished stages: {', '.join(stages) or 'none'}")
    return "; ".join(parts)


# what may differ between a run and its resume: where things are, how many processes, what is
# logged, and how long the unfinished stage trains; anything else would mix two runs in one
RESUME_MAY_CHANGE = (
    "resume", "paths", "data.root", "data.num_workers", "data.pin_memory",
    "data.persistent_workers", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "trainer.max_steps", "trainer.max_epochs", "callbacks", "logger", "images", "perf",
)  # fmt: skip


def may_change_on_resume(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(made: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings in which ``now`` differs from the config a run was ``made`` with, outside
    :data:`RESUME_MAY_CHANGE`, as ``key: then -> now`` lines."""
    a, b = _flat(made), _flat(now)
    return [
        f"{key}: {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key) and not may_change_on_resume(key)
    ]


def comparable(config: Any) -> dict[str, Any]:
    """A run's config as run.json keeps it: unresolved, without Hydra's own node."""
    tree = OmegaConf.to_container(config, resolve=False) if not isinstance(config, dict) else config
    return {k: v for k, v in tree.items() if k != "hydra"}


def claim(
    out: str | Path,
    resume: bool,
    *,
    fresh_if_empty: bool = False,
    config: dict[str, Any] | None = None,
) -> bool:
    """Make ``out`` this run's folder; return whether to resume the run it holds.

    Raises :class:`RunFolderError` for a folder that holds another run (without ``resume``) or
    holds nothing to resume (with ``resume``, unless ``fresh_if_empty``: a sweep resumed with
    jobs that never started), or a resume whose ``config`` differs from the run's own."""
    out = Path(out).absolute()
    record = read_record(out)
    me = launch_id()
    if record is not None and me is not None and record.get("run_id") == me:
        return bool(record.get("resuming", resume))  # claimed already by this launch
    held = run_files(out)
    if record is not None and _is_requeue_of(record):
        log.info("SLURM requeued job %s: resuming its run in %s", record["slurm"]["job_id"], out)
        resume = True
    elif _running_elsewhere(record):
        raise RunFolderError(
            f"run folder {out} is in use by a running run (pid {record.get('pid')} on "
            f"{record.get('host')}, started {record.get('started')}). Leave out hydra.run.dir so "
            f"that this run gets its own folder (if that run is dead, delete {out / RECORD})."
        )
    if not held and not resume:
        pass  # a new folder, or one whose run saved nothing worth keeping
    elif not held and record is None and not fresh_if_empty:
        nearby = _recent_runs(out)
        hint = (
            "\nrun folders nearby, newest first:\n" + "\n".join(f"  {p}" for p in nearby)
            if nearby
            else ""
        )
        raise RunFolderError(
            f"resume=true, but there is nothing to resume in {out}: it holds no {RECORD}, "
            "metrics.json or checkpoint. Point hydra.run.dir= at the folder of the run to "
            f"continue, or drop resume=true to start a new run.{hint}"
        )
    elif not held:
        log.info("resume=true: the run in %s saved nothing yet; it starts from the beginning", out)
    elif resume and config is not None and record and record.get("config") is not None:
        changes = config_changes(record["config"], config)
        if changes:
            raise RunFolderError(
                f"resume=true continues the run in {out} as it was made, but these settings "
                "differ from the run's own:\n  "
                + "\n  ".join(changes[:12])
                + "\nResume with the run's own settings (its command is in run.json and "
                ".hydra/overrides.yaml), or start a new run (leave out hydra.run.dir)."
            )
    elif not resume:
        raise RunFolderError(
            f"run folder {out} already holds a run ({_describe(out, record)}). A run owns its "
            "folder, so this run will not write there.\n"
            f"  continue that run:  python train.py <its overrides> resume=true hydra.run.dir={out}\n"
            "  start a new run:    leave out hydra.run.dir (each run gets a new folder), or "
            f"choose an unused one, e.g. hydra.run.dir={out}-2"
        )
    run_id = me or uuid.uuid4().hex
    os.environ[ENV_ID] = run_id  # DDP workers started from here inherit it
    entry = {
        "run_id": run_id,
        "resuming": resume,
        "status": "running",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "slurm": _slurm(),
        "config": config if not (resume and record) else record.get("config", config),
    }
    out.mkdir(parents=True, exist_ok=True)
    if record is None:
        try:
            _write_record(out, {**entry, "started": _now(), "history": []}, exclusive=True)
        except FileExistsError:
            os.environ.pop(ENV_ID, None)
            raise RunFolderError(
                f"another run claimed {out} a moment ago; leave out hydra.run.dir so that each "
                "run gets its own folder"
            ) from None
    else:  # a resume, or a new run where the earlier one saved nothing: keep its record
        history = record.pop("history", [])
        _write_record(out, {**entry, "started": _now(), "history": [*history, record]})
    return resume


def release() -> None:
    """Forget this process's run id: the next ``claim`` in this process is a new run."""
    os.environ.pop(ENV_ID, None)


def mark(out: str | Path, status: str, reason: str | None = None, **extra: Any) -> None:
    """Record how the run went (``finished``, ``interrupted``, ``failed`` with the reason)."""
    out = Path(out)
    try:
        record = read_record(out) or {}
    except RunFolderError:
        record = {}
    record.update(status=status, ended=_now(), **extra)
    if reason is not None:
        record["reason"] = reason
    else:
        record.pop("reason", None)
    try:
        _write_record(out, record)
    except OSError as err:  # e.g. a full disk: the run's own error matters more
        log.warning("could not update %s: %s", out / RECORD, err)


def annotate(out: str | Path, **entries: Any) -> None:
    """Add ``entries`` to the run's record (e.g. each stage's plan), leaving its status."""
    out = Path(out)
    try:
        record = read_record(out) or {}
    except RunFolderError:
        return
    record.update(entries)
    try:
        _write_record(out, record)
    except OSError as err:
        log.warning("could not update %s: %s", out / RECORD, err)


def refused(out: str | Path, reason: str) -> None:
    """A run refused before any work (a bad setting or input): if this launch has claimed
    ``out`` already (the Hydra callback does, before Hydra writes ``.hydra/``), its record
    says ``failed`` with the reason, not ``running``."""
    try:
        record = read_record(Path(out))
    except RunFolderError:
        return
    me = launch_id()
    if record is not None and me is not None and record.get("run_id") == me:
        mark(out, "failed", reason)


def is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


class RunFolderGuard(Callback):
    """Hydra callback: check the run folder before Hydra writes ``.hydra/`` into it. (Hydra
    turns a callback's exceptions into warnings: a refusal exits through SystemExit.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "resume" not in config or (not is_rank_zero() and launch_id()):
            return
        out = Path(OmegaConf.select(config, "hydra.run.dir"))
        try:
            resume = claim(out, bool(config.resume), config=comparable(config))
        except RunFolderError as err:
            raise SystemExit(f"Error: {err}") from None
        subdir = config.hydra.output_subdir
        if resume and subdir is not None and (out / subdir).is_dir():
            # keep the record of how the run was made; this resume records its own command
            n = 1 + sum(1 for _ in out.glob(f"{subdir}/resume-*"))
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = f"{subdir}/resume-{n}"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "resume" not in config:
            return
        root = Path(OmegaConf.select(config, "hydra.sweep.dir")).absolute()
        if config.resume:
            self._check_same_sweep(root, list(config.hydra.overrides.task))
            return
        taken = sorted({p.parent for p in root.glob(f"*/{RECORD}")}) if root.is_dir() else []
        if taken:
            raise SystemExit(
                f"Error: sweep folder {root} already holds the jobs of another sweep "
                f"({', '.join(p.name for p in taken[:5])}). Continue it with resume=true and the "
                "same sweep overrides, or leave out hydra.sweep.dir (each sweep gets a new folder)."
            )

    @staticmethod
    def _check_same_sweep(root: Path, task: list[str]) -> None:
        """A resumed sweep must sweep what it swept: other values would put new settings' names
        on the old jobs' results (each job folder is matched by its number)."""
        saved = root / "multirun.yaml"  # written by Hydra's basic sweeper when the sweep began
        if not saved.is_file():
            return
        before = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task") or []

        def settings(overrides: list[str]) -> dict[str, str]:
            pairs = (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
            return {k: v for k, v in pairs if not may_change_on_resume(k)}

        old, new = settings(list(before)), settings(task)
        if old != new:
            diff = [
                f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
            raise SystemExit(
                f"Error: resume=true continues the sweep in {root} as it was made, but its "
                "settings differ:\n  " + "\n  ".join(diff) + "\nResume it with its own "
                "overrides (see multirun.yaml there), or leave out hydra.sweep.dir for a new sweep."
            )
