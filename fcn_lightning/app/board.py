"""What the dashboards show beyond the logged scalars, as Lightning callbacks reading what the
module publishes: labelled matplotlib figures of each validation (confusion matrix, prediction
panels with a legend, per-class IoU), sent to every logger that takes images and kept as PNGs in
``<stage folder>/figures/``; and the HParams table (TensorBoard) or hyper-parameters (others)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from ..atomic import write_atomically
from ..contract import METRIC_NAMES

DPI = 100
NUMBERS_UP_TO = 25  # classes up to which the confusion matrix writes its numbers in the cells
IGNORED = "ignored"


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (no display, no pyplot state to close), laid out by matplotlib,
    of whole pixels."""
    size = (round(width * DPI) / DPI, round(height * DPI) / DPI)
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _names_inches(names: Sequence[str], fontsize: float = 8) -> float:
    """About the width of the longest name at ``fontsize`` points."""
    return 0.58 * fontsize / 72 * max(map(len, names), default=0)


def confusion_figure(confmat: torch.Tensor, class_names: Sequence[str], title: str) -> Figure:
    """The confusion matrix, rows (truth) normalised to per-cent of the class's pixels, with class
    names on both axes; the numbers in the cells up to :data:`NUMBERS_UP_TO` classes, colour alone
    beyond (a square-root scale: small confusions stay visible). Rows of classes absent from the
    truth are grey."""
    hist = confmat.detach().double().cpu().numpy()
    n = len(class_names)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = 100 * hist / hist.sum(1, keepdims=True)  # NaN: no pixel of the class in the truth
    numbers = n <= NUMBERS_UP_TO
    side = n * (0.36 if numbers else 0.2) + _names_inches(class_names) + 0.5
    fig = new_figure(max(side + 1.4, 5.5), max(side + 0.7, 4.5))
    ax = fig.add_subplot()
    cmap, norm = colormaps["Blues"].with_extremes(bad="0.85"), PowerNorm(0.5, vmin=0, vmax=100)
    image = ax.imshow(np.ma.masked_invalid(pct), cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.tick_params(length=0)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    grey = "; grey: not in the truth" if np.isnan(pct).any() else ""
    ax.set_title(f"Confusion matrix (rows: % of each true class{grey})\n{title}", fontsize=10)
    bar = fig.colorbar(
        image, ax=ax, shrink=min(1.0, 6 / side), label="% of the true class's pixels"
    )
    bar.set_ticks([0, 1, 5, 10, 25, 50, 75, 100])
    if numbers:
        for i, j in zip(*np.nonzero(pct >= 0.5), strict=True):  # what rounds to 0 stays blank
            v = pct[i, j]
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if norm(v) > 0.6 else "black")  # fmt: skip
    return fig


def palette_lut(palette: Sequence[Sequence[int]], ignore_index: int) -> torch.Tensor:
    """uint8 (256, 3): each class index's colour in ``palette``; ignored pixels (and indices
    the palette lacks) white."""
    lut = torch.full((256, 3), 255, dtype=torch.uint8)
    lut[: min(len(palette), 256)] = torch.tensor(list(palette)[:256], dtype=torch.uint8)
    lut[ignore_index] = 255
    return lut


def colour(
    label: torch.Tensor, palette: Sequence[Sequence[int]], ignore_index: int
) -> torch.Tensor:
    """Class indices -> uint8 (3, H, W) in ``palette``; ignored pixels white."""
    return palette_lut(palette, ignore_index)[label.long().clamp(0, 255)].permute(2, 0, 1)


def panel_figure(
    rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    ignore_index: int,
    title: str,
) -> Figure:
    """One row per image: input (uint8 (3, H, W')) | truth | prediction (class indices (H, W)),
    the label images in their exact palette colours (nearest, no interpolation); under them, a
    legend of the classes present in these truths and predictions (and of ignored pixels)."""
    width_in, width_label = max(r[0].shape[-1] for r in rows), max(r[1].shape[-1] for r in rows)
    heights = [r[1].shape[-2] for r in rows]
    scale = min(max(width_label, 200), 320) / DPI / width_label  # inches per pixel
    present = sorted(set(torch.cat([t.flatten() for r in rows for t in r[1:]]).unique().tolist()))
    lut = palette_lut(palette, ignore_index).numpy() / 255
    handles = [
        Patch(facecolor=lut[c], edgecolor="0.5", label=class_names[c])
        for c in present
        if c < len(class_names)
    ]
    if ignore_index in present:
        handles.append(Patch(facecolor="white", edgecolor="0.5", label=IGNORED))
    width = (width_in + 2 * width_label) * scale + 0.3
    entry = _names_inches([h.get_label() for h in handles]) + 0.45
    ncol = max(1, min(len(handles), int(width // entry)))
    height = sum(heights) * scale + 0.75 + 0.22 * math.ceil(len(handles) / ncol)
    fig = new_figure(width, height)
    grid = fig.add_gridspec(len(rows), 3, width_ratios=[width_in, width_label, width_label],
                            height_ratios=heights)  # fmt: skip
    for r, (image, *labels) in enumerate(rows):
        pictures = [image, *(colour(y, palette, ignore_index) for y in labels)]
        for c, picture in enumerate(pictures):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(picture.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(("input", "truth", "prediction")[c], fontsize=9)
    fig.suptitle(f"Validation predictions\n{title}", fontsize=10)
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False,
               handlelength=1.2, columnspacing=1.0)  # fmt: skip
    return fig


def iou_figure(per_class: Mapping[str, float | None], miou: float, title: str) -> Figure:
    """Per-class IoU (%) as horizontal bars with their values, the mean IoU as a dashed line;
    classes absent from truth and prediction (``None``) are written "absent", not drawn as 0."""
    names = list(per_class)
    fig = new_figure(6.0 + _names_inches(names), 1.4 + 0.2 * len(names))
    ax = fig.add_subplot()
    present = [i for i, c in enumerate(names) if per_class[c] is not None]
    bars = ax.barh(present, [100 * per_class[names[i]] for i in present], height=0.7)
    ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    for i in sorted(set(range(len(names))) - set(present)):
        ax.text(1, i, "absent", va="center", fontsize=7, color="0.4", style="italic")
    if math.isfinite(miou):
        ax.axvline(100 * miou, color="tab:red", linestyle="--", linewidth=1,
                   label=f"mIoU {100 * miou:.1f}")  # fmt: skip
        fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)  # the first class on top
    ax.set_xlim(0, 108)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"IoU per class\n{title}", fontsize=10)
    return fig


def figure_rgb(fig: Figure) -> np.ndarray:
    """The figure rendered, uint8 (H, W, 3)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray, path: Path) -> None:
    """A rendered figure as a PNG at ``path``, replaced whole (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: Image.fromarray(image).save(f, format="png"))


def log_image(loggers: Sequence[Any], tag: str, image: np.ndarray, step: int) -> None:
    """A rendered figure (uint8 (H, W, 3)) to every logger that takes images: TensorBoard,
    MLflow (an artifact per step), wandb; others (CSV) take none. Rendered once for all of them,
    it is what ``add_figure`` / ``log_figure`` would render each time."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, step, dataformats="HWC")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, f"figures/{tag}_{step}.png")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[image], step=step)


class ValidationImages(Callback):
    """Per head, on every ``every_n_validations``-th validation run from the first (0: never):
    the confusion matrix, a panel of the first ``panel_size`` validation images (input | truth |
    prediction, with a legend) and the per-class IoU, to the loggers and as PNGs in
    ``<trainer.default_root_dir>/figures/`` (``<name>_<head>.png`` with several heads). A
    validation outside fit (``trainer.validate``, the chosen checkpoint's) always draws, to the
    PNGs alone, as it makes no point of the curves either. Runs are counted, not epochs
    (``check_val_every_n_epoch=4`` would never meet an epoch rule); the count is saved in
    checkpoints. Rank zero draws."""

    def __init__(self, panel_size: int = 4, every_n_validations: int = 1) -> None:
        self.panel_size, self.every = int(panel_size), int(every_n_validations)
        self.validation_runs, self._drawing, self._rows = 0, False, []
        self._logged_at: int | None = None  # the step of the last figures sent to the loggers

    def state_dict(self) -> dict[str, Any]:
        return {"validation_runs": self.validation_runs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.validation_runs = int(state.get("validation_runs", 0))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []
        scheduled = self.validation_runs % max(self.every, 1) == 0
        outside_fit = trainer.state.fn == TrainerFn.VALIDATING
        self._drawing = (
            self.every > 0
            and (scheduled or outside_fit)
            and trainer.is_global_zero
            and not trainer.sanity_checking
        )

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
        if self._drawing:
            # the chosen checkpoint's validation (outside fit) reaches the loggers only where the
            # fit drew none at this step: a stage shorter than its validation interval
            fitting = trainer.state.fn != TrainerFn.VALIDATING
            to_loggers = (
                trainer.loggers if fitting or self._logged_at != trainer.global_step else []
            )
            self._logged_at = trainer.global_step if to_loggers else self._logged_at
            folder = Path(trainer.default_root_dir) / "figures"
            for head, name, fig in self.figures(trainer, pl_module):
                image = figure_rgb(fig)
                suffix = "" if pl_module.contract.single else f"_{head}"
                save_png(image, folder / f"{name}{suffix}.png")
                log_image(to_loggers, pl_module.tag("val", head, name), image, trainer.global_step)
        self._rows = []

    def figures(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Iterator[tuple[str, str, Figure]]:
        """(head, name, figure) of this validation: confusion_matrix, predictions, per_class_IoU;
        titled with the stage, the step and the head (of several)."""
        contract, validate = pl_module.contract, trainer.state.fn == TrainerFn.VALIDATING
        stage = pl_module.hparams.get("model", {}).get("arch")
        when = f"step {trainer.global_step}" + (" (chosen checkpoint)" if validate else "")
        for head in contract:
            of_head = None if contract.single else f"head {head}"
            where = " · ".join(filter(None, [stage, "val", when, of_head]))
            names = contract.class_names(head)
            confmat = pl_module.confmats.get("val", {}).get(head)
            if confmat is not None:
                yield head, "confusion_matrix", confusion_figure(confmat, names, where)
            if self._rows:
                rows = [(self._input(pl_module, x), y[head], p[head]) for x, y, p in self._rows]
                palette, ignore = contract.heads[head].palette, contract.ignore_index
                yield head, "predictions", panel_figure(rows, names, palette, ignore, where)
            results = pl_module.results.get("val", {}).get(head)
            if results is not None:
                iou, miou = results["per_class_IoU"], results["mIoU"]
                yield head, "per_class_IoU", iou_figure(iou, miou, where)

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


# The columns TensorBoard's HParams table opens with, in this order after a sweep's own keys: it
# shows the first MAX_SHOWN of those marked as differing, and no more
SHOWN = ("model/arch", "optimizer/lr", "model/backbone", "optimizer/name", "model/geometry",
         "run/seed")  # fmt: skip
MAX_SHOWN = 5


@rank_zero_only  # as the logger's own methods: other processes have no event file
def write_hparams(
    logger: TensorBoardLogger, params: dict[str, Any], metrics: dict, shown: Sequence[str] = SHOWN
) -> None:
    """What ``logger.log_hyperparams(params, metrics)`` writes, with the first :data:`MAX_SHOWN`
    of ``shown`` (those in ``params``) marked as the columns to show, listed first in that order
    (Lightning marks none: TensorBoard then shows the first five by name)."""
    logger.log_hyperparams(params)  # hparams.yaml; without metrics no summary is written
    experiment, start, end = hparams_summaries(params, metrics)
    value = experiment.value[0]
    content = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    shown = [name for name in dict.fromkeys(shown) if name in params][:MAX_SHOWN]
    infos = sorted(content.experiment.hparam_infos, key=lambda i: shown.index(i.name) if i.name in shown else len(shown))  # fmt: skip
    del content.experiment.hparam_infos[:]
    content.experiment.hparam_infos.extend(infos)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in shown
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
    """The module's hyper-parameters (not the contract nor the input statistics) and ``run``
    settings (seed, data: what a sweep varies) against ``hp/<metric>`` (``hp/<head>/<metric>``
    per head), written after each validation, to every logger: TensorBoard's HParams tab opens
    on ``shown`` (flat ``a/b`` names, e.g. a sweep's ``run/swept/<key>``), then the
    :data:`SHOWN` columns; other loggers get them as hyper-parameters and metrics."""

    def __init__(self, run: Mapping[str, Any] | None = None, shown: Sequence[str] = ()) -> None:
        self.run, self.shown = dict(run or {}), (*shown, *SHOWN)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hidden = ("contract", "input_normalization")  # lists of names and numbers
        hparams = {k: v for k, v in pl_module.hparams.items() if k not in hidden}
        hparams |= {"run": self.run} if self.run else {}
        params = flat_hparams(hparams)
        metrics = {pl_module.tag("hp", h, k): 0.0 for h in pl_module.contract for k in METRIC_NAMES}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                write_hparams(logger, params, metrics, self.shown)
            else:
                logger.log_hyperparams(params)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = pl_module.results.get("val")
        if trainer.sanity_checking or not results:
            return
        metrics = {pl_module.tag("hp", h, k): results[h][k] for h in results for k in METRIC_NAMES}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
