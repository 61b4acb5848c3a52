"""The staged protocol (paper, section 4.2): which stages a run trains, and for each stage its
learning rate, its budget and how its checkpoint is chosen, with the reason for each.

A stage's learning rate depends on the stage, not on how the run reached it: FCN-16s started
from an FCN-32s checkpoint (``arch.init_from``) gets the lr it gets after FCN-32s in a staged
run, and a resumed stage the lr it had. Its budget is ``trainer.max_steps`` /
``max_epochs`` when one is set (the same for every stage), else the stage's own
``stage_budget``, so a preset's per-stage budget never beats a limit given on the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fcn_lightning")

CHAIN = ("fcn32s", "fcn16s", "fcn8s")
STAGES = (*CHAIN, "fcn8s_atonce")
# the lr cuts stage_lr_factor may name: entering fcn16s, entering fcn8s, fusing trained streams
CUTS = ("fcn16s", "fcn8s", "fusion")
SELECTIONS = ("auto", "best", "last")
LIMITS = ("max_steps", "max_epochs")


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


def entry_of(cfg: DictConfig, index: int) -> str:
    """How the run's ``index``-th stage starts: ``previous`` (the stage before it in this
    run), ``init_from``, ``init_streams`` (a late fusion of trained single-input nets),
    ``pretrained`` (ImageNet or a local trunk file) or ``scratch``."""
    if index > 0:
        return "previous"
    if cfg.arch.get("init_from"):
        return "init_from"
    if cfg.arch.get("init_streams"):
        return "init_streams"
    return "pretrained" if cfg.arch.get("pretrained") else "scratch"


def _cut(cfg: DictConfig, into: str) -> float:
    factor = cfg.stage_lr_factor
    if isinstance(factor, Mapping | DictConfig):
        return float(factor.get(into, 1.0))
    return float(factor)


def _factor_name(cfg: DictConfig, into: str) -> str:
    factor = cfg.stage_lr_factor
    return (
        f"stage_lr_factor.{into}" if isinstance(factor, Mapping | DictConfig) else "stage_lr_factor"
    )


def stage_lr(cfg: DictConfig, stage: str, entry: str) -> tuple[float, str]:
    """The stage's learning rate and why. ``stage_lr.<stage>`` wins outright. A stage that
    starts from trained FCN weights (the previous stage, ``arch.init_from``, a resume of
    either) has the lr its place in the chain gives: ``optimizer.lr`` for FCN-32s, times the
    cut into FCN-16s, times the cut into FCN-8s; a late fusion of trained streams one cut more
    (``fusion``). A stage that starts from ImageNet or from scratch has ``optimizer.lr``."""
    explicit = (cfg.get("stage_lr") or {}).get(stage)
    if explicit is not None:
        return float(explicit), f"stage_lr.{stage}"
    lr, why = float(cfg.optimizer.lr), [f"optimizer.lr {float(cfg.optimizer.lr):.3g}"]
    if entry in ("pretrained", "scratch"):
        start = "ImageNet weights" if entry == "pretrained" else "scratch"
        return lr, f"{why[0]} ({stage} starts from {start})"
    if stage in CHAIN:
        for into in CHAIN[1 : CHAIN.index(stage) + 1]:
            lr *= _cut(cfg, into)
            why.append(f"{_factor_name(cfg, into)} {_cut(cfg, into):g} into {into}")
    if entry == "init_streams":
        lr *= _cut(cfg, "fusion")
        why.append(
            f"{_factor_name(cfg, 'fusion')} {_cut(cfg, 'fusion'):g} (late fusion of trained streams)"
        )
    source = {"previous": "the stage before", "init_from": "arch.init_from"}.get(
        entry, "arch.init_streams"
    )
    return float(f"{lr:.12g}"), " x ".join(why) + f" ({stage} from {source})"


def budget(cfg: DictConfig, stage: str) -> tuple[dict[str, int], str]:
    """The stage's step / epoch limits and why, highest precedence first:
    ``stage_overrides.<stage>.max_steps`` (one stage, as given); ``trainer.max_steps`` /
    ``max_epochs`` when either is set (>= 0): the same limit for every stage; else the stage's
    ``stage_budget.<stage>`` (the presets' per-stage budgets, e.g. FCN-32s three times as long
    as FCN-16s and FCN-8s, as the paper trained)."""
    override = (cfg.get("stage_overrides") or {}).get(stage) or {}
    given = {k: int(v) for k in LIMITS if (v := cfg.trainer.get(k)) is not None and int(v) >= 0}
    own = ((cfg.get("stage_budget") or {}).get(stage)) or {}
    limits, why = {}, []
    if given:
        limits.update(given)
        why += [f"{k} {v} (trainer.{k}, every stage)" for k, v in given.items()]
    else:
        limits.update({k: int(v) for k, v in own.items()})
        why += [f"{k} {v} (stage_budget.{stage}.{k})" for k, v in own.items()]
    for key in LIMITS:
        if key in override:
            limits[key] = int(override[key])
            why = [w for w in why if not w.startswith(key)]
            why.append(f"{key} {limits[key]} (stage_overrides.{stage}.{key})")
    if not any(v >= 0 for v in limits.values()):
        return {k: -1 for k in LIMITS}, "no step or epoch limit"
    return {k: limits.get(k, -1) for k in LIMITS}, "; ".join(why)


def trainer_settings(cfg: DictConfig, stage: str, warn: bool = False) -> DictConfig:
    """``cfg.trainer`` with the stage's budget and ``stage_overrides``, made workable: sync
    batch norm only where it works (GPUs); ``warn`` says so when it turns it off."""
    merged = OmegaConf.merge(cfg.trainer, (cfg.get("stage_overrides") or {}).get(stage) or {})
    merged.update(budget(cfg, stage)[0])
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


def selection(cfg: DictConfig, held_out: bool, why_not: str) -> tuple[str, str]:
    """How ``best.ckpt`` is chosen: ``best`` (the highest val mIoU over the stage's validations)
    or ``last`` (the stage's final weights: a fixed schedule, as the reference's fixed iteration
    counts). ``auto`` picks ``best`` only where validation data is held out, neither trained on
    nor the split the run reports; ``why_not`` says why it is not."""
    mode = str(cfg.get("selection", "auto"))
    if mode == "best":
        return "best", "selection=best: the highest val mIoU" + (
            f" (note: {why_not})" if not held_out else ""
        )
    if mode == "last":
        return "last", "selection=last: the stage's last checkpoint (a fixed schedule)"
    if held_out:
        return "best", "the highest val mIoU (the val split is held out)"
    return "last", f"the stage's last checkpoint, a fixed schedule: {why_not}"


def check_protocol(cfg: DictConfig) -> None:
    """The protocol's own settings; raises ``ValueError`` naming the key."""
    factor = cfg.get("stage_lr_factor", 1.0)
    factors = factor.items() if isinstance(factor, Mapping | DictConfig) else [(None, factor)]
    for key, value in factors:
        name = "stage_lr_factor" + (f".{key}" if key is not None else "")
        if key is not None and key not in CUTS:
            raise ValueError(f"{name}: no cut is called {key!r} (cuts: {', '.join(CUTS)})")
        if not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    for group in ("stage_lr", "stage_budget"):
        for key, value in (cfg.get(group) or {}).items():
            if key not in STAGES:
                raise ValueError(
                    f"{group}.{key}: no stage is called {key!r} (stages: {', '.join(STAGES)})"
                )
            if group == "stage_lr" and (not isinstance(value, int | float) or value <= 0):
                raise ValueError(f"stage_lr.{key} must be a number > 0, got {value!r}")
            if group == "stage_budget":
                value = value if isinstance(value, Mapping | DictConfig) else {None: value}
                for limit, n in value.items():
                    if limit not in LIMITS or not isinstance(n, int) or n <= 0:
                        raise ValueError(
                            f"stage_budget.{key} must map max_steps or max_epochs to a whole "
                            f"number > 0 (e.g. stage_budget.{key}.max_steps=1000), got "
                            f"{OmegaConf.to_container(value) if isinstance(value, DictConfig) else value!r}"
                        )
    mode = cfg.get("selection", "auto")
    if mode not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {mode!r}")
