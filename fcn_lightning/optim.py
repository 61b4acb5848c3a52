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


def schedule_factor(
    settings: Mapping[str, Any], total_steps: int, base_lr: float = 1.0
) -> Callable[[int], float]:
    """The lr at a step as a fraction of ``base_lr``, in closed form over ``total_steps``:
    a linear warm-up of ``warmup_steps`` (from ``warmup_factor``), then fixed, ``poly``
    (1 - t/T)^power or ``cosine`` down to ``min_lr`` over the remaining T steps, held at the
    end's value beyond them."""
    name = check_scheduler(settings)
    warmup = int(settings.get("warmup_steps", 0))
    start = float(settings.get("warmup_factor", 0.001))
    length = max(1, int(total_steps) - warmup)
    power = float(settings.get("power", 0.9))
    floor = float(settings.get("min_lr", 0.0)) / base_lr if base_lr else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * step / warmup
        t = min(step - warmup, length) / length
        if name == "poly":
            return (1 - t) ** power
        if name == "cosine":
            return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2
        return 1.0

    return factor


def build_scheduler(
    settings: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    total_steps: int | Callable[[], int],
) -> lr_scheduler.LambdaLR | None:
    """A per-step schedule (torch's LambdaLR over :func:`schedule_factor`, one per parameter
    group); None for a fixed lr without warm-up. ``total_steps`` (or a function asked once,
    when first needed) is not part of the scheduler's saved state: a run resumed with another
    budget follows the schedule of its new length from the step it reached."""
    name = check_scheduler(settings)
    if name == "fixed" and int(settings.get("warmup_steps", 0)) == 0:
        return None
    factors: list[Callable[[int], float]] = []

    def per_group(i: int) -> Callable[[int], float]:
        def factor(step: int) -> float:  # a function, not an object: LambdaLR does not save it
            if not factors:
                total = int(total_steps() if callable(total_steps) else total_steps)
                bases = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
                factors.extend(schedule_factor(settings, total, b) for b in bases)
            return factors[i](step)

        return factor

    return lr_scheduler.LambdaLR(
        optimizer, [per_group(i) for i in range(len(optimizer.param_groups))]
    )


def restart_schedule(scheduler: lr_scheduler.LRScheduler) -> None:
    """Set the optimizer's lrs to ``scheduler``'s for the step it reached (after a resume, whose
    optimizer state holds the lr of the schedule the run was started with)."""
    if isinstance(scheduler, lr_scheduler.LambdaLR):
        step = scheduler.last_epoch
        lrs = [b * f(step) for b, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
