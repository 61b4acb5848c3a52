"""``python -m fcn_lightning.compare``: one table across finished (or failed, or running) runs,
a row per run and stage (and head), the settings that differ between them, the four metrics, the
paper's number where the run's preset has one; ``--plot``: their val curves from their own logs."""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .atomic import write_atomically
from .contract import METRIC_NAMES, SINGLE_HEAD
from .errors import ConfigError, RunFolderError
from .reports import METRIC_TITLES, long_form

# settings that never tell runs apart: where files are, Hydra's own, the paper's numbers, where
# the curves are logged
EXCLUDED = ("paths", "hydra", "paper", "data.root", "resume", "logger")
FORMATS = ("markdown", "csv", "json")
SUFFIXES = {".md": "markdown", ".csv": "csv", ".json": "json"}
STYLES = ("-", "--", ":", "-.")
TRAINED = ("stage lr", "stage step")  # columns where they differ: a stage's lr, its scored step


@dataclass
class Run:
    """One run folder as compare reads it: its flattened settings (``.hydra/config.yaml``, else
    run.json's copy), ``metrics.json`` (None: no finished stage), run.json's status and plan."""

    folder: Path
    settings: dict[str, Any]
    metrics: dict[str, Any] | None
    status: str
    stages: list[str]
    paper: Mapping[str, Any]
    plans: Mapping[str, Any] = field(default_factory=dict)  # run.json's stages: lr, budget
    reason: str = ""  # run.json's, of a failed run

    @property
    def trained_nothing(self) -> bool:
        """Failed before a stage began (a bad setting, missing data): nothing to compare."""
        return self.status == "failed" and not self.metrics and not self.stages


def is_run(folder: Path) -> bool:
    """A training run's folder (eval.py's and predict.py's folders are not)."""
    return any((folder / f).is_file() for f in ("metrics.json", "run.json"))


def find_runs(paths: Iterable[str]) -> list[Path]:
    """The run folders named: a run folder itself, every run under a sweep (or any) folder, the
    folders a glob matches; each once, in the order given (a sweep's jobs by their number)."""
    found: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{arg}: not a folder (expected a run or a sweep folder)")
        folders = [path] if path.exists() else [Path(p) for p in sorted(glob.glob(arg))]
        runs = [r for f in folders if f.is_dir() for r in ([f] if is_run(f) else runs_under(f))]
        if not folders:
            raise ConfigError(f"{arg}: no such folder")
        if not runs:
            raise ConfigError(
                f"{arg}: no run in it (a run folder holds metrics.json or run.json; a sweep "
                "folder holds run folders)"
            )
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def _number_first(name: str) -> tuple[int, str]:
    digits = re.match(r"\d+", name)
    return (int(digits.group()) if digits else sys.maxsize, name)


def runs_under(folder: Path) -> list[Path]:
    """The run folders below ``folder``, a run's own subfolders not searched."""
    runs = []
    for child in sorted(
        (p for p in folder.iterdir() if p.is_dir()), key=lambda p: _number_first(p.name)
    ):
        runs += [child] if is_run(child) else runs_under(child)
    return runs


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path} is unreadable ({err})") from None
    if not isinstance(data, dict):
        raise RunFolderError(
            f"{path} is unreadable: it holds a {type(data).__name__}, not an object"
        )
    return data


def _resolved(loaded: Any, config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` with each value that only points at another setting (``${arch.scratch_backbone}``)
    replaced by that setting's value; those that need Hydra (``${hydra:...}``) stay as written."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            value = _resolved(loaded, value, f"{name}.")
        elif isinstance(value, str) and re.fullmatch(r"\$\{[\w.]+\}", value):
            try:
                value = OmegaConf.select(loaded, name, throw_on_resolution_failure=True)
            except OmegaConfBaseException:
                pass
        out[key] = value
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and empty mappings are values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat |= (
            flatten(value, f"{name}.") if isinstance(value, Mapping) and value else {name: value}
        )
    return flat


def read_run(folder: Path) -> Run:
    """One run folder's files; one that cannot be read: :class:`RunFolderError` naming it."""
    record = _json(folder / "run.json") or {}
    metrics = _json(folder / "metrics.json")
    source = folder / ".hydra" / "config.yaml"
    if source.is_file():
        try:
            config = OmegaConf.to_container(OmegaConf.load(source), resolve=False)
        except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
            raise RunFolderError(f"{source} is unreadable ({err})") from None
    else:
        source, config = folder / "run.json", record.get("config") or {}
    if not isinstance(config, dict):
        raise RunFolderError(f"{source} is unreadable: it holds no mapping of settings")
    config = _resolved(OmegaConf.create(config), config)
    below = tuple(f"{k}." for k in EXCLUDED)
    settings = {
        k: v for k, v in flatten(config).items() if not k.startswith(below) and k not in EXCLUDED
    }
    status = record.get("status") or ("finished" if metrics else "no run.json")
    logged = [
        p.name for d in ("tensorboard", "csv") for p in sorted((folder / d).glob("*")) if p.is_dir()
    ]
    plans = record.get("stages") or {}
    stages = [*(metrics or {}), *(s for s in plans if (folder / s).is_dir()), *logged]
    return Run(
        folder,
        settings,
        metrics,
        str(status),
        list(dict.fromkeys(stages)),
        config.get("paper") or {},
        plans if isinstance(plans, dict) else {},
        str(record.get("reason") or ""),
    )


_MISSING = object()


def differing(runs: Sequence[Run]) -> list[str]:
    """The settings whose values are not the same in every run (a key some lack included), but
    for a copy of another such setting in every run (``data.loader_seed``: ``${seed}``)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.settings))
    values = {k: [repr(r.settings.get(k, _MISSING)) for r in runs] for k in keys}
    varied = [k for k in keys if len(set(values[k])) > 1]
    return [k for i, k in enumerate(varied) if values[k] not in [values[o] for o in varied[:i]]]


def labels(runs: Sequence[Run]) -> list[str]:
    """The runs' folders without the leading part they all share (at least the last name)."""
    folders = [r.folder.resolve() for r in runs]
    shared = len(Path(os.path.commonpath(folders)).parts)
    shared = min(shared, *(len(f.parts) - 1 for f in folders))
    return ["/".join(f.parts[shared:]) for f in folders]


def percent(
    scores: Mapping[str, Any], names: Iterable[str], scale: float = 100
) -> dict[str, float]:
    """Scores as the project prints them: per cent, one decimal; None (a class absent) left out."""
    return {n: round(scale * float(scores[n]), 1) for n in names if scores.get(n) is not None}


def table(runs: Sequence[Run], per_class: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): a row per run and stage (and head), a key absent from a row: no value."""
    keys, names = differing(runs), labels(runs)
    rows = []
    for run, name in zip(runs, names, strict=True):
        front = {"run": name, "status": run.status} | {
            k: run.settings[k] for k in keys if k in run.settings
        }
        if not run.metrics:
            rows.append(front)
        for stage, block in (run.metrics or {}).items():
            heads = {h: m for h, m in long_form(block).items() if isinstance(m, Mapping) and "mIoU" in m}  # fmt: skip
            paper = long_form(run.paper.get(stage) or {}) if run.paper else {}
            # what the stage trained with: its lr (run.json's plan), the step of the checkpoint
            # scored (a resume may train a stage on past the budget its config shows)
            scored = block.get("checkpoint") if isinstance(block.get("checkpoint"), Mapping) else {}
            trained = {"stage lr": (run.plans.get(stage) or {}).get("lr"), "stage step": scored.get("step")}  # fmt: skip
            for head, m in heads.items():
                row = {
                    **front,
                    "stage": stage if list(heads) == [SINGLE_HEAD] else f"{stage}/{head}",
                } | {k: v for k, v in trained.items() if v is not None}
                row |= {METRIC_TITLES[k]: v for k, v in percent(m, METRIC_NAMES).items()}
                given = percent(paper.get(head) or {}, METRIC_NAMES, scale=1)  # per cent already
                row |= {f"paper {METRIC_TITLES[k]}": v for k, v in given.items()}
                if per_class:
                    ious = m.get("per_class_IoU") or {}
                    row |= {f"IoU {c}": v for c, v in percent(ious, ious).items()}
                rows.append(row)
    status = ["status"] if any(r.status != "finished" for r in runs) else []
    # what each stage trained with (a resume may extend a budget the config does not show)
    planned = [
        k
        for k in TRAINED
        if len({repr(r.get(k)) for r in rows}) > 1  # differs, and is no setting's copy
        and not any(all(repr(r.get(k)) == repr(r.get(c)) for r in rows) for c in keys)
    ]
    for row in rows:
        for key in set(row) & set(TRAINED) - set(planned):
            del row[key]
    metrics = [METRIC_TITLES[k] for k in METRIC_NAMES]
    papers = [f"paper {t}" for t in metrics if any(f"paper {t}" in r for r in rows)]
    classes = list(dict.fromkeys(c for r in rows for c in r if c.startswith("IoU ")))
    return ["run", "stage", *status, *keys, *planned, *metrics, *papers, *classes], rows


def cell(value: Any) -> str:
    """A value as text: settings as YAML writes them (null, true), lists as JSON."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def to_markdown(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    text = [[c, *(cell(r[c]).replace("|", "\\|") if c in r else "" for r in rows)] for c in columns]
    width = [max(map(len, col)) for col in text]
    lines = [
        [col[i].ljust(w) for col, w in zip(text, width, strict=True)] for i in range(len(rows) + 1)
    ]
    rule = ["-" * w for w in width]
    return "\n".join("| " + " | ".join(line) + " |" for line in [lines[0], rule, *lines[1:]]) + "\n"


def to_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([cell(r[c]) if c in r else "" for c in columns] for r in rows)
    return out.getvalue()


def to_json(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([{c: r[c] for c in columns if c in r} for r in rows], indent=2) + "\n"


def curves(run: Run, metric: str = "mIoU") -> dict[str, tuple[list[int], list[float]]]:
    """``{stage or stage/head: (steps, values)}`` of val/<metric> from the run's TensorBoard
    event files (``tensorboard/<stage>/``), else its csv logger's ``csv/<stage>/metrics.csv``."""
    tag = re.compile(rf"val/(?:([^/]+)/)?{re.escape(metric)}")
    found = {}
    for stage in run.stages:
        series: dict[str | None, dict[int, float]] = {}
        board = run.folder / "tensorboard" / stage
        if board.is_dir():
            events = EventAccumulator(str(board), size_guidance={"scalars": 0})
            events.Reload()
            for name in events.Tags()["scalars"]:
                if m := tag.fullmatch(name):
                    series[m[1]] = {e.step: e.value for e in events.Scalars(name)}
        for table_file in (
            [] if series else sorted((run.folder / "csv" / stage).glob("**/metrics.csv"))
        ):
            with open(table_file, newline="") as f:
                for line in csv.DictReader(f):
                    for name, value in line.items():
                        if (m := tag.fullmatch(name or "")) and value not in ("", None):
                            series.setdefault(m[1], {})[int(line["step"])] = float(value)
        for head, points in series.items():
            steps = sorted(points)
            found[stage if head is None else f"{stage}/{head}"] = (
                steps,
                [points[s] for s in steps],
            )
    return found


def run_steps(
    run: Run, found: Mapping[str, tuple[list[int], list[float]]]
) -> list[tuple[str, tuple[list[int], list[float]]]]:
    """The curves of :func:`curves` on one step axis for the run: each stage's steps after the
    end of the stages before it (its last point, or its scored checkpoint's step if later)."""
    out, start = [], 0
    for stage in dict.fromkeys(key.split("/")[0] for key in found):
        own = [(k, v) for k, v in found.items() if k.split("/")[0] == stage]
        out += [(k, ([start + s for s in steps], values)) for k, (steps, values) in own]
        block = (run.metrics or {}).get(stage) or {}
        scored = block.get("checkpoint", {}).get("step", 0) if isinstance(block, Mapping) else 0
        start += max([int(scored or 0)] + [steps[-1] for _, (steps, _) in own if steps])
    return out


def plot(runs: Sequence[Run], metric: str = "mIoU") -> Figure:
    """The val curves, one line per run and stage (and head): a colour per run, a line style
    per stage, labelled by the run and the settings that differ. A bare Figure (no pyplot, no
    GUI backend): its PNG comes from Agg."""
    keys, names = differing(runs), labels(runs)
    lines = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        said = ", ".join(f"{k}={cell(run.settings.get(k))}" for k in keys)
        for j, (stage, (steps, values)) in enumerate(run_steps(run, curves(run, metric))):
            label = textwrap.fill(f"{name} {stage}" + (f": {said}" if said else ""), 110)
            lines.append((steps, [100 * v for v in values], f"C{i % 10}", STYLES[j % 4], label))
    if not lines:
        raise ConfigError(
            f"--plot: no val {metric} curve in the runs' logs (tensorboard/<stage>/ event files "
            "or csv/<stage>/metrics.csv)"
        )
    rows = sum(line[-1].count("\n") + 1 for line in lines)  # the legend's lines of text
    fig = Figure(figsize=(8, 4.5 + 0.2 * rows), layout="constrained")
    ax = fig.add_subplot()
    for steps, values, colour, style, label in lines:
        ax.plot(steps, values, color=colour, linestyle=style, marker=".", label=label)
    ax.set(
        xlabel="step (a run's stages one after another)",
        ylabel=f"val {METRIC_TITLES[metric]}",
        title=f"val {metric} per run and stage",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    wide = len(lines) > 8 and max(len(line[-1]) for line in lines) <= 50
    fig.legend(loc="outside lower center", fontsize=8, frameon=False, ncols=2 if wide else 1)
    return fig


def write_file(path: Path, write: Callable[[IO[bytes]], None], option: str) -> None:
    """``write`` to ``path`` atomically; a folder that is missing or not writable named."""
    try:
        write_atomically(path, write)
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot write it ({err.strerror or err})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fcn_lightning.compare",
        description="One table across runs: a row per run and stage, the settings that differ, "
        "the four metrics (per cent), the paper's where the run's preset gives it. A run "
        "without metrics.json (failed, still running) is listed with run.json's status; one "
        "refused before any stage is left out, named on stderr.",
        epilog="example: python -m fcn_lightning.compare multirun/2026-12-07/10-00-00 "
        "'outputs/*/*' --per-class --plot curves.png",
    )
    p.add_argument(
        "paths", nargs="+", help="run folders, sweep folders (every run under them) or globs"
    )
    p.add_argument(
        "--format", choices=FORMATS, help="markdown (default; or from --output's suffix)"
    )
    p.add_argument("--per-class", action="store_true", help="IoU per class too")
    p.add_argument("--output", type=Path, help="write the table to this file (else stdout)")
    p.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="the val curves of every run and stage"
    )
    p.add_argument(
        "--metric", choices=METRIC_NAMES, default="mIoU", help="the curves' metric (default: mIoU)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        found = [read_run(folder) for folder in find_runs(args.paths)]
        runs = [r for r in found if not r.trained_nothing]
        for run in (r for r in found if r.trained_nothing):
            reason = run.reason.splitlines()[0] if run.reason else "no reason recorded"
            print(f"left out {run.folder}: failed before training ({reason})", file=sys.stderr)
        if not runs:
            raise ConfigError("no run trained a stage: nothing to compare")
        columns, rows = table(runs, args.per_class)
        fmt = args.format or SUFFIXES.get(args.output.suffix if args.output else "", "markdown")
        text = {"markdown": to_markdown, "csv": to_csv, "json": to_json}[fmt](columns, rows)
        figure = plot(runs, args.metric) if args.plot else None
        if args.output:
            write_file(args.output, lambda f: f.write(text.encode()), "--output")
        else:
            print(text, end="")
        if figure is not None:
            write_file(
                args.plot,
                lambda f: figure.savefig(f, format="png", dpi=120, bbox_inches="tight"),
                "--plot",
            )
    except (ConfigError, RunFolderError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
