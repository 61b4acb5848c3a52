"""Optimizer and learning-rate schedule from plain settings, with torch's own classes. As the
paper's SGD (section 4.3), biases get ``bias_lr_factor`` times the lr and no weight decay; the
groups are named ``weights`` and ``biases`` (TensorBoard's ``lr-SGD/weights``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
SCHEDULERS = ("fixed", "poly", "cosine")
COMMON_KEYS = {"name", "lr", "weight_decay", "bias_lr_factor", "bias_weight_decay"}
OWN_KEYS = {
    "sgd": {"momentum", "nesterov", "dampening", "foreach", "fused", "maximize"},
    "adamw": {"betas", "eps", "amsgrad", "foreach", "fused", "maximize"},
}
SCHEDULER_KEYS = {
    "fixed": {"name", "warmup_steps", "warmup_factor"},
    "poly": {"name", "power", "warmup_steps", "warmup_factor"},
    "cosine": {"name", "min_lr", "warmup_steps", "warmup_factor"},
}


def check_optimizer(settings: Mapping[str, Any]) -> tuple[type[torch.optim.Optimizer], dict]:
    """The optimizer class and its settings (without ``name``), checked; a bad name, key or
    learning rate is refused with the setting named."""
    opt = dict(settings)
    name = opt.pop("name", "sgd")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    cls = OPTIMIZERS[name]
    allowed = OWN_KEYS[name] | COMMON_KEYS
    unknown = sorted(set(opt) - allowed)
    if unknown:
        raise ValueError(
            f"optimizer.{unknown[0]} is not a setting of {cls.__name__} (it takes "
            f"{sorted(allowed - {'name'})})"
        )
    try:
        lr = float(opt.get("lr", "missing"))
    except (TypeError, ValueError):
        raise ValueError(f"optimizer.lr must be a number, got {opt.get('lr')!r}") from None
    if not lr > 0 or math.isinf(lr):
        raise ValueError(f"optimizer.lr must be a positive number, got {lr}")
    for key in ("weight_decay", "bias_lr_factor", "bias_weight_decay", "momentum"):
        if key in opt and opt[key] is not None and float(opt[key]) < 0:
            raise ValueError(f"optimizer.{key} must be >= 0, got {opt[key]}")
    if name == "sgd":
        opt.setdefault("momentum", 0.9)
    if opt.get("betas") is not None:
        opt["betas"] = tuple(opt["betas"])
    return cls, opt


def check_scheduler(settings: Mapping[str, Any]) -> str:
    """The scheduler's name, checked with its keys."""
    name = settings.get("name", "fixed")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler.name must be one of {SCHEDULERS}, got {name!r}")
    unknown = sorted(set(settings) - SCHEDULER_KEYS[name])
    if unknown:
        raise ValueError(f"scheduler.{unknown[0]} is not a setting of scheduler={name}")
    return name


def build_optimizer(
    settings: Mapping[str, Any], groups: Mapping[str, list[nn.Parameter]]
) -> torch.optim.Optimizer:
    """The optimizer over a model's ``{"weight": [...], "bias": [...]}`` parameter groups."""
    cls, opt = check_optimizer(settings)
    lr = float(opt.pop("lr"))
    wd = float(opt.pop("weight_decay", 0.0))
    bias_lr = float(opt.pop("bias_lr_factor", 2.0))
    bias_wd = float(opt.pop("bias_weight_decay", 0.0))
    param_groups = [
        {"params": groups["weight"], "lr": lr, "weight_decay": wd, "name": "weights"},
        {"params": groups["bias"], "lr": lr * bias_lr, "weight_decay": bias_wd, "name": "biases"},
    ]
    return cls(param_groups, lr=lr, **opt)


def build_scheduler(
    settings: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    total_steps: int | Callable[[], int],
) -> lr_scheduler.LRScheduler | None:
    """A per-step schedule over ``total_steps`` (or a function asked only when needed); None
    for a fixed lr without warm-up. ``warmup_steps`` puts a LinearLR in front."""
    name = check_scheduler(settings)
    warmup = int(settings.get("warmup_steps", 0))
    if name == "fixed" and warmup == 0:
        return None
    total = max(1, int(total_steps() if callable(total_steps) else total_steps) - warmup)
    if name == "poly":
        main = lr_scheduler.PolynomialLR(
            optimizer, total_iters=total, power=float(settings.get("power", 0.9))
        )
    elif name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total, eta_min=float(settings.get("min_lr", 0.0))
        )
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    start = lr_scheduler.LinearLR(
        optimizer, start_factor=float(settings.get("warmup_factor", 0.001)), total_iters=warmup
    )
    return lr_scheduler.SequentialLR(optimizer, [start, main], milestones=[warmup])
