"""Checks made before any work: a refused run names the setting or the file to fix while nothing
has been written."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..checkpoints import check_readable
from ..errors import ConfigError
from ..models import ARCHS, BACKBONES, GEOMETRIES, build_fcn
from ..module import FCNModule
from ..normalization import check_trunk_normalization, get_normalization
from ..optim import check_optimizer, check_scheduler
from .loggers import logger_classes
from .stages import (
    PROTOCOL_KEYS,
    STAGES,
    check_protocol,
    check_replaced,
    entry_of,
    stage_lr,
    stages_for,
    trainer_args,
    trainer_settings,
)

log = logging.getLogger("fcn_lightning")

PLAIN_TRUNKS = ("vgg16", "alexnet")  # no batch norm: made to start from ImageNet weights
PAPER_LR = 1e-4  # SGD at this lr or below (the paper's 1e-4; 1e-10 on a summed loss) fine-tunes
SCRATCH = "recipe=scratch"  # conf/recipe/scratch.yaml: the quickstart's way, for any data
FORCE_FROM_SCRATCH = "force_from_scratch"  # ++force_from_scratch=true: train it from scratch anyway


def _one_of(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_from_scratch(cfg: DictConfig) -> None:
    """Refuse a recipe made for ImageNet weights (a trunk without batch norm, SGD at the paper's
    small lr) on random weights: it would train without learning and without a word."""
    stage = stages_for(cfg)[0]
    if entry_of(cfg, 0) != "scratch" or cfg.get(FORCE_FROM_SCRATCH):
        return
    lr = stage_lr(cfg, stage, "scratch")[0]
    backbone, solver = cfg.arch.backbone, cfg.optimizer.name
    if backbone not in PLAIN_TRUNKS or solver != "sgd" or lr > PAPER_LR:
        return
    raise ConfigError(
        f"arch.pretrained=null trains {stage} on arch.backbone={backbone} (no batch norm) from "
        f"random weights with SGD at lr {lr:g}: that recipe fine-tunes ImageNet weights (the "
        "paper's), and from random weights it learns next to nothing. Train from scratch as the "
        f"quickstart does: {SCRATCH} (conf/recipe/scratch.yaml: VGG16 with batch norm, AdamW, the "
        "lr halved per stage); or keep the ImageNet weights: "
        f"arch.pretrained=imagenet; or, to run this recipe from scratch anyway: "
        f"++{FORCE_FROM_SCRATCH}=true"
    )


def model_settings(cfg: DictConfig, stage: str, pretrained: Any = None) -> dict[str, Any]:
    """A stage's model settings (FCNModule's ``model``) from ``cfg.arch``."""
    arch = cfg.arch
    return {
        "arch": stage, "backbone": arch.backbone, "geometry": arch.geometry,
        "width": float(arch.width), "pretrained": pretrained,
        "learnable_upsampling": bool(arch.learnable_upsampling), "dropout": float(arch.dropout),
        "normalization": arch.normalization, "output_stride": int(arch.get("output_stride", 32)),
        "aux_weight": float(arch.get("aux_weight") or 0.0),
    }  # fmt: skip


def check_nets(cfg: DictConfig, stages: Sequence[str]) -> None:
    """Each stage's net built on the meta device (no memory, no weights): a backbone, output
    stride, geometry or head that do not go together are named now, not after a stage trained."""
    aux, arch = float(cfg.arch.get("aux_weight") or 0.0), cfg.arch.name
    if aux < 0:
        raise ConfigError(f"arch.aux_weight={aux:g}: the auxiliary loss's weight must be >= 0")
    if aux > 0 and arch != "fcn_torchvision":
        raise ConfigError(
            f"arch.aux_weight={aux:g}: the auxiliary head is fcn_torchvision's (arch="
            f"fcn_torchvision); {arch} has none: arch.aux_weight=0"
        )
    keys = ("backbone", "output_stride", "geometry")
    where = ", ".join(f"arch.{k}={cfg.arch.get(k)}" for k in keys)
    for stage in stages:
        settings = model_settings(cfg, stage)
        del settings["aux_weight"], settings["normalization"]
        via = f"arch={arch} is trained through {stage} (staged=true): " if stage != arch else ""
        try:
            with torch.device("meta"):
                build_fcn(**settings, aux=aux > 0, num_classes=2)
        except ValueError as err:
            raise ConfigError(f"{via}{stage} on {where}: {err}") from None


def check_settings(cfg: DictConfig) -> None:
    """Settings that would fail only after the data was read or a stage was trained."""
    check_replaced(cfg)  # stage_lr_factor, stage_budget, ...: the stages node's spelling
    _one_of("arch.name", cfg.arch.name, ARCHS)
    _one_of("arch.backbone", cfg.arch.backbone, BACKBONES)
    _one_of("arch.geometry", cfg.arch.geometry, GEOMETRIES)
    _one_of("loss.reduction", cfg.loss.reduction, ("mean", "sum"))
    if not 0 < float(cfg.loss.sample_prob) <= 1:
        raise ConfigError(f"loss.sample_prob must be in (0, 1], got {cfg.loss.sample_prob}")
    try:  # the solver's settings, named as the config names them
        check_optimizer(OmegaConf.to_container(cfg.optimizer, resolve=True))
        check_scheduler(OmegaConf.to_container(cfg.scheduler, resolve=True))
        check_protocol(cfg)
        norm = cfg.arch.get("normalization") or "imagenet"
        norm = OmegaConf.to_object(norm) if isinstance(norm, ListConfig | DictConfig) else norm
        check_trunk_normalization(cfg.arch.backbone, norm)
        for name in [n for n in (norm if isinstance(norm, list) else [norm]) if isinstance(n, str)]:
            try:
                get_normalization(name)  # a scheme's name
            except ValueError as err:
                raise ValueError(f"arch.normalization: {err}") from None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_from_scratch(cfg)
    logger_classes(cfg.get("logger"))  # a logger whose package is missing: named before any work
    lr = float(cfg.optimizer.lr)
    if cfg.loss.reduction == "sum" and lr > 1e-6:
        log.warning(
            "loss.reduction=sum (the loss summed over every pixel, this recipe's choice) with "
            "optimizer.lr=%g: a summed loss needs an lr near 1e-10 (optimizer=sgd_heavy); to "
            "keep this lr set loss.reduction=mean",
            lr,
        )
    stages = stages_for(cfg)
    check_nets(cfg, stages)
    arguments = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    for stage in STAGES:  # check_protocol refused any other name
        own = trainer_args(cfg, stage)
        unknown = sorted(set(own) - arguments)
        if unknown:
            raise ConfigError(
                f"stages.{stage}.{unknown[0]} is not a Lightning Trainer argument (nor a stage "
                f"setting: {', '.join(PROTOCOL_KEYS)})"
            )
        if own and stage not in stages:
            log.warning("stages.%s.%s: this run does not train %s", stage, own[0], stage)
    scheduler = (cfg.get("scheduler") or {}).get("name", "fixed")
    decays = f"scheduler={scheduler} decays the lr over the stage's length, and "
    for i, stage in enumerate(stages):
        t = trainer_settings(cfg, stage, warn=i == 0)  # said once, before any work
        if max(t.max_steps, t.max_epochs) < 0 and not t.get("fast_dev_run"):
            raise ConfigError(
                f"{decays if scheduler in ('poly', 'cosine') else ''}{stage} has no step or epoch "
                "limit (it would train until stopped): set trainer.max_steps=N or "
                "trainer.max_epochs=N (every stage), or "
                f"stages.{stage}.max_steps=N (this stage)"
            )


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json (empty if there is none); a damaged one stops with what to do."""
    try:
        metrics = json.loads(path.read_text()) if path.is_file() else {}
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
    """Refuse a stage whose checkpoints (best, last and a temporary copy; those it has count as
    free) the run folder's disk cannot hold."""
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


def check_inputs(cfg: DictConfig, out: Path, resume: bool) -> None:
    """The files a run will read, named now if they are missing or damaged."""
    init_from, pretrained = cfg.arch.get("init_from"), cfg.arch.get("pretrained")
    if pretrained and str(pretrained) != "imagenet" and not init_from:
        if not Path(pretrained).expanduser().is_file():
            raise ConfigError(
                f"arch.pretrained: pretrained weights file not found: {pretrained} (imagenet, "
                f"null, or the path of a {cfg.arch.backbone} state dict saved with torch.save)"
            )
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
