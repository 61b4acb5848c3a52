"""The FCN LightningModule: the per-pixel loss, the steps and the metric updates (paper sections
4.1-4.3; docs/PAPER.md). Its hyper-parameters are plain values (model settings, data contract,
loss, solver), so a checkpoint loads with ``weights_only`` and rebuilds the model alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from . import optim
from .checkpoints import load_weights_only, random_state, set_random_state
from .contract import METRIC_NAMES, SINGLE_HEAD, DataContract, input_mismatch, plain
from .errors import CheckpointError
from .metrics import HeadMetrics, summarize
from .models import build_fcn
from .models.fcn import aux_key
from .normalization import Normalization, get_normalization, group_normalizations
from .normalization import check_trunk_normalization as check_trunk
from .reports import tag

SPLITS = ("val", "test")
DATA_DECIDES = ("heads", "num_classes", "in_channels", "streams")  # the contract's model settings


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class FCNModule(pl.LightningModule):
    """An FCN with the paper's per-pixel cross-entropy. ``model``: ``build_fcn``'s settings (its
    ``normalization`` per image group unless ``input_normalization`` gives them; without a
    ``contract``, ``heads`` or ``num_classes``); docs/CONFIG.md lists the loss settings."""

    def __init__(
        self,
        model: Mapping[str, Any],
        *,
        contract: DataContract | Mapping[str, Any] | None = None,
        input_normalization: Sequence[Mapping[str, Any]] | None = None,
        loss_reduction: str = "mean",
        class_weights: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
        loss_sample_prob: float = 1.0,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        exclude_absent_classes: bool = False,
        channels_last: bool = False,
        compile: str | None = None,
    ) -> None:
        super().__init__()
        model = plain(model)
        if contract is None:  # a model without data
            heads = model.pop("heads", None) or {SINGLE_HEAD: model.pop("num_classes", 21)}
            contract = DataContract.for_classes(heads)
        if any(k in model for k in DATA_DECIDES):
            raise ValueError(f"model settings {DATA_DECIDES} come from the data contract")
        contract = DataContract.from_dict(contract)
        scheme = model.get("normalization") or "imagenet"
        check_trunk(model.get("backbone", "vgg16"), scheme)
        given = plain(input_normalization) if input_normalization is not None else scheme
        norms = group_normalizations(given, contract.image_inputs)
        settings = {k: v for k, v in model.items() if k not in ("normalization", "aux_weight")}
        settings["aux"] = (aux := float(model.get("aux_weight") or 0.0)) > 0  # fcn_torchvision's
        settings["normalization"] = norms[0] if norms else get_normalization(scheme)
        self.model = build_fcn(**settings, **contract.model_inputs())
        self.aux_of = {aux_key(head): (head, aux) for head in contract.heads}  # aux key -> head
        if contract.streams:  # late fusion: each stream gets its own image group's normalisation
            streams = self.model.streams
            for name, (start, stop) in contract.stream_channels().items():
                if groups := contract.image_groups_in(start, stop):
                    streams[name].normalization = norms[groups[0]]
            self.model.normalization = streams[next(iter(contract.streams))].normalization
        self.contract = contract
        self.input_normalizations: tuple[Normalization, ...] = norms
        self.save_hyperparameters({
            "model": model, "contract": contract.as_dict(),
            "input_normalization": [plain(n.as_dict()) for n in norms],
            "loss_reduction": loss_reduction, "class_weights": plain(class_weights),
            "loss_sample_prob": loss_sample_prob, "compile": compile,
            "optimizer": plain(optimizer or {"name": "sgd", "lr": 1e-4}),
            "scheduler": plain(scheduler or {"name": "fixed"}),
            "exclude_absent_classes": exclude_absent_classes, "channels_last": channels_last,
        })  # fmt: skip
        optim.check_optimizer(self.hparams.optimizer)  # fails now, not at fit
        optim.check_scheduler(self.hparams.scheduler)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not 0 < loss_sample_prob <= 1:
            raise ValueError(f"loss_sample_prob must be in (0, 1], got {loss_sample_prob}")
        for name, n in contract.num_classes.items():
            w = class_weights.get(name) if isinstance(class_weights, Mapping) else class_weights
            if w is not None and len(w) != n:
                raise ValueError(
                    f"class_weights for head {name!r} has {len(w)} entries, the head has {n} classes"
                )
            weight = torch.tensor(list(w), dtype=torch.float32) if w is not None else None
            self.register_buffer(f"class_weight_{name}", weight, persistent=False)
        self.metrics = nn.ModuleDict({s: nn.ModuleDict() for s in SPLITS})
        for split in SPLITS:
            for head, n in contract.num_classes.items():
                self.metrics[split][head] = HeadMetrics(n, exclude_absent_classes)
        self.results: dict[str, dict[str, dict[str, Any]]] = {}
        self.confmats: dict[str, dict[str, Tensor]] = {}
        self.data_record: dict[str, Any] | None = None  # its data settings: checkpoint["data"]

    def setup(self, stage: str) -> None:
        """Refuse a DataModule whose inputs or normalisation are not this model's."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "input_normalizations"):
            return
        given = datamodule.contract
        if why := input_mismatch(self.contract, given):
            raise ValueError(f"the model {why}")
        applied, wanted = tuple(datamodule.input_normalizations), self.input_normalizations
        if len(applied) != len(wanted):
            differ = f"{len(applied)} image group(s) in the data, {len(wanted)} in the model"
        else:
            pairs = zip(given.image_inputs, applied, wanted, strict=True)
            differ = "; ".join(
                f"{kind}: data {a.describe()}, model {b.describe()}"
                for (kind, _), a, b in pairs
                if a != b
            )
        if differ:
            raise ValueError(
                f"the data normalises its inputs otherwise than the model expects: {differ} "
                "(data.normalization must be the model's arch.normalization)"
            )

    def tag(self, split: str, head: str, name: str) -> str:
        return tag(split, head, name, self.contract.single)

    @property
    def monitor(self) -> str:
        """The metric that picks the best checkpoint: val mIoU (of the first head)."""
        return self.tag("val", self.contract.first_head, "mIoU")

    _channels_last = _compiled = False

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def configure_model(self) -> None:
        """channels_last and torch.compile, on a GPU only."""
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if self.hparams.channels_last and on_gpu and not self._channels_last:
            self.model.to(memory_format=torch.channels_last)
            self._channels_last = True
        if self.hparams.compile and on_gpu and not self._compiled:
            mode = None if self.hparams.compile == "default" else self.hparams.compile
            self.model.compile(mode=mode)  # in place: parameter names and checkpoints unchanged
            self._compiled = True

    def loss(
        self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor], sample: bool = False
    ) -> Tensor:
        """Per-pixel cross-entropy over labelled pixels, summed over heads (``aux`` weighted)."""
        ignore = self.contract.ignore_index
        total = logits[next(iter(logits))].new_zeros(())
        for name, out in logits.items():
            head, scale = self.aux_of.get(name, (name, 1.0))
            target, weight = targets[head], getattr(self, f"class_weight_{head}")
            pixel = F.cross_entropy(
                out.float(), target, weight=weight, ignore_index=ignore, reduction="none"
            )
            keep = target != ignore
            if sample and self.hparams.loss_sample_prob < 1:
                keep = keep & (torch.rand_like(pixel) < self.hparams.loss_sample_prob)
            w = keep.to(pixel.dtype)
            if weight is not None:
                w = w * weight[target.clamp(max=len(weight) - 1)]
            loss = (pixel * keep).sum()
            if self.hparams.loss_reduction == "mean":
                loss = loss / w.sum().clamp(min=1e-12)
            total = total + scale * loss
        return total

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        loss = self.loss(self(images), targets, sample=True)
        if not torch.isfinite(loss):  # one host sync per step
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(batch {batch_idx}): training stopped before this step changed the weights; the last "
                "good checkpoint is kept. Lower optimizer.lr (a summed loss needs ~1e-10), or check the data."
            )
        self.log(
            "train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(images)
        )
        return loss

    def _eval_step(self, split: str, batch) -> dict[str, Tensor]:
        images, targets = batch
        logits = self(images)
        loss = self.loss(logits, targets)
        log = {"batch_size": images.shape[0], "sync_dist": True, "logger": self._on_curves}
        self.log(f"{split}/loss", loss, on_epoch=True, **log)
        preds = {name: out.argmax(1) for name, out in logits.items()}
        for name, pred in preds.items():
            self.metrics[split][name].update(pred, targets[name])
        return preds  # the batch's predictions, for callbacks (the image panels)

    def validation_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step("test", batch)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return {k: v.argmax(1) for k, v in self(images).items()}

    @property
    def _on_curves(self) -> bool:
        """Whether evaluation numbers are points of the curves: not for a validation outside
        fit (the chosen checkpoint's), nor without a logger (eval.py)."""
        return self.trainer.state.fn != TrainerFn.VALIDATING and bool(self.trainer.loggers)

    def _end_epoch(self, split: str) -> None:
        results, confmats = {}, {}
        curve = self._on_curves
        for head, metric in self.metrics[split].items():
            scores = metric.compute()
            metric.reset()
            for key in METRIC_NAMES:
                prog_bar = key == "mIoU" and split == "val"
                self.log(
                    self.tag(split, head, key), scores[key].float(), prog_bar=prog_bar, logger=curve
                )
            names = self.contract.class_names(head)
            results[head] = summarize(scores, names, self.hparams.exclude_absent_classes)
            for cls, value in results[head]["per_class_IoU"].items():
                if value is not None:
                    self.log(self.tag(split, head, f"IoU/{cls}"), value, logger=curve)
            confmats[head] = scores["confmat"]
        if not self.trainer.sanity_checking:
            self.results[split], self.confmats[split] = results, confmats

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    def configure_optimizers(self):
        optimizer = optim.build_optimizer(self.hparams.optimizer, self.model.parameter_groups())
        total = lambda: self.trainer.estimated_stepping_batches  # noqa: E731 (needs a trainer)
        scheduler = optim.build_scheduler(self.hparams.scheduler, optimizer, total)
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_train_start(self) -> None:
        for config in self.trainer.lr_scheduler_configs:  # a resumed run: its new budget's lr
            optim.restart_schedule(config.scheduler)

    # a resumed run draws the same dropout masks and loss samples as an uninterrupted one
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = random_state()
        if self.data_record is not None:
            checkpoint["data"] = self.data_record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        set_random_state(checkpoint.get("rng_states"))


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", **overrides: Any
) -> FCNModule:
    """Rebuild an :class:`FCNModule` from a checkpoint alone; ``overrides`` replace
    hyper-parameters that leave the weights alone (e.g. ``exclude_absent_classes``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        e_g = f"name a checkpoint file in it, e.g. {path}/<stage>/checkpoints/best.ckpt"
        why = f"{path} is a folder; {e_g}" if path.is_dir() else f"checkpoint not found: {path}"
        raise FileNotFoundError(why)
    ckpt = load_weights_only(path, map_location)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a checkpoint written by fcn-lightning (no hyper_parameters / state_dict)"
        )
    hparams = dict(ckpt["hyper_parameters"])
    hparams["model"] = {**hparams["model"], "pretrained": None}  # the checkpoint holds them
    module = FCNModule(**{**hparams, **overrides})
    module.load_state_dict(ckpt["state_dict"])
    record = ckpt.get("data")  # the data settings it was trained with (eval.py's default)
    module.data_record = dict(record) if isinstance(record, Mapping) else None
    return module
