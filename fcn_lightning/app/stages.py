"""The staged protocol (paper, section 4.2): which stages a run trains, and each stage's lr,
budget and checkpoint selection with the reason for each; docs/TRAINING.md explains the rules."""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError

log = logging.getLogger("fcn_lightning")

CHAIN = ("fcn32s", "fcn16s", "fcn8s")
STAGES = (*CHAIN, "fcn8s_atonce", "fcn_torchvision")
CUTS = ("fcn16s", "fcn8s", "fusion")
SELECTIONS = ("auto", "best", "last")
HELD_OUT = "the highest val mIoU (the val split is held out)"  # selection=auto's "best"
LIMITS = ("max_steps", "max_epochs")
PROTOCOL_KEYS = ("lr_factor", "lr", *LIMITS)
REPLACED = ("stage_lr_factor", "stage_lr", "stage_budget", "stage_overrides")
_REPLACED_HINT = {
    "stage_lr_factor": "stages.fcn16s.lr_factor=... stages.fcn8s.lr_factor=... (a late fusion of "
    "trained streams: stages.fusion.lr_factor=...)",
    "stage_lr": "stages.<stage>.lr=... (e.g. stages.fcn16s.lr=1e-5)",
    "stage_budget": "stages.<stage>.max_steps=... or stages.<stage>.max_epochs=... (e.g. "
    "stages.fcn32s.max_epochs=30; none: stages.fcn32s.max_epochs=null)",
    "stage_overrides": "++stages.<stage>.<Trainer argument>=... (e.g. "
    "++stages.fcn16s.accumulate_grad_batches=2; a budget: stages.fcn16s.max_steps=...)",
}


def settings_of(cfg: DictConfig, stage: str) -> Mapping[str, Any]:
    return (cfg.get("stages") or {}).get(stage) or {}


def stages_for(cfg: DictConfig) -> list[str]:
    """The stages to train: the chain up to ``arch.name`` when staged, else the arch alone."""
    arch = cfg.arch.name
    single = cfg.arch.get("init_from") or cfg.arch.get("init_streams") or not cfg.staged
    if single or arch not in CHAIN:
        return [arch]
    return list(CHAIN[: CHAIN.index(arch) + 1])


def entry_of(cfg: DictConfig, index: int) -> str:
    """How the run's ``index``-th stage starts: previous, init_from, init_streams, pretrained
    or scratch."""
    if index > 0:
        return "previous"
    if cfg.arch.get("init_from"):
        return "init_from"
    if cfg.arch.get("init_streams"):
        return "init_streams"
    return "pretrained" if cfg.arch.get("pretrained") else "scratch"


def cut(cfg: DictConfig, into: str) -> float:
    return float(settings_of(cfg, into)["lr_factor"])


def stage_lr(cfg: DictConfig, stage: str, entry: str) -> tuple[float, str]:
    """The stage's learning rate and why (docs/TRAINING.md, "Learning rate"): set outright, or
    the lr it starts from times each cut into it; a stage entered from the one before starts
    from that stage's lr, however that was given."""
    lr, terms = _lr_terms(cfg, stage, entry)
    if len(terms) == 1 and terms[0].startswith(f"stages.{stage}.lr "):
        return lr, f"stages.{stage}.lr"
    starts = {"pretrained": "ImageNet weights", "scratch": "scratch"}
    source = {"previous": "the stage before", "init_from": "arch.init_from",
              "init_streams": "arch.init_streams"}  # fmt: skip
    if entry in starts:
        return lr, f"{terms[0]} ({stage} starts from {starts[entry]})"
    if entry == "init_streams":
        terms[-1] += " (late fusion of trained streams)"
    return float(f"{lr:.12g}"), " x ".join(terms) + f" ({stage} from {source[entry]})"


def _lr_terms(cfg: DictConfig, stage: str, entry: str) -> tuple[float, list[str]]:
    """The stage's lr and the terms it is the product of."""
    explicit = settings_of(cfg, stage).get("lr")
    if explicit is not None:
        return float(explicit), [f"stages.{stage}.lr {float(explicit):.3g}"]
    base = float(cfg.optimizer.lr)
    if entry in ("pretrained", "scratch"):
        return base, [f"optimizer.lr {base:.3g}"]
    if stage in CHAIN[1:] and entry in ("previous", "init_from"):  # as the staged chain has it
        before = CHAIN[CHAIN.index(stage) - 1]
        lr, terms = _lr_terms(cfg, before, "init_from" if before != CHAIN[0] else "pretrained")
        return lr * cut(cfg, stage), [*terms, f"stages.{stage}.lr_factor {cut(cfg, stage):g}"]
    lr, terms = base, [f"optimizer.lr {base:.3g}"]  # a late fusion of trained streams
    cuts = list(CHAIN[1 : CHAIN.index(stage) + 1]) if stage in CHAIN else []
    for into in cuts + (["fusion"] if entry == "init_streams" else []):
        lr *= cut(cfg, into)
        terms.append(f"stages.{into}.lr_factor {cut(cfg, into):g}")
    return lr, terms


def check_lr_chain(cfg: DictConfig) -> None:
    """Each trained stage's lr at or below the chain's stage before it, unless both are set
    outright; a cut above 1 into a stage the run trains is refused."""
    trained = stages_for(cfg)
    entered = {
        s for i, s in enumerate(trained) if entry_of(cfg, i) not in ("pretrained", "scratch")
    }
    cuts = {c for c in CUTS if c in entered} | (
        {"fusion"} if cfg.arch.get("init_streams") else set()
    )
    for into in sorted(cuts):
        factor = settings_of(cfg, into).get("lr_factor")
        if factor is not None and float(factor) > 1:
            raise ConfigError(
                f"stages.{into}.lr_factor={factor} would raise the lr into {into}: a cut is at "
                f"most 1 (to train {into} faster, set stages.{into}.lr outright)"
            )
    for i, stage in enumerate(trained):
        if stage not in CHAIN[1:] or stage not in entered:
            continue
        before = CHAIN[CHAIN.index(stage) - 1]
        lr = stage_lr(cfg, stage, entry_of(cfg, i))[0]
        prior = _lr_terms(cfg, before, "init_from" if before != CHAIN[0] else "pretrained")[0]
        outright = [settings_of(cfg, s).get("lr") is not None for s in (before, stage)]
        if lr > prior * (1 + 1e-9) and not all(outright):
            raise ConfigError(
                f"stages.{stage}.lr={lr:g} is above {before}'s lr {prior:g}: a later stage trains "
                f"at or below the stage before it; set stages.{before}.lr too to mean it"
            )


def typed_limits() -> set[str]:
    """The trainer limits typed on the command line (Hydra's overrides of this launch)."""
    if not HydraConfig.initialized():
        return set()
    task = HydraConfig.get().overrides.task
    return {k for k in LIMITS for o in task if re.fullmatch(rf"\+*trainer\.{k}=.*", o)}


def budget(
    cfg: DictConfig, stage: str, typed: Collection[str] | None = None
) -> tuple[dict[str, int], str]:
    """The stage's step / epoch limits and why (docs/TRAINING.md, "Budget"). A trainer limit
    typed on the command line (``typed``; default: this launch's) replaces the preset's limits
    of either kind; -1: no limit of that kind."""
    typed = typed_limits() if typed is None else set(typed)
    trainer = {k: int(v) for k in LIMITS if (v := cfg.trainer.get(k)) is not None}
    if typed:
        trainer = {k: v for k, v in trainer.items() if k in typed}
    given = {k: v for k, v in trainer.items() if v >= 0}
    if given:
        limits = given
        where = {k: "typed" if k in typed else "the preset's" for k in given}
        why = [f"{k} {v} (trainer.{k}, {where[k]}, every stage)" for k, v in given.items()]
    else:
        own = settings_of(cfg, stage)
        limits = {k: int(v) for k in LIMITS if (v := own.get(k)) is not None}
        why = [f"{k} {v} (stages.{stage}.{k})" for k, v in limits.items()]
    if not any(v >= 0 for v in limits.values()):
        return {k: -1 for k in LIMITS}, "no step or epoch limit"
    return {k: limits.get(k, -1) for k in LIMITS}, "; ".join(why)


def trainer_settings(cfg: DictConfig, stage: str, warn: bool = False) -> DictConfig:
    """``cfg.trainer`` with the stage's own Trainer arguments and budget, ``log_every_n_steps``
    lowered for short stages; sync batch norm off on the CPU (``warn``: say so)."""
    args = trainer_args(cfg, stage)
    own = OmegaConf.masked_copy(cfg.stages[stage], args) if args else {}
    merged = OmegaConf.merge(cfg.trainer, own)
    merged.update(budget(cfg, stage)[0])
    if (steps := merged.max_steps) > 0:  # a curve of ~100 points or more: short runs every step
        merged.log_every_n_steps = min(
            int(merged.get("log_every_n_steps") or 50), max(1, steps // 100)
        )
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


def trainer_args(cfg: DictConfig, stage: str) -> list[str]:
    return [k for k in settings_of(cfg, stage) if k not in PROTOCOL_KEYS]


def selection(
    cfg: DictConfig, val_split: str, test_split: str, shared: Mapping[str, int] | None = None
) -> tuple[str, str]:
    """How ``best.ckpt`` is chosen, ``best`` or ``last``, and why (docs/TRAINING.md, "Checkpoint
    selection"): the val split may choose only when it is held out: another split than the one
    the run reports, sharing no image (``shared``: its images in the train / test split)."""
    shared = {k: n for k, n in (shared or {}).items() if n}
    held_out = test_split != val_split and not shared
    if test_split == val_split:
        why_not = (
            f"the val split '{val_split}' is the split this run reports; to choose checkpoints "
            "on a held-out split set data.val_split=<it> data.test_split=<the reported split>"
        )
    else:
        why_not = f"the val split '{val_split}' is not held out: " + ", ".join(
            f"it shares {n} image{'s' * (n > 1)} with the {k} split" for k, n in shared.items()
        )
    mode = str(cfg.get("selection", "auto"))
    if mode == "best":
        return "best", "selection=best: the highest val mIoU" + (
            "" if held_out else f" (note: {why_not})"
        )
    if mode == "last":
        return "last", "selection=last: the stage's last checkpoint (a fixed schedule)"
    if held_out:
        return "best", HELD_OUT
    return "last", f"the stage's last checkpoint, a fixed schedule: {why_not}"


def _new_spelling(key: str, value: Any) -> str | None:
    """The stages-node overrides that set what the old dotted ``key`` set to ``value`` (each leaf
    of a mapping); None where it does not say which stage."""
    if isinstance(value, Mapping | DictConfig) and value:
        spellings = [_new_spelling(f"{key}.{k}", v) for k, v in value.items()]
        return None if None in spellings else " ".join(spellings)
    head, *rest = key.split(".")
    if isinstance(value, Mapping | DictConfig) or value is None:
        return None
    if head == "stage_lr_factor":
        return " ".join(f"stages.{c}.lr_factor={value}" for c in (rest[:1] or CUTS))
    if head == "stage_lr" and len(rest) == 1:
        return f"stages.{rest[0]}.lr={value}"
    if head in ("stage_budget", "stage_overrides") and len(rest) == 2:
        plus = "" if rest[1] in LIMITS else "++"
        return f"{plus}stages.{rest[0]}.{rest[1]}={value}"
    return None


def check_replaced(given: Mapping[str, Any]) -> None:
    """Refuse the keys the stages node replaced (``given``: top-level keys and their values)
    with the new spelling."""
    for key in given:  # the values of other keys are not read (nor resolved)
        name = str(key).lstrip("+~")
        head = name.split(".")[0]
        if head in REPLACED:
            use = _new_spelling(name, given[key]) or _REPLACED_HINT[head]
            raise ConfigError(f"{head} was replaced: use {use}")


def check_protocol(cfg: DictConfig) -> None:
    """The protocol's own settings; raises ``ValueError`` naming the key."""
    node = cfg.get("stages")
    if not isinstance(node, Mapping | DictConfig):
        raise ValueError(
            f"stages must map each stage to its settings (e.g. stages.fcn16s.lr_factor=0.01), "
            f"got {node!r}"
        )
    for name, settings in node.items():
        if name not in (*STAGES, "fusion"):
            raise ValueError(
                f"stages.{name}: no stage is called {name!r} (stages: {', '.join(STAGES)}; "
                "fusion: the lr cut of a late fusion)"
            )
        if not isinstance(settings, Mapping | DictConfig):
            raise ValueError(
                f"stages.{name} must map settings to values (e.g. stages.{name}.max_steps=1000), "
                f"got {settings!r}"
            )
        for key, value in settings.items():
            where = f"stages.{name}.{key}"
            if name == "fusion" and key != "lr_factor":
                raise ValueError(f"{where}: stages.fusion holds the lr cut of a late fusion only "
                                 "(stages.fusion.lr_factor)")  # fmt: skip
            if key == "lr_factor" and name not in CUTS:
                raise ValueError(
                    f"{where}: no cut leads into {name} (cuts: {', '.join(CUTS)}); its lr "
                    f"outright: stages.{name}.lr"
                )
            if key in ("lr_factor", "lr") and value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise ValueError(f"{where} must be a number > 0, got {value!r}")
            if key in LIMITS and value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(
                        f"{where} must be a whole number >= 0 (or null: none), got {value!r}"
                    )
    for into in CUTS:
        if settings_of(cfg, into).get("lr_factor") is None:
            raise ValueError(
                f"stages.{into}.lr_factor is not set: the lr cut into {into} (the paper's: 0.01)"
            )
    mode = cfg.get("selection", "auto")
    if mode not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {mode!r}")
    check_lr_chain(cfg)
