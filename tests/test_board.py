"""The dashboards' figures (fcn_lightning/app/board.py): a labelled, row-normalised confusion
matrix, prediction panels with a legend of the classes, the per-class IoU chart; their PNGs in the
stage folder, the loggers that take them, and the HParams columns."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import NO_DATA, cfg_of
from helpers.datasets import write_siftflow
from matplotlib.text import Text
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fcn_lightning.app import board
from fcn_lightning.app.board import SHOWN, HParamsTab, ValidationImages
from fcn_lightning.app.train import train
from fcn_lightning.contract import DataContract, voc_palette
from fcn_lightning.data import SyntheticDataModule
from fcn_lightning.module import FCNModule

VOC = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
       "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
       "train", "tvmonitor"]  # fmt: skip
FIGURES = ("confusion_matrix", "predictions", "per_class_IoU")


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text)]


def ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def voc_like_confmat(n: int, absent: int | None = None, seed: int = 0) -> torch.Tensor:
    """Pixel counts: a strong diagonal, sparse confusions; row ``absent`` empty."""
    g = torch.Generator().manual_seed(seed)
    confusions = torch.randint(0, 60, (n, n), generator=g) * (torch.rand(n, n, generator=g) < 0.3)
    hist = confusions + torch.diag(torch.randint(300, 3000, (n,), generator=g))
    if absent is not None:
        hist[absent] = 0
    return hist


# --------------------------------------------------------------------------- confusion matrix
@pytest.mark.parametrize("n", [5, 21])
def test_confusion_matrix_names_rows_in_percent_and_numbers(n):
    names = VOC[:n]
    hist = voc_like_confmat(n, absent=3)
    fig = board.confusion_figure(hist, names, "fcn8s · val · step 250")
    ax = fig.axes[0]
    shown = texts(fig)
    assert ticks(ax.get_xticklabels()) == names and ticks(ax.get_yticklabels()) == names
    assert set(names) <= set(shown)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert "fcn8s · val · step 250" in ax.get_title() and "grey" in ax.get_title()
    # the colours: each true class's row in per-cent of its pixels; the absent row masked (grey)
    pct = ax.images[0].get_array()
    rows = hist.double() / hist.sum(1, keepdim=True).double()
    np.testing.assert_allclose(np.delete(pct.data, 3, 0), 100 * np.delete(rows.numpy(), 3, 0))
    assert pct.mask[3].all() and not np.delete(pct.mask, 3, 0).any()
    # the numbers, in their cells: each row's sum to ~100 (rounding), none in the absent row
    cells: dict[int, list[float]] = {}
    for t in ax.texts:
        col, row = t.get_position()
        value = float(t.get_text())
        assert value == round(100 * float(rows[row, col])), (row, col)
        cells.setdefault(row, []).append(value)
    assert set(cells) == set(range(n)) - {3}
    for row, values in cells.items():
        assert sum(values) == pytest.approx(100, abs=0.5 * n), row
    # the size grows with the classes: >= 30 pixels per class, the cells >= 25 on the screen
    board.figure_rgb(fig)  # lays the figure out
    assert (fig.get_size_inches() * fig.dpi >= 30 * n).all()
    box = ax.get_window_extent()
    assert min(box.width, box.height) >= 25 * n


def test_confusion_matrix_of_60_classes_is_colour_alone_and_legible():
    names = [f"class {i} " + "x" * (i % 12) for i in range(60)]
    fig = board.confusion_figure(voc_like_confmat(60), names, "fcn8s · val · step 9 · head sem")
    ax = fig.axes[0]
    assert ticks(ax.get_xticklabels()) == names and ticks(ax.get_yticklabels()) == names
    assert not ax.texts  # no numbers: they would not fit
    assert len(fig.axes) == 2  # ... but a colour bar
    assert "head sem" in ax.get_title()
    image = board.figure_rgb(fig)
    assert image.shape[:2] == tuple(np.round(fig.get_size_inches()[::-1] * fig.dpi).astype(int))
    box = ax.get_window_extent()  # a row per 8-point name (11 pixels) and some space
    assert min(box.width, box.height) >= 15 * 60
    labels = [t.get_window_extent() for t in ax.get_yticklabels()]
    assert all(a.y0 >= b.y1 for a, b in itertools.pairwise(labels))  # no overlap


# --------------------------------------------------------------------------- prediction panels
def test_panel_legend_names_exactly_the_classes_present_in_their_colours():
    names = ["background", "road", "car", "tree", "sky", "person"]
    palette = voc_palette()
    truth = torch.zeros(24, 40, dtype=torch.long)
    truth[4:20, 5:20], truth[:2] = 2, 255  # car, an ignored border
    prediction = torch.zeros(24, 40, dtype=torch.long)
    prediction[4:20, 5:20] = 3  # tree
    portrait_truth = torch.full((40, 24), 5)  # person; the rows differ in size
    image = torch.randint(0, 256, (3, 24, 40), dtype=torch.uint8)
    portrait = torch.randint(0, 256, (3, 40, 24), dtype=torch.uint8)
    rows = [(image, truth, prediction), (portrait, portrait_truth, portrait_truth.clone())]
    fig = board.panel_figure(rows, names, palette, 255, "fcn32s · val · step 3")
    (legend,) = fig.legends
    assert ticks(legend.get_texts()) == ["background", "car", "tree", "person", "ignored"]
    swatches = [tuple(p.get_facecolor()[:3]) for p in legend.get_patches()]
    expected = [tuple(np.array(palette[c]) / 255) for c in (0, 2, 3, 5)] + [(1.0, 1.0, 1.0)]
    np.testing.assert_allclose(swatches, expected)
    assert {"input", "truth", "prediction"} <= set(texts(fig))
    assert "fcn32s · val · step 3" in fig.get_suptitle()
    # the label images in their exact palette colours, not interpolated
    axes = fig.axes
    assert len(axes) == 6
    for ax, label in zip(axes[1:3], (truth, prediction), strict=True):
        (drawn,) = ax.images
        assert drawn.get_interpolation() == "nearest"
        np.testing.assert_array_equal(drawn.get_array(), board.colour(label, palette, 255).permute(1, 2, 0).numpy())  # fmt: skip
    # rendered: inside the truth's frame, only the palette's colours and white
    rendered, height = board.figure_rgb(fig), fig.bbox.height
    box = axes[1].get_window_extent()
    inside = rendered[int(height - box.y1) + 2 : int(height - box.y0) - 2, int(box.x0) + 2 : int(box.x1) - 2]  # fmt: skip
    colours = {tuple(c) for c in inside.reshape(-1, 3).tolist()}
    assert colours == {tuple(palette[0]), tuple(palette[2]), (255, 255, 255)}


# --------------------------------------------------------------------------- IoU per class
def test_iou_chart_bars_are_the_per_class_values_and_absent_classes_say_so():
    per_class = {"background": 0.91, "blob": 0.42, "bar": None, "dot": 0.0, "ring": 0.17}
    miou = np.mean([v for v in per_class.values() if v is not None])
    fig = board.iou_figure(per_class, miou, "fcn16s · val · step 12")
    ax = fig.axes[0]
    assert ticks(ax.get_yticklabels()) == list(per_class)
    bars = {round(p.get_y() + p.get_height() / 2): p.get_width() for p in ax.patches}
    assert bars == pytest.approx({0: 91.0, 1: 42.0, 3: 0.0, 4: 17.0})  # "dot" 0: a bar of 0
    (absent,) = [t for t in ax.texts if t.get_text() == "absent"]
    assert absent.get_position()[1] == 2  # "bar" is absent, written so, not a bar
    (line,) = ax.lines
    assert line.get_xdata()[0] == pytest.approx(100 * miou)
    assert f"mIoU {100 * miou:.1f}" in texts(fig)
    assert "fcn16s · val · step 12" in ax.get_title()


# --------------------------------------------------------------------------- in a training run
def tiny_module(names=("background", "blob", "bar", "dot", "ring")) -> FCNModule:
    model = {"arch": "fcn32s", "backbone": "vgg16_bn", "geometry": "same", "width": 0.0625,
             "dropout": 0.0}  # fmt: skip
    return FCNModule(model, contract=DataContract.for_classes({"out": list(names)}),
                     optimizer={"name": "adamw", "lr": 1e-3})  # fmt: skip


def tiny_data() -> SyntheticDataModule:
    return SyntheticDataModule(image_size=32, train_size=4, val_size=2, batch_size=2, val_batch_size=2)  # fmt: skip


def tiny_trainer(tmp_path, loggers, callbacks, **kw) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path / "stage", logger=loggers, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, log_every_n_steps=1, accelerator="cpu", **kw,
    )  # fmt: skip


def image_counts(logdir) -> dict[str, int]:
    events = EventAccumulator(str(logdir), size_guidance={"images": 0})
    events.Reload()
    return {tag: len(events.Images(tag)) for tag in events.Tags()["images"]}


def test_pngs_hold_the_last_validation_and_validate_adds_no_logged_images(tmp_path):
    pl.seed_everything(0)
    module, data = tiny_module(), tiny_data()
    logger = TensorBoardLogger(tmp_path / "tb", name="", version="")
    panels = ValidationImages(panel_size=2, every_n_validations=2)
    t = tiny_trainer(tmp_path, logger, [panels], max_epochs=3)
    t.fit(module, data)
    figures = tmp_path / "stage" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == sorted(f"{f}.png" for f in FIGURES)
    # validation runs 0, 1, 2: drawn on 0 and 2, to TensorBoard and the PNGs
    assert panels.validation_runs == 3
    assert image_counts(logger.log_dir) == {f"val/{f}": 2 for f in FIGURES}
    for_fit = np.asarray(Image.open(figures / "confusion_matrix.png"))
    t.validate(module, data, verbose=False)  # what train.py does with the chosen checkpoint
    assert image_counts(logger.log_dir) == {f"val/{f}": 2 for f in FIGURES}  # no curve point
    saved = np.asarray(Image.open(figures / "confusion_matrix.png"))
    figures_now = {name: fig for _, name, fig in panels.figures(t, module)}
    expected = board.figure_rgb(figures_now["confusion_matrix"])
    np.testing.assert_array_equal(saved, expected)  # the PNG is this last validation's
    assert saved.shape != for_fit.shape or (saved != for_fit).any()  # retitled: chosen checkpoint
    assert "(chosen checkpoint)" in figures_now["confusion_matrix"].axes[0].get_title()
    assert not list(figures.glob(".*"))  # no temporary file left


def test_figures_go_to_every_logger_that_takes_images(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    pl.seed_everything(0)
    loggers = [  # TensorBoard as conf/logger/tensorboard.yaml sets it (no hp_metric of its own)
        TensorBoardLogger(tmp_path / "tb", name="", version="", default_hp_metric=False),
        CSVLogger(tmp_path / "csv", name="", version=""),
        MLFlowLogger("board", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                     artifact_location=str(tmp_path / "mlflow")),
        WandbLogger(project="board", offline=True, save_dir=str(tmp_path / "wandb")),
    ]  # fmt: skip
    run = {"seed": 7, "swept": {"optimizer.lr": 0.01}}
    callbacks = [ValidationImages(panel_size=1), HParamsTab(run, shown=["run/swept/optimizer.lr"])]
    t = tiny_trainer(tmp_path, loggers, callbacks, max_epochs=1)
    t.fit(tiny_module(), tiny_data())
    step = t.global_step
    tb, csv, mlflow, wandb = loggers
    wandb.experiment.finish()
    # TensorBoard: the figures, and the HParams table opening on the swept key, then SHOWN's
    # first four (TensorBoard shows five columns of those marked, and no more), listed first
    assert image_counts(tb.log_dir) == {f"val/{f}": 1 for f in FIGURES}
    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    content = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    infos = plugin_data_pb2.HParamsPluginData.FromString(content).experiment.hparam_infos
    opening = ["run/swept/optimizer.lr", *SHOWN[:4]]
    assert [i.name for i in infos if i.differs] == [i.name for i in infos[:5]] == opening
    # MLflow: one artifact per figure and step; the hyper-parameters and hp/ metrics
    artifacts = {a.path for a in mlflow.experiment.list_artifacts(mlflow.run_id, "figures/val")}
    assert artifacts == {f"figures/val/{f}_{step}.png" for f in FIGURES}
    data = mlflow.experiment.get_run(mlflow.run_id).data
    assert data.params["run/swept/optimizer.lr"] == "0.01" and data.params["model/arch"] == "fcn32s"
    assert {"hp/mIoU", "hp/pixel_acc", "hp/mean_acc", "hp/fwIoU"} <= set(data.metrics)
    # wandb (offline): the figures as images of the run
    media = list((tmp_path / "wandb").rglob("media/images/val/*.png"))
    assert sorted(p.name.rsplit("_", 2)[0] for p in media) == sorted(FIGURES)  # <tag>_<n>_<hash>
    # CSV: no images, but the hyper-parameters and hp/ metrics
    folder = Path(csv.log_dir)
    assert not list(folder.rglob("*.png"))
    assert yaml.safe_load((folder / "hparams.yaml").read_text())["run/seed"] == 7
    assert "hp/mIoU" in (folder / "metrics.csv").read_text().splitlines()[0]
    # the run folder holds the PNGs whatever the loggers
    assert sorted(p.stem for p in (tmp_path / "stage" / "figures").glob("*.png")) == sorted(FIGURES)  # fmt: skip


def test_staged_run_writes_each_stages_figures(tiny_run):
    out, _ = tiny_run
    for stage in ("fcn32s", "fcn16s"):
        figures = out / stage / "figures"
        assert sorted(p.name for p in figures.iterdir()) == sorted(f"{f}.png" for f in FIGURES)
        counts = image_counts(out / "tensorboard" / stage)
        assert set(counts) == {f"val/{f}" for f in FIGURES}, stage
        # TensorBoard holds the same labelled figure as the PNG (5 classes: the same layout)
        events = EventAccumulator(str(out / "tensorboard" / stage), size_guidance={"images": 0})
        events.Reload()
        logged = events.Images("val/confusion_matrix")[-1]
        with Image.open(figures / "confusion_matrix.png") as png:
            assert (logged.width, logged.height) == png.size
            assert png.width >= 5 * 30 and png.mode == "RGB"


def test_two_headed_run_draws_each_head(tmp_path):
    sift = write_siftflow(tmp_path / "sift", train=["coast_a1"], test=["coast_t1"])
    overrides = [*NO_DATA, "arch=fcn32s", "data=siftflow", f"data.root={sift}",
                 "data.num_workers=0", "data.batch_size=1", "data.val_batch_size=1",
                 "data.batching=pad", "arch.pretrained=null", "arch.geometry=same",
                 "loss.reduction=mean", "optimizer.lr=1e-3", "images.every_n_epochs=1"]  # fmt: skip
    out = tmp_path / "run"
    train(cfg_of("config", overrides, out))
    names = {p.name for p in (out / "fcn32s" / "figures").iterdir()}
    assert names == {f"{f}_{head}.png" for f in FIGURES for head in ("sem", "geo")}
    counts = image_counts(out / "tensorboard" / "fcn32s")
    assert set(counts) == {f"val/{head}/{f}" for f in FIGURES for head in ("sem", "geo")}
    with Image.open(out / "fcn32s" / "figures" / "confusion_matrix_sem.png") as sem:
        with Image.open(out / "fcn32s" / "figures" / "confusion_matrix_geo.png") as geo:
            assert sem.width > geo.width  # 33 classes against 3: the figure grows with them
