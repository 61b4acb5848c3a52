"""The FCN LightningModule: the per-pixel loss, the steps and the metric updates (paper sections
4.1-4.3; docs/PAPER.md "Training recipes", "Metrics").

It trains and scores; the rest lives beside it: the solver in :mod:`.optim`, TensorBoard's
panels, confusion matrices and HParams tab in :mod:`.board`, checkpointing in :mod:`.callbacks`.
Hyper-parameters are plain values (the model's settings, the data contract, loss and solver), so
checkpoints load under ``torch.load(weights_only=True)`` and rebuild the model alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn

from .checkpoints import load_weights_only, random_state, set_random_state, upgrade_hparams
from .contract import METRIC_NAMES, DataContract, input_mismatch, plain
from .errors import CheckpointError
from .metrics import HeadMetrics, summarize
from .models import build_fcn
from .normalization import Normalization, get_normalization, group_normalizations
from .optim import build_optimizer, build_scheduler, check_optimizer, check_scheduler
from .reports import tag

SPLITS = ("val", "test")
# the model's settings that the data contract decides
DATA_DECIDES = ("heads", "num_classes", "in_channels", "streams")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class FCNModule(pl.LightningModule):
    """An FCN with the paper's per-pixel cross-entropy.

    Args:
        model: keyword arguments of :func:`fcn_lightning.models.build_fcn` (arch, backbone,
            geometry, width, pretrained, normalization, ...). Without ``contract`` they may give
            ``num_classes`` or ``heads`` (and ``in_channels``, ``streams``) themselves. Their
            ``normalization`` is a scheme (``imagenet`` | ``caffe``), resolved for each image
            group of the contract's inputs (docs/PAPER.md, "Input statistics").
        contract: the data contract (:class:`~fcn_lightning.contract.DataContract` as a dict):
            heads with their class names and palettes, inputs, input channels, streams.
        input_normalization: the normalisation of each image group, as plain fields (what a
            checkpoint records, so that a reloaded model keeps what it was trained with); by
            default resolved from ``model["normalization"]`` and the contract. The model (each
            late-fusion stream) gets its own group's; the data must apply the same
            (``input_normalizations``; checked when a Trainer runs the module on a DataModule).
        loss_reduction: ``mean`` over labelled pixels (lr ~1e-4) or ``sum`` (the reference's
            "heavy" recipe: lr 1e-10 / 1e-12 / 1e-14, momentum 0.99, batch 1).
        class_weights: optional per-class loss weights (a dict of lists for several heads).
        loss_sample_prob: the paper's loss sampling (section 4.3): each pixel's loss is kept
            with this probability during training.
        optimizer / scheduler: the solver's settings (see :mod:`fcn_lightning.optim`).
        exclude_absent_classes: leave classes absent from the evaluated ground truth out of the
            means (the paper's SIFT Flow caveat); the results then list them as excluded.
        channels_last / compile: GPU speed switches (channels_last memory format; torch.compile
            mode: default, reduce-overhead, max-autotune); ignored on the CPU.
    """

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
        if contract is None:
            contract = DataContract.from_model_settings(model)
        elif any(k in model for k in DATA_DECIDES):
            raise ValueError(f"model settings {DATA_DECIDES} come from the data contract")
        contract = DataContract.coerce(contract)
        model = {k: v for k, v in model.items() if k not in DATA_DECIDES}
        scheme = model.get("normalization") or "imagenet"
        norms = group_normalizations(
            plain(input_normalization) if input_normalization is not None else scheme,
            contract.image_inputs,
        )
        built = {k: v for k, v in model.items() if k != "normalization"}
        self.model = build_fcn(
            **built,
            normalization=norms[0] if norms else get_normalization(scheme),
            **contract.model_inputs(),
        )
        _give_streams_their_normalization(self.model, contract, norms)
        self.contract = contract
        self.input_normalizations: tuple[Normalization, ...] = norms
        self.save_hyperparameters(
            {
                "model": model,
                "contract": contract.as_dict(),
                "input_normalization": [plain(n.as_dict()) for n in norms],
                "loss_reduction": loss_reduction,
                "class_weights": plain(class_weights),
                "loss_sample_prob": loss_sample_prob,
                "optimizer": plain(optimizer or {"name": "sgd", "lr": 1e-4}),
                "scheduler": plain(scheduler or {"name": "fixed"}),
                "exclude_absent_classes": exclude_absent_classes,
                "channels_last": channels_last,
                "compile": compile,
            }
        )
        check_optimizer(self.hparams.optimizer)  # a bad solver setting fails now, not at fit
        check_scheduler(self.hparams.scheduler)
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
        per_head = contract.num_classes.items()
        self.metrics = nn.ModuleDict(
            {
                s: nn.ModuleDict({h: HeadMetrics(n, exclude_absent_classes) for h, n in per_head})
                for s in SPLITS
            }
        )
        # per split, per head: the last epoch's numbers (plain) and confusion matrix
        self.results: dict[str, dict[str, dict[str, Any]]] = {}
        self.confmats: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def stream_normalizations(self) -> dict[str, Normalization]:
        """Late fusion: the normalisation each stream's input gets; {} for one network."""
        streams = getattr(self.model, "streams", None)
        if not self.contract.streams or streams is None:
            return {}
        return {name: streams[name].normalization for name in self.contract.streams}

    def setup(self, stage: str) -> None:
        """Run on a DataModule: its inputs and normalisation must be the ones this model was
        built for (and that its checkpoints record), else its scores would be meaningless."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "input_normalizations"):
            return
        given = datamodule.contract
        why = input_mismatch(self.contract, given)
        if why:
            raise ValueError(f"the model {why}")
        applied, wanted = tuple(datamodule.input_normalizations), self.input_normalizations
        if applied != wanted:
            kinds = [k for k, _ in given.image_inputs]
            if len(applied) != len(wanted):
                differ = f"{len(applied)} image group(s) in the data, {len(wanted)} in the model"
            else:
                differ = "; ".join(
                    f"{kind}: data {a.describe()}, model {b.describe()}"
                    for kind, a, b in zip(kinds, applied, wanted, strict=True)
                    if a != b
                )
            raise ValueError(
                f"the data normalises its inputs otherwise than the model expects: {differ} "
                "(data.normalization must be the model's arch.normalization)"
            )

    # --------------------------------------------------------------------- naming
    def tag(self, split: str, head: str, name: str) -> str:
        return tag(split, head, name, self.contract.single)

    @property
    def monitor(self) -> str:
        """The metric that picks the best checkpoint: val mIoU (of the first head)."""
        return self.tag("val", self.contract.first_head, "mIoU")

    # --------------------------------------------------------------------- forward and loss
    _channels_last = False
    _compiled = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def configure_model(self) -> None:
        """channels_last and torch.compile, on a GPU only: on the CPU neither helps."""
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if self.hparams.channels_last and on_gpu and not self._channels_last:
            self.model.to(memory_format=torch.channels_last)
            self._channels_last = True
        if self.hparams.compile and on_gpu and not self._compiled:
            mode = None if self.hparams.compile == "default" else self.hparams.compile
            self.model.compile(mode=mode)  # in place: parameter names and checkpoints unchanged
            self._compiled = True

    def loss(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        sample: bool = False,
    ) -> torch.Tensor:
        """Per-pixel cross-entropy over labelled pixels, summed over heads."""
        ignore = self.contract.ignore_index
        total = logits[next(iter(logits))].new_zeros(())
        for name, out in logits.items():
            target = targets[name]
            weight = getattr(self, f"class_weight_{name}")
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
            total = total + loss
        return total

    # --------------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
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

    def _eval_step(self, split: str, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        logits = self(images)
        self.log(
            f"{split}/loss",
            self.loss(logits, targets),
            on_epoch=True,
            batch_size=images.shape[0],
            sync_dist=True,
            logger=self._on_curves,
        )
        preds = {name: out.argmax(1) for name, out in logits.items()}
        for name, pred in preds.items():
            self.metrics[split][name].update(pred, targets[name])
        return preds  # the batch's predictions, for callbacks (the image panels)

    def validation_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step("test", batch)

    def predict_step(
        self, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return {k: v.argmax(1) for k, v in self(images).items()}

    # --------------------------------------------------------------------- epoch ends
    @property
    def _on_curves(self) -> bool:
        """Whether evaluation numbers are points of the TensorBoard curves. A validation
        outside fit (the pipeline's final one, of the chosen checkpoint) is not: Lightning
        would add a point at that checkpoint's step; eval.py's test has no logger at all (its
        numbers go to eval.json)."""
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

    # --------------------------------------------------------------------- solver
    def configure_optimizers(self):
        optimizer = build_optimizer(self.hparams.optimizer, self.model.parameter_groups())
        total = lambda: self.trainer.estimated_stepping_batches  # noqa: E731 (needs a trainer)
        scheduler = build_scheduler(self.hparams.scheduler, optimizer, total)
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # --------------------------------------------------------------------- random state
    # in every checkpoint: a resumed run draws the same dropout masks and loss samples as an
    # uninterrupted one (data order and augmentation are seeded per sample)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = random_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        set_random_state(checkpoint.get("rng_states"))


def _give_streams_their_normalization(
    model: nn.Module, contract: DataContract, norms: Sequence[Normalization]
) -> None:
    """Late fusion: each stream (an FCN on its own channels) records the normalisation of its
    own image group (RGB-HHA under ``caffe``: the colour mean on one, the HHA mean on the
    other); the fused net's own ``normalization`` stays its first stream's."""
    streams = getattr(model, "streams", None)
    if not contract.streams or streams is None:
        return
    for name, (start, stop) in contract.stream_channels().items():
        groups = contract.image_groups_in(start, stop)
        if groups:
            streams[name].normalization = norms[groups[0]]
    model.normalization = streams[next(iter(contract.streams))].normalization


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", **overrides: Any
) -> FCNModule:
    """Rebuild an :class:`FCNModule` from a checkpoint alone (``weights_only`` loading); the
    trunk's pretrained weights are not fetched again, the checkpoint holds them. ``overrides``
    replace hyper-parameters that do not change the weights (e.g. ``exclude_absent_classes``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a folder; name a checkpoint file in it, e.g. {path}/<stage>/checkpoints/best.ckpt"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load_weights_only(path, map_location)
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a checkpoint written by fcn-lightning (no hyper_parameters / state_dict)"
        )
    hparams = upgrade_hparams(ckpt["hyper_parameters"])
    hparams["model"] = {**hparams["model"], "pretrained": None}
    module = FCNModule(**{**hparams, **overrides})
    module.load_state_dict(ckpt["state_dict"])
    return module
