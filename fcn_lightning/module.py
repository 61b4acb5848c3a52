"""The FCN LightningModule: loss, solver, metrics and TensorBoard panels (REFERENCE sections 2, 4).

Hyper-parameters are plain values only (numbers, strings, lists, dicts), so checkpoints load
under ``torch.load(weights_only=True)`` and the model can be rebuilt from a checkpoint alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from .checkpoints import load_weights_only
from .data.base import voc_palette
from .metrics import IGNORE_INDEX, ConfusionJaccardIndex, PixelAccuracy, scores_from_confmat
from .models import build_fcn, get_normalization

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("fixed", "poly", "cosine")
SPLITS = ("val", "test")


def plain(value: Any) -> Any:
    """DictConfig / ListConfig / tuples -> plain dicts and lists (checkpoint-safe hparams)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class HeadMetrics(nn.Module):
    """Mean IoU (torchmetrics) and pixel accuracy (our Metric) of one head and split."""

    def __init__(self, num_classes: int, exclude_absent: bool = False) -> None:
        super().__init__()
        self.exclude_absent = exclude_absent
        self.jaccard = ConfusionJaccardIndex(num_classes)
        self.pixel_acc = PixelAccuracy()

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.jaccard.update(preds, target)
        self.pixel_acc.update(preds, target)

    def compute(self) -> dict[str, torch.Tensor]:
        with (
            self.jaccard.sync_context()
        ):  # under DDP: the confusion matrices of all processes summed
            confmat = self.jaccard.confmat.clone()
        scores = scores_from_confmat(confmat, self.exclude_absent)
        if not self.exclude_absent:
            scores["mIoU"] = self.jaccard.compute()  # torchmetrics' macro IoU (== nanmean of IU)
        scores["pixel_acc"] = self.pixel_acc.compute()
        scores["confmat"] = confmat
        return scores

    def reset(self) -> None:
        self.jaccard.reset()
        self.pixel_acc.reset()


class FCNModule(pl.LightningModule):
    """An FCN with the paper's per-pixel cross-entropy and SGD solver.

    Args:
        model: keyword arguments of :func:`fcn_lightning.models.build_fcn` (arch, num_classes or
            heads, backbone, geometry, width, pretrained, in_channels, ...).
        loss_reduction: ``mean`` over labelled pixels (lr ~1e-4) or ``sum`` (the reference's
            "heavy" recipe: lr 1e-10 / 1e-12 / 1e-14, momentum 0.99, batch 1).
        class_weights: optional per-class loss weights (one list per head for several heads).
        loss_sample_prob: the paper's loss sampling (section 3.4): each pixel's loss is kept with
            this probability during training.
        optimizer: ``name`` (sgd | adamw), ``lr``, ``momentum``, ``nesterov``, ``weight_decay``,
            ``betas``, ``bias_lr_factor`` (2: biases at twice the lr), ``bias_weight_decay`` (0).
        scheduler: ``name`` (fixed | poly | cosine), ``power`` (poly), ``warmup_steps``,
            ``warmup_factor``, ``min_lr`` (cosine).
        class_names / palette: per head, for per-class tags and the image panels.
        channels_last / compile: GPU speed switches (channels_last memory format; torch.compile
            of the model with this mode: default, reduce-overhead, max-autotune); ignored on CPU.
        panel_size: images in the fixed validation panel; ``log_images_every_n_epochs``: how often
            the panel and the confusion matrix are drawn (0 = never).
        exclude_absent_classes: leave classes absent from the evaluated ground truth out of the
            means (the paper's SIFT Flow caveat); the results then list them as excluded.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        *,
        loss_reduction: str = "mean",
        class_weights: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
        loss_sample_prob: float = 1.0,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        panel_size: int = 4,
        log_images_every_n_epochs: int = 1,
        exclude_absent_classes: bool = False,
        channels_last: bool = False,
        compile: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "model": plain(model),
                "loss_reduction": loss_reduction,
                "class_weights": plain(class_weights),
                "loss_sample_prob": loss_sample_prob,
                "optimizer": plain(optimizer or {"name": "sgd", "lr": 1e-4}),
                "scheduler": plain(scheduler or {"name": "fixed"}),
                "class_names": plain(class_names),
                "palette": plain(palette),
                "panel_size": panel_size,
                "log_images_every_n_epochs": log_images_every_n_epochs,
                "exclude_absent_classes": exclude_absent_classes,
                "channels_last": channels_last,
                "compile": compile,
            }
        )
        optimizer_class(self.hparams.optimizer)  # a bad solver setting fails now, not at fit
        scheduler_name = self.hparams.scheduler.get("name", "fixed")
        if scheduler_name not in SCHEDULERS:
            raise ValueError(f"scheduler.name must be one of {SCHEDULERS}, got {scheduler_name!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not 0 < loss_sample_prob <= 1:
            raise ValueError(f"loss_sample_prob must be in (0, 1], got {loss_sample_prob}")
        self.model = build_fcn(**self.hparams.model)
        self.heads = {name: n for name, n in self.model.spec.heads}
        self.single = list(self.heads) == ["out"]
        weights = self.hparams.class_weights
        for name, n in self.heads.items():
            w = (
                (weights.get(name) if isinstance(weights, Mapping) else weights)
                if weights is not None
                else None
            )
            if w is not None and len(w) != n:
                raise ValueError(
                    f"class_weights for head {name!r} has {len(w)} entries, the head has {n} classes"
                )
            self.register_buffer(
                f"class_weight_{name}",
                torch.tensor(w, dtype=torch.float32) if w is not None else None,
                persistent=False,
            )
        self.metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict(
                    {name: HeadMetrics(n, exclude_absent_classes) for name, n in self.heads.items()}
                )
                for split in SPLITS
            }
        )
        self._panel: list[
            tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]
        ] = []
        self.final_metrics: dict[str, dict[str, Any]] = {}
        self._val_runs = 0  # validation runs so far (not sanity checks): when to draw panels

    # --------------------------------------------------------------------- naming
    def tag(self, split: str, head: str, name: str) -> str:
        return f"{split}/{name}" if self.single else f"{split}/{head}/{name}"

    @property
    def monitor(self) -> str:
        """The metric that picks the best checkpoint: val mIoU (of the first head)."""
        return self.tag("val", next(iter(self.heads)), "mIoU")

    def class_names_of(self, head: str) -> list[str]:
        names = self.hparams.class_names
        if isinstance(names, Mapping):
            names = names.get(head)
        return list(names) if names else [str(i) for i in range(self.heads[head])]

    def _targets(
        self, target: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if isinstance(target, Mapping):
            return dict(target)
        if not self.single:
            raise ValueError(
                f"this model has heads {list(self.heads)} but the data gives one label map"
            )
        return {"out": target}

    # --------------------------------------------------------------------- forward and loss
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    # --------------------------------------------------------------------- speed switches
    _channels_last = False

    def configure_model(self) -> None:
        """channels_last and torch.compile, on a GPU only: on the CPU neither helps."""
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if self.hparams.channels_last and on_gpu and not self._channels_last:
            self.model.to(memory_format=torch.channels_last)
            self._channels_last = True
        if self.hparams.compile and on_gpu and not getattr(self, "_compiled", False):
            self.model.compile(
                mode=None if self.hparams.compile == "default" else self.hparams.compile
            )
            self._compiled = True  # in place: parameter names and checkpoints are unchanged

    def loss(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        sample: bool = False,
    ) -> torch.Tensor:
        """Per-pixel cross-entropy over labelled pixels, summed over heads."""
        total = logits[next(iter(logits))].new_zeros(())
        for name, out in logits.items():
            target = targets[name]
            weight = getattr(self, f"class_weight_{name}")
            pixel = F.cross_entropy(
                out.float(), target, weight=weight, ignore_index=IGNORE_INDEX, reduction="none"
            )
            keep = target != IGNORE_INDEX
            if sample and self.hparams.loss_sample_prob < 1:
                keep = keep & (torch.rand_like(pixel) < self.hparams.loss_sample_prob)
            w = keep.to(pixel.dtype)
            if weight is not None:
                w = w * weight[target.clamp(max=len(weight) - 1)]
            loss = (pixel * keep).sum()
            if self.hparams.loss_reduction == "mean":
                loss = loss / w.sum().clamp(min=1e-12)
            total = total + loss
        return total

    # --------------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, target = batch
        targets = self._targets(target)
        loss = self.loss(self(images), targets, sample=True)
        if not torch.isfinite(loss):  # one host sync per step: cheap next to a lost run
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(batch {batch_idx}): training stopped before this step changed the weights; the last "
                "good checkpoint is kept. Lower optimizer.lr (a summed loss needs ~1e-10), or check the data."
            )
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            batch_size=images.shape[0],
        )
        return loss

    def _eval_step(self, split: str, batch, batch_idx: int) -> None:
        images, target = batch
        targets = self._targets(target)
        logits = self(images)
        loss = self.loss(logits, targets)
        self.log(f"{split}/loss", loss, on_epoch=True, batch_size=images.shape[0], sync_dist=True)
        for name, out in logits.items():
            self.metrics[split][name].update(out.argmax(1), targets[name])
        if (
            split == "val"
            and len(self._panel) < self.hparams.panel_size
            and self._draw_images_now()
        ):
            for i in range(min(images.shape[0], self.hparams.panel_size - len(self._panel))):
                self._panel.append(
                    (
                        images[i].detach().cpu(),
                        {k: v[i].cpu() for k, v in targets.items()},
                        {k: v[i].argmax(0).cpu() for k, v in logits.items()},
                    )
                )

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def predict_step(
        self, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return {k: v.argmax(1) for k, v in self(images).items()}

    # --------------------------------------------------------------------- epoch ends
    def _draw_images_now(self) -> bool:
        """Draw on the 1st, (n+1)th, (2n+1)th... validation run. Runs are counted, not epoch
        indices: with ``check_val_every_n_epoch=4`` validation follows epochs 3, 7, 11, and an
        epoch-index rule (``epoch % 4 == 0``) would never draw."""
        n = self.hparams.log_images_every_n_epochs
        return bool(n) and self._val_runs % n == 0 and not self.trainer.sanity_checking

    def _end_epoch(self, split: str) -> None:
        results: dict[str, Any] = {}
        for name, metric in self.metrics[split].items():
            scores = metric.compute()
            metric.reset()
            for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
                self.log(
                    self.tag(split, name, key),
                    scores[key].float(),
                    prog_bar=key == "mIoU" and split == "val",
                )
            names = self.class_names_of(name)
            per_class = scores["per_class_IoU"]
            for cls, value in zip(names, per_class.tolist(), strict=False):
                if not math.isnan(value):
                    self.log(self.tag(split, name, f"IoU/{cls}"), value)
            results[name] = {
                **{k: float(scores[k]) for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU")},
                "per_class_IoU": {
                    c: (None if math.isnan(v) else v)
                    for c, v in zip(names, per_class.tolist(), strict=False)
                },
            }
            if self.hparams.exclude_absent_classes:
                absent = (scores["confmat"].sum(1) == 0).tolist()
                results[name]["excluded_classes"] = [
                    c for c, a in zip(names, absent, strict=False) if a
                ]
            if split == "val" and self._draw_images_now():
                self._log_image(
                    self.tag(split, name, "confusion_matrix"), confusion_image(scores["confmat"])
                )
        if split == "val" and not self.trainer.sanity_checking:
            first = results[next(iter(self.heads))]
            for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
                self.log(f"hp/{key}", first[key])
        if not self.trainer.sanity_checking:
            self.final_metrics[split] = results if not self.single else results["out"]

    def on_validation_epoch_start(self) -> None:
        self._panel = []

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")
        if self._panel:
            for head in self.heads:
                rows = [self._panel_row(img, gt[head], pred[head]) for img, gt, pred in self._panel]
                self._log_image(self.tag("val", head, "predictions"), stack_rows(rows))
            self._panel = []
        if not self.trainer.sanity_checking:
            self._val_runs += 1

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    # --------------------------------------------------------------------- images
    def _log_image(self, tag: str, image: torch.Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if (
            experiment is not None
            and hasattr(experiment, "add_image")
            and self.trainer.is_global_zero
        ):
            experiment.add_image(tag, image, self.global_step, dataformats="CHW")

    def _panel_row(self, image: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """input | ground truth | prediction, uint8 (3, H, 3W), in the dataset's palette."""
        norm = get_normalization(self.model.normalization)
        if image.shape[0] < 3:  # depth only: show it as grey levels
            d = image[:1].float()
            d = (d - d.min()) / (d.max() - d.min()).clamp(min=1e-6)
            rgb = d.expand(3, -1, -1).mul(255).to(torch.uint8)
            return torch.cat([rgb, self._colour(gt), self._colour(pred)], dim=2)
        x = image[:3].float()
        if norm.bgr:
            x = x.flip(0)
        mean = torch.tensor(norm.mean).view(3, 1, 1)
        std = torch.tensor(norm.std).view(3, 1, 1)
        if norm.bgr:
            mean, std = mean.flip(0), std.flip(0)
        rgb = ((x * std + mean) / norm.scale).clamp(0, 1).mul(255).to(torch.uint8)
        return torch.cat([rgb, self._colour(gt), self._colour(pred)], dim=2)

    def _colour(self, label: torch.Tensor) -> torch.Tensor:
        """Class indices -> uint8 (3, H, W) in the dataset's palette; ignored pixels white."""
        palette = torch.tensor(self.hparams.palette or voc_palette(), dtype=torch.uint8)
        if palette.shape[0] < 256:
            fill = torch.full((256 - palette.shape[0], 3), 255, dtype=torch.uint8)
            palette = torch.cat([palette, fill])
        palette[IGNORE_INDEX] = torch.tensor([255, 255, 255], dtype=torch.uint8)
        return palette[label.long().clamp(0, 255)].permute(2, 0, 1)

    # --------------------------------------------------------------------- random state
    # Saved with every checkpoint so that a resumed run draws the same dropout masks and loss
    # samples as an uninterrupted one (data order and augmentation are seeded per sample).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        version, state, gauss = random.getstate()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "python": {"version": version, "state": list(state), "gauss": gauss},
        }
        checkpoint["validation_runs"] = self._val_runs

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._val_runs = int(checkpoint.get("validation_runs", 0))
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            py = states["python"]
            random.setstate((py["version"], tuple(py["state"]), py["gauss"]))

    # --------------------------------------------------------------------- TensorBoard HParams
    def on_fit_start(self) -> None:
        if self.logger is not None and hasattr(self.logger, "log_hyperparams"):
            metrics = {f"hp/{k}": 0.0 for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU")}
            self.logger.log_hyperparams(flat_hparams(self.hparams), metrics)

    # --------------------------------------------------------------------- solver
    def configure_optimizers(self):
        cls, opt = optimizer_class(self.hparams.optimizer)
        lr = float(opt.pop("lr"))
        wd = float(opt.pop("weight_decay", 0.0))
        bias_lr = float(opt.pop("bias_lr_factor", 2.0))
        bias_wd = float(opt.pop("bias_weight_decay", 0.0))
        groups = self.model.parameter_groups()
        param_groups = [
            {"params": groups["weight"], "lr": lr, "weight_decay": wd},
            {"params": groups["bias"], "lr": lr * bias_lr, "weight_decay": bias_wd},
        ]
        optimizer = cls(param_groups, lr=lr, **opt)
        scheduler = self._scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _scheduler(self, optimizer: torch.optim.Optimizer):
        cfg = dict(self.hparams.scheduler)
        name = cfg.get("name", "fixed")
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler.name must be one of {SCHEDULERS}, got {name!r}")
        warmup = int(cfg.get("warmup_steps", 0))
        if name == "fixed" and warmup == 0:
            return None
        total = max(1, int(self.trainer.estimated_stepping_batches) - warmup)
        if name == "poly":
            power = float(cfg.get("power", 0.9))
            main = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: max(0.0, 1 - step / total) ** power
            )
        elif name == "cosine":
            main = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=total, eta_min=float(cfg.get("min_lr", 0.0))
            )
        else:
            main = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        if warmup == 0:
            return main
        start = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=float(cfg.get("warmup_factor", 0.001)), total_iters=warmup
        )
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [start, main], milestones=[warmup])


COMMON_OPTIMIZER_KEYS = {"name", "lr", "weight_decay", "bias_lr_factor", "bias_weight_decay"}
OPTIMIZER_KEYS = {
    "sgd": {"momentum", "nesterov", "dampening", "foreach", "fused", "maximize"},
    "adamw": {"betas", "eps", "amsgrad", "foreach", "fused", "maximize"},
}


def optimizer_class(settings: Mapping[str, Any]) -> tuple[type[torch.optim.Optimizer], dict]:
    """The optimizer class and its settings (without ``name``), checked: an unknown name or
    key, or a learning rate that is not a positive number, is refused with the setting named."""
    opt = dict(settings)
    name = opt.pop("name", "sgd")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {name!r}")
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    allowed = OPTIMIZER_KEYS[name] | COMMON_OPTIMIZER_KEYS
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


def flat_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested hparams as flat ``a/b`` keys of scalars, as TensorBoard's HParams tab wants them."""
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}/"))
        elif isinstance(value, list | tuple):
            if len(value) <= 8:
                out[name] = str(value)
        else:
            out[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def stack_rows(rows: Sequence[torch.Tensor], fill: int = 0) -> torch.Tensor:
    """Panel rows of any widths and heights, one under the other: each row is padded on the
    right with ``fill`` to the widest row (padded, not resized, so every pixel stays the image's
    own and the label colours stay exact). Validation images come whole and of their own size
    (PASCAL VOC mixes 500x375 and 375x500)."""
    width = max(r.shape[-1] for r in rows)
    return torch.cat([F.pad(r, (0, width - r.shape[-1]), value=fill) for r in rows], dim=1)


def confusion_image(confmat: torch.Tensor, cell: int = 12) -> torch.Tensor:
    """Row-normalised confusion matrix as a uint8 (3, n*cell, n*cell) heat map (rows = truth)."""
    hist = confmat.double().cpu()
    rows = hist / hist.sum(1, keepdim=True).clamp(min=1)
    v = (rows * 255).round().to(torch.uint8)
    heat = torch.stack([v, (v.float() * 0.6).to(torch.uint8), 255 - v])  # blue (0) -> red (1)
    return heat.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", **overrides: Any
) -> FCNModule:
    """Rebuild an :class:`FCNModule` from a checkpoint alone (``weights_only`` loading); the
    trunk's pretrained weights are not fetched again, the checkpoint holds them. ``overrides``
    replace hyper-parameters that do not change the weights (e.g. ``exclude_absent_classes``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load_weights_only(path, map_location)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not a checkpoint written by fcn-lightning (no hyper_parameters / state_dict)"
        )
    hparams = dict(ckpt["hyper_parameters"])
    hparams["model"] = {**hparams["model"], "pretrained": None}
    module = FCNModule(**{**hparams, **overrides})
    module.load_state_dict(ckpt["state_dict"])
    return module
