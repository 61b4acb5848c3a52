"""What train.py runs: the staged pipeline, 32s -> 16s -> 8s (paper section 4.2), each stage a
Lightning fit started from the previous stage's best weights; docs/TRAINING.md shows its run folder.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..atomic import write_json_atomic
from ..checkpoints import check_stream_checkpoints, load_weights_only
from ..contract import METRIC_NAMES
from ..data.base import SegmentationDataModule
from ..errors import CheckpointError, ConfigError, RunInterrupted, TrainingDiverged
from ..models import LateFusionFCN, transfer_stage
from ..module import FCNModule, NonFiniteLossError
from ..reports import format_table, headline, short_form
from . import rundir
from .board import HParamsTab, ValidationImages
from .callbacks import (
    AtomicCheckpointIO,
    InterruptCheckpoint,
    ParameterSummary,
    ValidationSteps,
    best_checkpoint,
    last_checkpoint,
)
from .checks import check_free_space, check_inputs, check_settings, model_settings, read_metrics
from .common import label_report, make_datamodule
from .console import say
from .loggers import make_loggers
from .stages import CUTS, budget, cut, entry_of, selection, stage_lr, stages_for, trainer_settings

log = logging.getLogger("fcn_lightning")

__all__ = ["RunInterrupted", "TrainingDiverged", "is_multirun", "run_stage", "train"]


def make_module(
    cfg: DictConfig, dm: SegmentationDataModule, stage: str, lr: float, pretrained: Any
) -> FCNModule:
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    optimizer["lr"] = lr
    module = FCNModule(
        model_settings(cfg, stage, pretrained),
        contract=dm.contract,
        loss_reduction=cfg.loss.reduction,
        class_weights=OmegaConf.to_container(cfg.loss.class_weights)
        if cfg.loss.class_weights is not None
        else None,
        loss_sample_prob=float(cfg.loss.sample_prob),
        optimizer=optimizer,
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        exclude_absent_classes=bool(cfg.get("exclude_absent_classes", False)),
        channels_last=bool(cfg.perf.channels_last),
        compile=cfg.perf.compile,
    )
    module.data_record = OmegaConf.to_container(cfg.data, resolve=True)  # eval.py's default data
    return module


def run_settings(cfg: DictConfig, plan: Mapping[str, Any]) -> dict[str, Any]:
    """What the HParams tab shows beside the module's own: seed, lr cuts, the stage's plan, data."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data = {k: v for k, v in data.items() if k not in ("_target_", "root")}
    cuts = {into: {"lr_factor": cut(cfg, into)} for into in CUTS}
    stage = {k: plan[k] for k in ("lr_from", "budget_from", "selection")}
    return {"seed": cfg.seed, "stages": cuts, "data": data, "stage": stage, "swept": swept()}


def swept() -> dict[str, Any]:
    """A sweep job's own settings, those its folder is named by (Hydra's override_dirname keys)."""
    if not is_multirun():
        return {}
    hydra = HydraConfig.get()
    skip = set(hydra.job.config.override_dirname.exclude_keys)
    pairs = (o.lstrip("+~").partition("=") for o in hydra.overrides.task)
    return {k: _number(v) for k, _, v in pairs if k not in skip and not k.startswith("hydra.")}


def _number(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def stage_plan(cfg: DictConfig, stage: str, index: int, select: tuple[str, str]) -> dict[str, Any]:
    """What a stage will do and why: its lr, its step / epoch limits, its checkpoint selection."""
    lr, lr_from = stage_lr(cfg, stage, entry_of(cfg, index))
    limits, budget_from = budget(cfg, stage)
    return {"lr": lr, "lr_from": lr_from, **limits, "budget_from": budget_from,
            "selection": select[0], "selection_from": select[1]}  # fmt: skip


def make_trainer(
    cfg: DictConfig, stage: str, out: Path, monitor: str, plan: Mapping[str, Any]
) -> pl.Trainer:
    ckpt_dir = out / stage / "checkpoints"
    trainer_cfg = trainer_settings(cfg, stage)
    choose = [best_checkpoint(ckpt_dir, monitor)] if plan["selection"] != "last" else []
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not trainer_cfg.get("enable_progress_bar", True):  # Lightning refuses a bar it may not show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks += [
        ValidationImages(int(cfg.images.panel_size), int(cfg.images.every_n_epochs)),
        HParamsTab(run_settings(cfg, plan), shown=[f"run/swept/{k}" for k in swept()]),
        *choose,
        last_checkpoint(ckpt_dir),
        InterruptCheckpoint(ckpt_dir),
        ValidationSteps(),
    ]
    if trainer_cfg.get("enable_model_summary", True) is not False:
        callbacks.append(ParameterSummary())  # one line, in place of Lightning's table
    logger = make_loggers(cfg.get("logger"), stage, out)
    return instantiate(
        trainer_cfg,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(out / stage),
        plugins=[AtomicCheckpointIO()],
    )


def init_streams(module: FCNModule, sources: Mapping[str, str]) -> None:
    """Start each late-fusion stream from its own trained checkpoint (the paper's RGB-HHA)."""
    model = module.model
    if not isinstance(model, LateFusionFCN):
        raise ConfigError("arch.init_streams needs a late-fusion model (data.modality=rgb+hha)")
    streams = model.streams
    if set(sources) != set(streams):
        raise ConfigError(
            f"arch.init_streams names {sorted(sources)}, the model's streams are {sorted(streams)}"
        )
    for name, path in sources.items():
        if not Path(path).is_file():
            raise ConfigError(f"arch.init_streams.{name}: checkpoint not found: {path}")
    try:
        check_stream_checkpoints(sources, module.contract, module.input_normalizations)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    for name, path in sources.items():
        transfer_stage(path, streams[name])


class SigtermGuard:
    """SIGTERM during a run (main thread only): Lightning's to handle while ``trainer.fit`` runs
    (:meth:`fitting`), elsewhere it raises :class:`RunInterrupted`."""

    _fitting = _installed = False
    _previous: Any = None

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False

    @contextlib.contextmanager
    def fitting(self) -> Iterator[None]:
        self._fitting = True
        try:
            yield
        finally:
            self._fitting = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._fitting:
            raise RunInterrupted(
                "stopped by SIGTERM outside training (while loading data or validating); "
                f"continue with: {resume_command(self.out)}",
                signal.SIGTERM,
            )


def resume_command(out: Path) -> str:
    """The command that continues the run in ``out`` (a sweep's job: the whole sweep): train.py
    as it was started, its overrides as typed (without ``resume`` and the folder), then
    ``resume=true`` and the folder."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("train.py") else "train.py"
    if not HydraConfig.initialized():
        return f"python {script} <the same overrides> resume=true hydra.run.dir={out}"
    hydra, mode, key = HydraConfig.get(), [], "hydra.run.dir"
    task = list(hydra.overrides.task)
    if hydra.mode == RunMode.MULTIRUN:
        out, mode, key = Path(hydra.sweep.dir).absolute(), ["-m"], "hydra.sweep.dir"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            task = list(OmegaConf.load(out / "multirun.yaml").hydra.overrides.task)
    keep = [o for o in task if not re.match(r"[+~]*(resume|hydra\.(run|sweep)\.dir)=", o)]
    if re.search(r"[=,\s'\"{}\[\]()]", str(out)):  # a value Hydra reads in quotes
        folder = f"\"{key}='{out}'\""
    else:
        folder = shlex.quote(f"{key}={out}")
    return " ".join(
        ["python", shlex.quote(script), *mode, *map(shlex.quote, keep), "resume=true", folder]
    )


@dataclass
class Run:
    """What the stages of one run share."""

    cfg: DictConfig
    out: Path
    resume: bool  # continue the run in ``out`` (resume=true, or a SLURM requeue)
    dm: SegmentationDataModule
    stages: list[str]
    plans: dict[str, dict[str, Any]]
    metrics: dict[str, Any]  # metrics.json: every finished stage's val metrics
    sigterm: SigtermGuard


def _data_overrides(cfg: DictConfig) -> str:
    """The command line's data settings but the splits, for the eval.py command printed at the end."""
    if not HydraConfig.initialized():
        return f"data.root={cfg.data.root}" if cfg.data.get("root") else ""
    splits = ("data.train_split=", "data.val_split=", "data.test_split=")
    keep = [
        o
        for o in HydraConfig.get().overrides.task
        if o.lstrip("+").startswith(("data=", "data.")) and not o.lstrip("+").startswith(splits)
    ]
    return " ".join(f"'{o}'" if any(c in o for c in " {}[],") else o for o in keep)


def _step_of(path: Path) -> Any:
    try:
        return load_weights_only(path).get("global_step", "?")
    except ValueError:
        return "?"


def train(cfg: DictConfig) -> float:
    """Train the stages that ``cfg`` asks for in the run folder it owns (``rundir``); return the
    last stage's val mIoU. Stopped: :class:`RunInterrupted`; diverged: :class:`TrainingDiverged`."""
    out = Path(cfg.paths.output_dir)
    try:
        check_settings(cfg)
        check_inputs(cfg, out, bool(cfg.resume))  # read-only: a refused run starts nothing
    except Exception as err:
        rundir.refused(out, f"{type(err).__name__}: {err}")
        raise
    sweep_job = is_multirun()
    resume = rundir.claim(out, bool(cfg.resume), fresh_if_empty=sweep_job, sweep_job=sweep_job,
                          config=rundir.comparable(cfg))  # fmt: skip
    with SigtermGuard(out) as sigterm:
        try:
            score = _train_stages(cfg, out, resume, sigterm)
        except BaseException as err:
            stopped = isinstance(err, KeyboardInterrupt | SIGTERMException | RunInterrupted)
            if stopped or isinstance(err, TrainingDiverged):
                why = str(err) or type(err).__name__
            elif isinstance(err, SystemExit):
                why = str(err.code)
            else:
                why = f"{type(err).__name__}: {err}"
            rundir.mark(out, "interrupted" if stopped else "failed", why)
            raise
        else:
            rundir.mark(out, "finished", mIoU=score)
            return score
        finally:
            rundir.release()


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra sweep (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _train_stages(cfg: DictConfig, out: Path, resume: bool, sigterm: SigtermGuard) -> float:
    """The data, each stage's plan, then each stage in turn; the table of their metrics."""
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    stages = stages_for(cfg)
    if resume and not cfg.resume:  # a SLURM requeue: its checkpoints are checked now
        check_inputs(cfg, out, resume)
    metrics = read_metrics(out / "metrics.json") if resume else {}
    dm = make_datamodule(cfg.data)
    if rundir.is_rank_zero():  # data.download=true: only prepare_data downloads, on one process
        dm.prepare_data()
    dm.setup("fit")  # a missing or broken dataset fails here, before any training
    shared = {}
    if dm.val_split != dm.test_split:  # held out: by the images, not by the splits' names
        val = dm.image_ids(dm.val_split)
        shared = {k: len(val & dm.image_ids(s)) for k, s in (("train", dm.train_split),
                                                              ("test", dm.test_split))}  # fmt: skip
    select = selection(cfg, dm.val_split, dm.test_split, shared)
    held_out = dm.val_split != dm.test_split and not any(shared.values())
    plans = {stage: stage_plan(cfg, stage, i, select) for i, stage in enumerate(stages)}
    if rundir.is_rank_zero():  # every label of train / val / test, once (cached), before training
        say(label_report(dm))
        rundir.annotate(out, stages=plans)
    log.info("stages: %s; run folder: %s", " -> ".join(stages), out)
    log.info("best.ckpt of each stage: %s", select[1])
    run = Run(cfg, out, resume, dm, stages, plans, metrics, sigterm)
    previous_best: str | None = cfg.arch.get("init_from")
    for i in range(len(stages)):
        previous_best = run_stage(run, i, previous_best)
    _say_results(run, select[0], held_out)
    return headline(metrics[stages[-1]])


def run_stage(run: Run, i: int, previous_best: str | None) -> str:
    """Train (or, resumed and finished, skip) the run's ``i``-th stage from ``previous_best``;
    record its val metrics; return its best.ckpt, where the next stage starts."""
    cfg, stage = run.cfg, run.stages[i]
    plan = run.plans[stage]
    ckpt_dir = run.out / stage / "checkpoints"
    best, last = ckpt_dir / "best.ckpt", ckpt_dir / "last.ckpt"
    if run.resume and stage in run.metrics and best.is_file():
        ended = _end_of(last)
        if not _trains_on(plan, ended):
            log.info(
                "[%d/%d] %s: finished before, skipped (resume=true)", i + 1, len(run.stages), stage
            )
            return str(best)
        if i < len(run.stages) - 1:  # the next stage started from it: a longer one would not match
            log.warning(
                "%s finished at step %d before and is kept, though %s would train it on: %s "
                "started from it. A larger budget trains the last stage on (resume=true)",
                stage, ended[0], plan["budget_from"], run.stages[i + 1],
            )  # fmt: skip
            return str(best)
        log.info(
            "%s finished at step %d before: training on (%s)", stage, ended[0], plan["budget_from"]
        )
    first = i == 0 and not previous_best
    try:
        module = make_module(cfg, run.dm, stage, plan["lr"], cfg.arch.pretrained if first else None)
    except ValueError as err:  # e.g. class weights that do not fit the data's classes
        raise ConfigError(
            f"loss.{err}" if str(err).startswith("class_weights") else str(err)
        ) from None
    check_free_space(run.out, stage, module)
    resume_from = str(last) if run.resume and last.is_file() else None
    if previous_best and not resume_from:
        try:
            init_from = previous_best == cfg.arch.get("init_from")
            transfer_stage(previous_best, module.model, new_classes=init_from)
        except ValueError as err:
            raise ConfigError(
                f"{'arch.init_from' if init_from else previous_best}: {err}"
            ) from None
        if fresh := module.model.fresh:  # fine-tuned on other classes
            layers = ", ".join(dict.fromkeys(k.rsplit(".", 1)[0] for k in fresh))
            say(
                f"arch.init_from: {layers} start afresh (for other classes, or not in the checkpoint)"
            )
    elif i == 0 and cfg.arch.get("init_streams") and not resume_from:
        init_streams(module, cfg.arch.init_streams)
        previous_best = "the checkpoints of arch.init_streams"
    source = previous_best or (f"{cfg.arch.backbone} weights" if cfg.arch.pretrained else "scratch")
    log.info(
        "[%d/%d] %s: from %s%s; lr %.3g = %s; %s", i + 1, len(run.stages), stage, source,
        f", resuming {resume_from}" if resume_from else "", plan["lr"], plan["lr_from"],
        plan["budget_from"],
    )  # fmt: skip
    trainer = make_trainer(cfg, stage, run.out, module.monitor, plan)
    _fit(run, stage, trainer, module, resume_from)
    # last.ckpt is where the stage ended, also when no epoch ended since the last save
    trainer.save_checkpoint(last, weights_only=False)
    if plan["selection"] == "last" or not best.is_file():  # (best: no validation ran)
        trainer.save_checkpoint(best, weights_only=False)
    end, steps = (
        trainer.global_step,
        next(c for c in trainer.callbacks if isinstance(c, ValidationSteps)),
    )
    trainer.validate(module, run.dm, ckpt_path=str(best), verbose=False)
    chosen = {"selected": plan["selection"], "step": _step_of(best), "why": plan["selection_from"]}
    results = {h: {**b, "checkpoint": chosen} for h, b in module.results.get("val", {}).items()}
    if chosen["step"] == end and end not in steps.validated:  # the curves end where the stage did
        log_curve_point(trainer, module, end)
    run.metrics[stage] = short_form(results)
    if trainer.is_global_zero:
        write_json_atomic(run.out / "metrics.json", run.metrics)
    one = one_class(module)
    log.log(
        logging.WARNING if one else logging.INFO, "%s done: val mIoU %.1f%%%s", stage,
        100 * headline(run.metrics[stage]),
        "".join(f"; predicts '{c}' for every pixel{f' ({h})' * (len(one) > 1)}" for h, c in one.items())
        + (": nothing learned yet (train longer, raise the lr, or start from ImageNet weights)" if one else ""),
    )  # fmt: skip
    return str(best)


def _end_of(path: Path) -> tuple[int, int]:
    """The (global step, epoch) where a checkpoint was written."""
    ckpt = load_weights_only(path)
    return int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0))


def _trains_on(plan: Mapping[str, Any], ended: tuple[int, int]) -> bool:
    """Whether the stage's budget goes beyond where its last.ckpt ended."""
    if plan["max_steps"] > 0:
        return plan["max_steps"] > ended[0]
    return plan["max_epochs"] > ended[1]


def one_class(module: FCNModule) -> dict[str, str]:
    """Per head, the class a model predicts for every validation pixel, if it predicts one."""
    found = {}
    for head, confmat in module.confmats.get("val", {}).items():
        predicted = (confmat.sum(0) > 0).nonzero().flatten().tolist()
        if len(predicted) == 1:
            found[head] = module.contract.class_names(head)[predicted[0]]
    return found


def log_curve_point(trainer: pl.Trainer, module: FCNModule, step: int) -> None:
    """The chosen checkpoint's val metrics as the curves' point at ``step`` (no validation of
    the fit ran there: a stage shorter than its validation interval still has its curves)."""
    results, points = module.results.get("val", {}), {}
    for head, block in results.items():
        points |= {module.tag("val", head, k): float(block[k]) for k in METRIC_NAMES}
        per_class = block.get("per_class_IoU", {}).items()
        points |= {module.tag("val", head, f"IoU/{c}"): v for c, v in per_class if v is not None}
    for logger in trainer.loggers if trainer.is_global_zero else []:
        logger.log_metrics(points, step=step)
        logger.save()


def _fit(
    run: Run, stage: str, trainer: pl.Trainer, module: FCNModule, resume_from: str | None
) -> None:
    """``trainer.fit``; stopped: :class:`RunInterrupted`, diverged: :class:`TrainingDiverged`."""
    last = run.out / stage / "checkpoints" / "last.ckpt"
    resume_hint = f"Continue with: {resume_command(run.out)}"
    stopper = next(c for c in trainer.callbacks if isinstance(c, InterruptCheckpoint))
    try:
        with run.sigterm.fitting():
            trainer.fit(module, run.dm, ckpt_path=resume_from)
    except SIGTERMException:
        cause = "was interrupted (Ctrl+C)" if stopper.ctrl_c else "stopped by SIGTERM"
        raise RunInterrupted(
            f"{stage} {cause} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"{last} holds that step. {resume_hint}",
            signal.SIGINT if stopper.ctrl_c else signal.SIGTERM,
        ) from None
    except NonFiniteLossError as err:
        raise TrainingDiverged(
            f"{stage}: {err} ({last if last.is_file() else 'no checkpoint yet'})"
        ) from None
    except SystemExit:  # Lightning exits this way after Ctrl+C
        if not trainer.interrupted:
            raise
    if trainer.interrupted:
        kept = f"{last} holds step {_step_of(last)}" if last.is_file() else "no checkpoint yet"
        raise RunInterrupted(
            f"{stage} was stopped at once (Ctrl+C twice) at epoch {trainer.current_epoch}, "
            f"step {trainer.global_step}; the step in progress was not saved: {kept}. "
            + resume_hint
        )


def _say_results(run: Run, selected: str, held_out: bool) -> None:
    """The table of each stage's metrics; after a held-out val split chose the checkpoints, the
    eval.py command that scores the reported split."""
    table = format_table({s: run.metrics[s] for s in run.stages if s in run.metrics})
    say(
        f"\nValidation metrics of each stage ({selected} checkpoint, best.ckpt):\n"
        + table
        + f"\n\nrun folder: {run.out}"
    )
    dm = run.dm
    if selected == "best" and held_out:
        best = run.out / run.stages[-1] / "checkpoints" / "best.ckpt"
        say(
            f"checkpoints were chosen on '{dm.val_split}'; score the reported split with:\n"
            f"  python eval.py ckpt_path={best} {_data_overrides(run.cfg)} data.split={dm.test_split}"
        )
