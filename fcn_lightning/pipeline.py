"""What train.py, eval.py and predict.py run: the staged pipeline, evaluation and prediction.

Run folder of ``train``::

    <output_dir>/.hydra/config.yaml         the resolved config (Hydra)
    <output_dir>/<stage>/checkpoints/{best,last}.ckpt
    <output_dir>/tensorboard/<stage>/       one TensorBoard run per stage
    <output_dir>/metrics.json               every finished stage's final val metrics
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from . import rundir
from .atomic import write_json_atomic
from .board import HParamsTab, ValidationImages
from .callbacks import AtomicCheckpointIO, InterruptCheckpoint, best_checkpoint, last_checkpoint
from .checkpoints import CheckpointError, check_readable, load_weights_only
from .contract import METRIC_NAMES, METRIC_TITLES, headline, long_form, short_form
from .data.base import DataError, SegmentationDataModule
from .models import LateFusionFCN, transfer_stage
from .module import FCNModule, NonFiniteLossError, load_checkpoint

log = logging.getLogger("fcn_lightning")

CHAIN = ("fcn32s", "fcn16s", "fcn8s")


class ConfigError(ValueError):
    """A setting that cannot work; the message names it."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: printed as their message, without a traceback."""
    return (ConfigError, DataError, rundir.RunFolderError, CheckpointError)


def as_command(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """``fn(cfg)`` for a command-line entry point: a user error ends the process with its
    message (exit status 1), not with a traceback through the project's code."""
    try:
        return fn(cfg)
    except user_errors() as err:
        raise SystemExit(f"Error: {err}") from None


class RunInterrupted(SystemExit):
    """Training stopped by SIGTERM or Ctrl+C; the message says how to continue."""


# --------------------------------------------------------------------------- helpers
def stages_for(cfg: DictConfig) -> list[str]:
    """The stages to train: the chain up to ``arch.name`` when staged, else the arch alone."""
    arch = cfg.arch.name
    if (
        cfg.arch.get("init_from")
        or cfg.arch.get("init_streams")
        or not cfg.staged
        or arch not in CHAIN
    ):
        return [arch]
    return list(CHAIN[: CHAIN.index(arch) + 1])


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def make_datamodule(data_cfg: DictConfig, **override: Any) -> SegmentationDataModule:
    cfg = OmegaConf.to_container(data_cfg, resolve=True)
    cfg.update(override)
    if cfg.get("root") == "???":
        raise ConfigError("data.root is not set: pass data.root=/path/to/the/dataset")
    return instantiate(cfg, _convert_="all")


def model_settings(cfg: DictConfig, stage: str, pretrained: Any) -> dict[str, Any]:
    """The model's settings that the arch group decides (the data contract gives the rest)."""
    arch = cfg.arch
    return {
        "arch": stage,
        "backbone": arch.backbone,
        "geometry": arch.geometry,
        "width": float(arch.width),
        "pretrained": pretrained,
        "learnable_upsampling": bool(arch.learnable_upsampling),
        "dropout": float(arch.dropout),
        "normalization": arch.normalization,
    }


def make_module(
    cfg: DictConfig, dm: SegmentationDataModule, stage: str, lr: float, pretrained: Any
) -> FCNModule:
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    optimizer["lr"] = lr
    return FCNModule(
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


def trainer_settings(cfg: DictConfig, stage: str, warn: bool = False) -> DictConfig:
    """``cfg.trainer`` with the stage's ``stage_overrides``, made workable: sync batch norm only
    where it works (GPUs); ``warn`` says so when it turns it off."""
    merged = OmegaConf.merge(cfg.trainer, (cfg.get("stage_overrides") or {}).get(stage) or {})
    accelerator = str(merged.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if merged.get("sync_batchnorm") and on_cpu:
        if warn:
            log.warning(
                "trainer.sync_batchnorm=true works on GPUs only; on the CPU each process keeps "
                "its own batch-norm statistics (sync_batchnorm set to false)"
            )
        merged.sync_batchnorm = False
    return merged


def check_settings(cfg: DictConfig) -> None:
    """Settings that would fail only after the data was read or a stage was trained."""
    lr = float(cfg.optimizer.lr)
    if cfg.loss.reduction == "sum" and lr > 1e-6:
        log.warning(
            "loss.reduction=sum (the loss summed over every pixel, this recipe's choice) with "
            "optimizer.lr=%g: a summed loss needs an lr near 1e-10 (optimizer=sgd_heavy); with "
            "optimizer=%s set loss.reduction=mean",
            lr,
            cfg.optimizer.name,
        )
    stages = stages_for(cfg)
    trainer_args = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    for stage, settings in (cfg.get("stage_overrides") or {}).items():
        if stage not in (*CHAIN, "fcn8s_atonce"):
            raise ConfigError(
                f"stage_overrides.{stage}: no stage is called {stage!r} (stages: "
                f"{', '.join((*CHAIN, 'fcn8s_atonce'))})"
            )
        unknown = sorted(set(settings or {}) - trainer_args)
        if unknown:
            raise ConfigError(
                f"stage_overrides.{stage}.{unknown[0]} is not a Lightning Trainer argument"
            )
        if stage not in stages:
            log.warning("stage_overrides.%s: this run does not train %s", stage, stage)
    scheduler = (cfg.get("scheduler") or {}).get("name", "fixed")
    for i, stage in enumerate(stages):
        t = trainer_settings(cfg, stage, warn=i == 0)  # said once, before any work
        steps, epochs = t.get("max_steps"), t.get("max_epochs")
        unlimited = (steps is None or steps < 0) and (epochs is None or epochs < 0)
        if scheduler in ("poly", "cosine") and unlimited and not t.get("fast_dev_run"):
            raise ConfigError(
                f"scheduler={scheduler} decays the lr over the run's length, but {stage} has no "
                "limit: set trainer.max_steps=N or trainer.max_epochs=N, or use scheduler=fixed"
            )


def make_trainer(cfg: DictConfig, stage: str, out: Path, monitor: str) -> pl.Trainer:
    ckpt_dir = out / stage / "checkpoints"
    trainer_cfg = trainer_settings(cfg, stage)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not trainer_cfg.get("enable_progress_bar", True):  # Lightning refuses a bar it may not show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks += [
        ValidationImages(int(cfg.images.panel_size), int(cfg.images.every_n_epochs)),
        HParamsTab(),
        best_checkpoint(ckpt_dir, monitor),
        last_checkpoint(ckpt_dir),
        InterruptCheckpoint(ckpt_dir),
    ]
    logger = instantiate(cfg.logger, name=stage, version="") if cfg.get("logger") else False
    return instantiate(
        trainer_cfg,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(out / stage),
        plugins=[AtomicCheckpointIO()],
    )


def format_table(metrics: Mapping[str, Any]) -> str:
    """One row per stage (and head, named when there are several) with the four metrics, in
    percent; ``metrics`` maps a stage to its results in either form (see ``contract.short_form``)."""
    rows = []
    for stage, block in metrics.items():
        heads = long_form(block)
        for head, m in heads.items():
            name = stage if list(heads) == ["out"] else f"{stage}/{head}"
            rows.append(f"{name:<18}" + "".join(f"{100 * m[k]:>11.1f}" for k in METRIC_NAMES))
    header = f"{'stage':<18}" + "".join(f"{METRIC_TITLES[k]:>11}" for k in METRIC_NAMES)
    return "\n".join([header, "-" * len(header), *rows])


def init_streams(model: Any, sources: Mapping[str, str]) -> None:
    """Start each late-fusion stream from its own trained checkpoint (the paper's RGB-HHA)."""
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
        transfer_stage(path, streams[name])


# --------------------------------------------------------------------------- train
def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json (empty if there is none); a damaged one stops with what to do."""
    try:
        metrics = read_json(path)
    except ValueError as err:
        raise ConfigError(
            f"{path} is damaged ({err}); it records which stages finished. Delete it and resume "
            "again: each stage then continues from its last.ckpt (a finished stage only "
            "re-validates its best.ckpt)"
        ) from None
    if not isinstance(metrics, dict):
        raise ConfigError(f"{path} is damaged: it holds a {type(metrics).__name__}, not stages")
    return metrics


def check_free_space(out: Path, stage: str, module: FCNModule) -> None:
    """Refuse to start a stage when the run folder's disk cannot hold its checkpoints: best and
    last (weights and optimizer state), and a temporary copy while one is written. Checkpoints
    the stage already has (a resume) will be replaced, so their room counts as free."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    ckpt = weights * (3 if module.hparams.optimizer.get("name") == "adamw" else 2)
    have = sum(p.stat().st_size for p in (out / stage / "checkpoints").glob("*.ckpt"))
    need = max(0, 2 * ckpt - have) + ckpt
    free = shutil.disk_usage(out).free
    if free < need:
        raise ConfigError(
            f"{out} has {free / 2**20:.0f} MiB free; {stage}'s checkpoints need about "
            f"{need / 2**20:.0f} MiB more. Free some space or train into a folder on a larger "
            "disk (hydra.run.dir=...)"
        )


def label_report(dm: SegmentationDataModule, splits: list[str] | None = None) -> str:
    """The label check's block; its warnings are printed in it, not again as Python warnings.
    Training labels with a single class (the rest ignored) are refused: nothing to learn, and
    the scores would read 100%."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="label check: ")
        report = dm.check_labels(splits)
    for key, split in report.splits.items():
        present = [n for n, c in zip(split.class_names, split.histogram, strict=True) if c > 0]
        if split.split == dm.train_split and splits is None and len(present) <= 1:
            hint = (
                " Masks saved as 0/255 (object = 255 = ignore)? set data.label_map={255: 1}."
                if split.ignored
                else ""
            )
            raise DataError(
                f"the training split '{key}' holds only class {present or 'none'} "
                f"({100 * split.ignored_share:.1f}% of its pixels ignored): there is nothing to "
                f"learn, and every score would read 100%.{hint}\n{report.format()}"
            )
    return report.format()


def check_inputs(cfg: DictConfig, out: Path, resume: bool) -> None:
    """The files a run will read, named now if they are missing or damaged (reads nothing
    but their size and index)."""
    init_from = cfg.arch.get("init_from")
    if init_from:
        if not Path(init_from).expanduser().is_file():
            raise ConfigError(f"arch.init_from: checkpoint not found: {init_from}")
        check_readable(init_from, "arch.init_from")
    for name, path in (cfg.arch.get("init_streams") or {}).items():
        if Path(path).expanduser().is_file():
            check_readable(path, f"arch.init_streams.{name}")
    if resume:
        read_metrics(out / "metrics.json")
        for stage in stages_for(cfg):
            for ckpt in sorted((out / stage / "checkpoints").glob("*.ckpt")):
                check_readable(ckpt, f"resume=true: {stage}")


_fitting = False


@contextlib.contextmanager
def during_fit() -> Iterator[None]:
    """Mark ``trainer.fit`` as running: SIGTERM is then Lightning's to handle (at the end of
    the step); outside it (loading data, the final validation) :func:`_on_sigterm` stops."""
    global _fitting
    _fitting = True
    try:
        yield
    finally:
        _fitting = False


def _on_sigterm(signum: int, frame: Any) -> None:
    if not _fitting:
        raise RunInterrupted(
            "stopped by SIGTERM outside training (while loading data or validating); "
            "resume=true with the same hydra.run.dir continues the run"
        )


def _step_of(path: Path) -> Any:
    try:
        return load_weights_only(path).get("global_step", "?")
    except ValueError:
        return "?"


def train(cfg: DictConfig) -> float:
    """Train the stages that ``cfg`` asks for; return the last stage's val mIoU.

    The run owns its folder (``fcn_lightning.rundir``): a folder that holds another run is
    refused unless ``resume=true``, and ``run.json`` records how the run ended."""
    out = Path(cfg.paths.output_dir)
    check_settings(cfg)
    check_inputs(cfg, out, bool(cfg.resume))  # read-only: a refused run changes nothing
    resume = rundir.claim(
        out, bool(cfg.resume), fresh_if_empty=is_multirun(), config=rundir.comparable(cfg)
    )
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    try:
        score = _train(cfg, out, resume)
    except (KeyboardInterrupt, SIGTERMException) as err:
        rundir.mark(out, "interrupted", str(err) or type(err).__name__)
        raise
    except SystemExit as err:
        interrupted = isinstance(err, RunInterrupted)
        rundir.mark(out, "interrupted" if interrupted else "failed", str(err.code))
        raise
    except BaseException as err:
        rundir.mark(out, "failed", f"{type(err).__name__}: {err}")
        raise
    else:
        rundir.mark(out, "finished", mIoU=score)
        return score
    finally:
        rundir.release()
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra sweep (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _train(cfg: DictConfig, out: Path, resume: bool) -> float:
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    stages = stages_for(cfg)
    if resume and not cfg.resume:  # a SLURM requeue: its checkpoints are checked now
        check_inputs(cfg, out, resume)
    metrics_path = out / "metrics.json"
    metrics = read_metrics(metrics_path) if resume else {}
    init_from = cfg.arch.get("init_from")
    dm = make_datamodule(cfg.data)
    dm.setup("fit")  # a missing or broken dataset fails here, before any training
    if rundir.is_rank_zero():  # every label of train / val / test, once (cached), before training
        print(label_report(dm))
    previous_best: str | None = init_from
    lr = float(cfg.optimizer.lr)
    log.info("stages: %s; run folder: %s", " -> ".join(stages), out)
    for i, stage in enumerate(stages):
        stage_lr = lr * float(cfg.stage_lr_factor) ** i
        ckpt_dir = out / stage / "checkpoints"
        best, last = ckpt_dir / "best.ckpt", ckpt_dir / "last.ckpt"
        if resume and stage in metrics and best.is_file():
            log.info(
                "[%d/%d] %s: finished before, skipped (resume=true)", i + 1, len(stages), stage
            )
            previous_best = str(best)
            continue
        first = i == 0 and not previous_best
        module = make_module(cfg, dm, stage, stage_lr, cfg.arch.pretrained if first else None)
        check_free_space(out, stage, module)
        resume_from = str(last) if resume and last.is_file() else None
        if previous_best and not resume_from:
            transfer_stage(previous_best, module.model)
        elif i == 0 and cfg.arch.get("init_streams") and not resume_from:
            init_streams(module.model, cfg.arch.init_streams)
            previous_best = "the checkpoints of arch.init_streams"
        source = (
            f"from {previous_best}"
            if previous_best
            else ("from ImageNet VGG16" if cfg.arch.pretrained else "from scratch")
        )
        log.info(
            "[%d/%d] %s: lr %.3g, %s%s", i + 1, len(stages), stage, stage_lr, source,
            f", resuming {resume_from}" if resume_from else "",
        )  # fmt: skip
        trainer = make_trainer(cfg, stage, out, module.monitor)
        resume_hint = (
            f"Continue with: python train.py <the same overrides> resume=true hydra.run.dir={out}"
        )
        stopper = next(c for c in trainer.callbacks if isinstance(c, InterruptCheckpoint))
        try:
            with during_fit():
                trainer.fit(module, dm, ckpt_path=resume_from)
        except SIGTERMException:
            cause = "was interrupted (Ctrl+C)" if stopper.ctrl_c else "stopped by SIGTERM"
            raise RunInterrupted(
                f"{stage} {cause} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                f"{last} holds that step. {resume_hint}"
            ) from None
        except NonFiniteLossError as err:
            raise SystemExit(
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
        # the stage's final state, also when no epoch ended since the last save (a short
        # max_steps, or a resume that finished mid-epoch): last.ckpt is where the stage ended
        trainer.save_checkpoint(last, weights_only=False)
        if not best.is_file():
            trainer.save_checkpoint(best, weights_only=False)  # e.g. no validation ran
        trainer.validate(module, dm, ckpt_path=str(best), verbose=False)
        metrics[stage] = short_form(module.results.get("val", {}))
        if trainer.is_global_zero:
            write_json_atomic(metrics_path, metrics)
        previous_best = str(best)
        log.info("%s done: val mIoU %.4f", stage, headline(metrics[stage]))
    table = format_table({s: metrics[s] for s in stages if s in metrics})
    print(
        "\nValidation metrics of each stage (best checkpoint):\n" + table + f"\n\nrun folder: {out}"
    )
    return headline(metrics[stages[-1]])


# --------------------------------------------------------------------------- eval
def load_module(path: Any, **overrides: Any) -> FCNModule:
    if not path:
        raise ConfigError("ckpt_path is not set: pass ckpt_path=/path/to/best.ckpt")
    try:
        return load_checkpoint(path, **overrides).eval()
    except FileNotFoundError as err:
        raise ConfigError(f"ckpt_path: {err}") from None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.data`` (its ``split``, else its val split)."""
    out = Path(cfg.output).expanduser() if cfg.get("output") else Path(cfg.paths.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"output={out} is a file; output names the folder that will hold eval.json "
            f"(e.g. output={out.parent / 'eval'})"
        )
    report_path = out / "eval.json"
    split_wanted = cfg.data.get("split") or cfg.data.get("val_split")
    if report_path.is_file():  # replace an earlier report of this evaluation only
        try:
            earlier = json.loads(report_path.read_text())
            earlier = (earlier.get("checkpoint"), earlier.get("split"), earlier.get("data_root"))
        except (ValueError, AttributeError):
            earlier = None
        if earlier != (str(cfg.ckpt_path), split_wanted, cfg.data.get("root")):
            raise ConfigError(
                f"{report_path} holds another evaluation "
                + (
                    f"({earlier[0]}, split {earlier[1]} of {earlier[2]})"
                    if earlier
                    else "(unreadable)"
                )
                + ": choose another output= folder, or move that file away"
            )
    module = load_module(
        cfg.ckpt_path, exclude_absent_classes=bool(cfg.get("exclude_absent_classes", False))
    )
    data_cfg = cfg.data.copy()
    with open_dict(data_cfg):
        split = data_cfg.pop("split", None) or data_cfg.get("val_split")
        # the checkpoint decides the normalisation its weights expect
        data_cfg.normalization = module.model.normalization.as_dict()
    dm = make_datamodule(data_cfg, val_split=split, test_split=split)  # eval reads this split alone
    heads, expected = module.contract.num_classes, dm.contract.num_classes
    if expected != heads:
        raise ConfigError(
            f"checkpoint {cfg.ckpt_path} predicts {heads} classes but data={cfg.data._target_} has {expected}"
        )
    print(label_report(dm, [split]))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.test(module, dm, verbose=False)
    results = module.results["test"]
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(cfg.ckpt_path),
        "split": split,
        "data_root": cfg.data.get("root"),
        "metrics": short_form(results),
    }
    write_json_atomic(out / "eval.json", report)
    print(format_table({f"{module.model.spec.arch} {split}": results}))
    named = {h: "" if module.contract.single else f" ({h})" for h in results}
    for head, block in results.items():
        if block.get("excluded_classes"):
            print(
                f"classes absent from this split, left out of the means{named[head]}: "
                + ", ".join(block["excluded_classes"])
            )
    for head, block in results.items():
        print(f"\nIoU per class{named[head]}:")
        for name, value in block["per_class_IoU"].items():
            print(f"  {name:<20}{'absent' if value is None else f'{100 * value:.1f}'}")
    print(f"\nwritten: {out / 'eval.json'}")
    return report
