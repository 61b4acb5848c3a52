"""Comparing experiments as a user does, end to end, on their own data (a folder in VOC layout of
four classes, images of several sizes and formats, written here): a staged run, a 3-point sweep
and a 2-trial Optuna study; then the figures, the sweep folders and TensorBoard run names, the
HParams table of a real TensorBoard server, and ``python -m fcn_lightning.compare`` over it all,
each against the runs' own files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from helpers import cfg_of
from helpers.datasets import write_varied_folder
from helpers.launcher import cli
from helpers.tensorboard import serve
from matplotlib.text import Text

from fcn_lightning import compare
from fcn_lightning.app.board import SHOWN, ValidationImages
from fcn_lightning.app.train import train
from fcn_lightning.contract import METRIC_NAMES
from fcn_lightning.reports import METRIC_TITLES

pytestmark = pytest.mark.xdist_group("experiments_lab")  # one worker trains the module's runs once

CLASSES = ("background", "cat", "dog", "car")
# the from-scratch recipe, tiny: a batch-norm trunk at 1/16 width, AdamW, crops of 32 px
OWN = ["data=folder", "data.num_workers=0", "data.batch_size=2", "data.val_batch_size=2",
       "data.crop_size=32", "arch.pretrained=null", "arch.backbone=vgg16_bn", "arch.width=0.0625",
       "arch.geometry=same", "arch.dropout=0.0", "optimizer=adamw_scratch", "trainer.accelerator=cpu",
       "trainer.max_steps=2", "trainer.log_every_n_steps=1", "callbacks=none", "images.panel_size=2"]  # fmt: skip
SWEPT = "optimizer.weight_decay"  # not among the columns the table always opens on
POINTS = ["0.0", "0.0001", "0.001"]


class Lab:
    """What the user made: their data, the three experiments, the figures the staged run drew."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = write_varied_folder(base / "mine", CLASSES)
        self.staged = base / "staged"
        self.sweep = base / "sweep"
        self.optuna = base / "optuna"
        self.figures: list[dict] = []

    def args(self) -> list[str]:
        return [*OWN, f"data.root={self.data}"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    lab = Lab(tmp_path_factory.mktemp("lab"))
    drawn = ValidationImages.figures

    def figures(self, trainer, module):  # each figure as it is handed on to be rendered
        for head, name, fig in drawn(self, trainer, module):
            width, height = fig.get_size_inches() * fig.dpi
            texts = [t.get_text() for t in fig.findobj(Text) if t.get_visible()]
            lab.figures.append({"stage": Path(trainer.default_root_dir).name, "name": name, "size": (width, height), "texts": texts})  # fmt: skip
            yield head, name, fig

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ValidationImages, "figures", figures)
        train(cfg_of("config", lab.args(), lab.staged))  # the default: FCN-32s -> 16s -> 8s
    quiet = "images.every_n_epochs=0"  # the sweeps' figures: not read here (the staged run's are)
    sweep = cli("-m", *lab.args(), quiet, "arch=fcn32s", f"{SWEPT}={','.join(POINTS)}",
                f"hydra.sweep.dir={lab.sweep}", cwd=lab.base)  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    study = cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *lab.args(), quiet,
                "arch=fcn32s", f"hydra.sweep.dir={lab.optuna}", cwd=lab.base)  # fmt: skip
    assert study.returncode == 0, study.stderr[-3000:]
    lab.study_said = study.stdout + study.stderr
    return lab


def jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / "run.json").is_file()), key=lambda p: int(p.name.split("_")[0]))  # fmt: skip


def test_figures_are_labelled_and_large_enough_to_read(lab):
    stages = ["fcn32s", "fcn16s", "fcn8s"]
    drawn = {(f["stage"], f["name"]) for f in lab.figures}
    assert drawn == {(s, n) for s in stages for n in ("confusion_matrix", "predictions", "per_class_IoU")}  # fmt: skip
    for figure in lab.figures:
        width, height = figure["size"]
        # read on a dashboard at its own size: a line of text per class, room for the names
        assert width >= 400 and height >= max(200, 15 * len(CLASSES)), figure
        texts = figure["texts"]
        if figure["name"] in ("confusion_matrix", "per_class_IoU"):
            # every class by name: both axes of the matrix, each bar of the chart
            for name in CLASSES:
                assert texts.count(name) >= (2 if figure["name"] == "confusion_matrix" else 1), (figure["name"], name, texts)  # fmt: skip
        else:  # the panels' legend: names of classes, and nothing but
            legend = [t for t in texts if t in CLASSES]
            assert legend and len(legend) == len(set(legend)), texts
    for stage in stages:  # and the last of each as a PNG beside the stage
        pngs = sorted(p.name for p in (lab.staged / stage / "figures").glob("*.png"))
        assert pngs == ["confusion_matrix.png", "per_class_IoU.png", "predictions.png"]


def test_sweep_folders_and_run_names_say_what_differs(lab):
    folders = [p.name for p in jobs(lab.sweep)]
    # the swept key and its value, not what every job shares (arch, data, the tiny settings)
    assert folders == [f"{i}_{SWEPT}={v}" for i, v in enumerate(POINTS)]
    trials = [p.name for p in jobs(lab.optuna)]
    assert len(trials) == 2
    for i, name in enumerate(trials):
        assert re.fullmatch(rf"{i}_optimizer\.lr=[-.e0-9]+,optimizer\.weight_decay=[-.e0-9]+", name), name  # fmt: skip
    # Optuna left out the cuts into later stages: arch=fcn32s trains one
    assert "optuna: not searching stages.fcn16s.lr_factor, stages.fcn8s.lr_factor" in lab.study_said
    summary = (lab.sweep / "summary.txt").read_text()
    assert all(f"{SWEPT}={v}" in summary for v in POINTS), summary
    # equal scores are a tie, not a best
    scores = {
        json.loads((j / "metrics.json").read_text())["fcn32s"]["mIoU"] for j in jobs(lab.sweep)
    }
    assert ("tie between jobs 0, 1, 2" in summary) == (len(scores) == 1), summary


@pytest.mark.parametrize("sweep, swept", [("sweep", [SWEPT]), ("optuna", ["optimizer.lr", SWEPT])])
def test_tensorboard_shows_each_job_by_name_and_opens_on_the_swept_keys(
    lab, sweep, swept, tmp_path
):
    folder = getattr(lab, sweep)
    with serve(folder, tmp_path / "tensorboard.log") as board:
        names = [f"{job.name}/tensorboard/fcn32s" for job in jobs(folder)]
        assert sorted(board.get("/data/runs")) == sorted(names)
        experiment = board.experiment()
        # it opens on the swept keys, arch and lr: five columns marked, listed first (TensorBoard
        # shows five of the marked columns and no more; the server sorts them by name)
        infos = [h["name"] for h in experiment["hparamInfos"]]
        opening = [*(f"run/swept/{k}" for k in swept), *SHOWN][:5]
        assert opening[len(swept) : len(swept) + 2] == ["model/arch", "optimizer/lr"]
        marked = [h["name"] for h in experiment["hparamInfos"] if h.get("differs")]
        assert set(marked) == set(infos[:5]) == set(opening), marked
        groups = {g["name"]: g for g in board.session_groups()}
        assert set(groups) == set(names)
        for job, name in zip(jobs(folder), names, strict=True):
            hparams = groups[name]["hparams"]
            metrics = json.loads((job / "metrics.json").read_text())["fcn32s"]
            values = {m["name"]["tag"]: m["value"] for m in groups[name]["metricValues"]}
            assert math.isclose(values["hp/mIoU"], metrics["mIoU"], rel_tol=1e-6, abs_tol=1e-7)
            config = json.loads((job / "run.json").read_text())["config"]
            for key in swept:  # the value the job trained with
                assert math.isclose(
                    hparams[f"run/swept/{key}"], config["optimizer"][key.split(".")[1]]
                )


def test_compare_puts_every_run_of_every_experiment_in_one_table(lab, capsys):
    assert compare.main(["--format", "json", str(lab.staged), str(lab.sweep), str(lab.optuna)]) == 0
    rows = json.loads(capsys.readouterr().out)
    runs = [lab.staged, *jobs(lab.sweep), *jobs(lab.optuna)]
    names = ["staged", *(f"sweep/{j.name}" for j in jobs(lab.sweep)), *(f"optuna/{j.name}" for j in jobs(lab.optuna))]  # fmt: skip
    stages = [["fcn32s", "fcn16s", "fcn8s"]] + [["fcn32s"]] * 5
    assert [(r["run"], r["stage"]) for r in rows] == [(n, s) for n, st in zip(names, stages, strict=True) for s in st]  # fmt: skip
    # the settings that differ, as columns: the arch, the lr and weight decay Optuna drew; not the
    # data, the widths or anything all runs share
    columns = list(rows[0])
    settings = columns[2 : columns.index(METRIC_TITLES["mIoU"])]
    assert {"arch.name", "optimizer.lr", SWEPT} <= set(settings), settings
    assert not [c for c in settings if c.startswith(("data.", "trainer.")) or c == "arch.width"], (
        settings
    )
    i = 0
    for run, run_stages in zip(runs, stages, strict=True):
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "run.json").read_text())["config"]
        for stage in run_stages:
            row = rows[i]
            i += 1
            for key in METRIC_NAMES:
                assert row[METRIC_TITLES[key]] == round(100 * metrics[stage][key], 1), (row, key)
            assert row[SWEPT] == config["optimizer"]["weight_decay"]
            assert row["optimizer.lr"] == config["optimizer"]["lr"]
