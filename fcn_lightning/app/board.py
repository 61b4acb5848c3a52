"""What TensorBoard shows beyond the logged scalars, as Lightning callbacks reading what the
module publishes: image panels of validation predictions, confusion matrices, the HParams tab."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from ..contract import METRIC_NAMES


def stack_rows(rows: Sequence[torch.Tensor], fill: int = 0) -> torch.Tensor:
    """Panel rows of any sizes, one under the other, padded on the right (not resized: the label
    colours stay exact) to the widest."""
    width = max(r.shape[-1] for r in rows)
    return torch.cat([F.pad(r, (0, width - r.shape[-1]), value=fill) for r in rows], dim=1)


def confusion_image(confmat: torch.Tensor, cell: int = 12) -> torch.Tensor:
    """Row-normalised confusion matrix as a uint8 (3, n*cell, n*cell) heat map (rows = truth)."""
    hist = confmat.double().cpu()
    rows = hist / hist.sum(1, keepdim=True).clamp(min=1)
    v = (rows * 255).round().to(torch.uint8)
    heat = torch.stack([v, (v.float() * 0.6).to(torch.uint8), 255 - v])  # blue (0) -> red (1)
    return heat.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def colour(
    label: torch.Tensor, palette: Sequence[Sequence[int]], ignore_index: int
) -> torch.Tensor:
    """Class indices -> uint8 (3, H, W) in ``palette``; ignored pixels white."""
    lut = torch.full((256, 3), 255, dtype=torch.uint8)
    lut[: min(len(palette), 256)] = torch.tensor(list(palette)[:256], dtype=torch.uint8)
    lut[ignore_index] = 255
    return lut[label.long().clamp(0, 255)].permute(2, 0, 1)


def _log_image(trainer: pl.Trainer, tag: str, image: torch.Tensor) -> None:
    experiment = getattr(trainer.logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_image") and trainer.is_global_zero:
        experiment.add_image(tag, image, trainer.global_step, dataformats="CHW")


class ValidationImages(Callback):
    """Per head, a panel of the first ``panel_size`` validation images (input | truth |
    prediction) and the confusion matrix, on every ``every_n_validations``-th validation run
    from the first (0: never). Runs are counted, not epochs (``check_val_every_n_epoch=4`` would
    never meet an epoch rule); the count is saved in checkpoints."""

    def __init__(self, panel_size: int = 4, every_n_validations: int = 1) -> None:
        self.panel_size, self.every = int(panel_size), int(every_n_validations)
        self.validation_runs, self._drawing, self._rows = 0, False, []

    def state_dict(self) -> dict[str, Any]:
        return {"validation_runs": self.validation_runs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.validation_runs = int(state.get("validation_runs", 0))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []
        every, runs = self.every, self.validation_runs
        self._drawing = every > 0 and runs % every == 0 and not trainer.sanity_checking

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._drawing or len(self._rows) >= self.panel_size:
            return
        if isinstance(outputs, Mapping):
            images, targets = batch
            for i in range(min(images.shape[0], self.panel_size - len(self._rows))):
                item = [{k: v[i].cpu() for k, v in d.items()} for d in (targets, outputs)]
                self._rows.append((images[i].detach().cpu(), *item))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validation_runs += 1
        if not self._drawing:
            return
        contract = pl_module.contract
        for head in contract:
            confmat = pl_module.confmats.get("val", {}).get(head)
            if confmat is not None:
                tag = pl_module.tag("val", head, "confusion_matrix")
                _log_image(trainer, tag, confusion_image(confmat))
            if self._rows:
                lut = contract.heads[head].palette, contract.ignore_index
                rows = [
                    torch.cat([self._input(pl_module, x), *(colour(y[head], *lut) for y in ys)], 2)
                    for x, *ys in self._rows
                ]
                _log_image(trainer, pl_module.tag("val", head, "predictions"), stack_rows(rows))
        self._rows = []

    @staticmethod
    def _input(pl_module: pl.LightningModule, image: torch.Tensor) -> torch.Tensor:
        """The input for display, uint8: each image group un-normalised, side by side; depth
        alone as grey levels."""
        norms = pl_module.input_normalizations
        if not norms:
            d = image[:1].float()
            d = (d - d.min()) / (d.max() - d.min()).clamp(min=1e-6)
            return d.expand(3, -1, -1).mul(255).to(torch.uint8)
        groups = [n.to_rgb(image[3 * g : 3 * g + 3]) for g, n in enumerate(norms)]
        return torch.cat(groups, dim=2)


# The columns TensorBoard's HParams table opens with (it shows those marked as differing)
SHOWN = ("model/arch", "model/backbone", "model/geometry", "optimizer/name", "optimizer/lr",
         "run/seed")  # fmt: skip


@rank_zero_only  # as the logger's own methods: other processes have no event file
def write_hparams(logger: TensorBoardLogger, params: dict[str, Any], metrics: dict) -> None:
    """What ``logger.log_hyperparams(params, metrics)`` writes, with :data:`SHOWN` marked as the
    columns to show (Lightning marks none: TensorBoard then shows the first five by name)."""
    logger.log_hyperparams(params)  # hparams.yaml; without metrics no summary is written
    experiment, start, end = hparams_summaries(params, metrics)
    value = experiment.value[0]
    content = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in SHOWN
    value.metadata.plugin_data.content = content.SerializeToString()
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, start, end):
        writer.add_summary(summary)


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


class HParamsTab(Callback):
    """TensorBoard's HParams tab: the module's hyper-parameters (not the contract nor the input
    statistics) and ``run`` settings (seed, data: what a sweep varies) against ``hp/<metric>``
    (``hp/<head>/<metric>`` per head), written after each validation."""

    def __init__(self, run: Mapping[str, Any] | None = None) -> None:
        self.run = dict(run or {})

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.logger is not None:
            hidden = ("contract", "input_normalization")  # lists of names and numbers
            hparams = {k: v for k, v in pl_module.hparams.items() if k not in hidden}
            hparams |= {"run": self.run} if self.run else {}
            metrics = {
                pl_module.tag("hp", h, k): 0.0 for h in pl_module.contract for k in METRIC_NAMES
            }
            params = flat_hparams(hparams)
            if isinstance(trainer.logger, TensorBoardLogger):
                write_hparams(trainer.logger, params, metrics)
            else:
                trainer.logger.log_hyperparams(params, metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = pl_module.results.get("val")
        if trainer.sanity_checking or trainer.logger is None or not results:
            return
        metrics = {pl_module.tag("hp", h, k): results[h][k] for h in results for k in METRIC_NAMES}
        trainer.logger.log_metrics(metrics, step=trainer.global_step)
