"""The whole path on data as varied as the real thing: images of several sizes, portrait and
landscape, greyscale, CMYK, RGBA, 16-bit, palette and plain labels with 255 borders, in the
official layouts: train.py (staged, with validation panels) and eval.py as commands (processes
forked from helpers.launcher's server), the folder runs and predict in-process (predict's command
is run by test_predict.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, cfg_of
from helpers.datasets import (
    VARIED_FOLDER,
    VARIED_VOC,
    VARIED_VOC_VAL,
    write_binary_masks_folder,
    write_varied_folder,
    write_varied_voc,
)
from helpers.launcher import commands
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcn_lightning.app.common import as_command
from fcn_lightning.app.predict import predict
from fcn_lightning.app.train import train

SMALL = [
    "arch.width=0.0625",
    "arch.pretrained=null",
    "arch.backbone=vgg16_bn",
    "arch.dropout=0.0",
    "data.num_workers=0",
    "trainer.max_steps=2",
    "trainer.max_epochs=-1",
    "trainer.accumulate_grad_batches=1",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.accelerator=cpu",
    "images.panel_size=4",
]


def panels(run_dir: Path, stage: str, tag: str = "val/predictions") -> list:
    events = EventAccumulator(str(run_dir / "tensorboard" / stage), size_guidance={"images": 0})
    events.Reload()
    return events.Images(tag) if tag in events.Tags()["images"] else []


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("voc")
    root = write_varied_voc(base / "pascal")
    out = base / "run"
    (result,) = commands([
        ROOT / "train.py", "arch=fcn16s", "data=voc", f"data.root={root}", "data.year=2012",
        "data.train_split=train", "data.val_split=val", *SMALL, f"hydra.run.dir={out}",
    ], cwd=base)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return root, out, result


@pytest.mark.xdist_group("real_inputs_voc_run")  # one worker computes the module fixture once
def test_staged_voc_run_on_varied_images(voc_run):
    _, out, result = voc_run
    assert list(json.loads((out / "metrics.json").read_text())) == ["fcn32s", "fcn16s"]
    assert "label check" in result.stdout and "val: 4 images" in result.stdout
    widths = {size[1] for i, _, size in VARIED_VOC if i in VARIED_VOC_VAL}
    assert len(widths) > 1  # the panel had to take validation images of different widths
    for stage in ("fcn32s", "fcn16s"):
        (panel, *_) = panels(out, stage)
        assert panel.width >= 400 and (out / stage / "figures" / "predictions.png").is_file()
        assert panels(out, stage, "val/confusion_matrix")


@pytest.mark.xdist_group("real_inputs_voc_run")  # one worker computes the module fixture once
def test_eval_on_varied_images(voc_run, tmp_path):
    root, out, _ = voc_run
    ckpt = out / "fcn16s/checkpoints/best.ckpt"
    (result,) = commands([
        ROOT / "eval.py", f"ckpt_path={ckpt}", "data=voc", f"data.root={root}", "data.year=2012",
        "data.split=val", "data.num_workers=0", "trainer.accelerator=cpu", f"output={tmp_path}",
    ], cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    trained = json.loads((out / "metrics.json").read_text())["fcn16s"]
    assert report["metrics"]["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-6)


@pytest.mark.xdist_group("real_inputs_voc_run")  # one worker computes the module fixture once
def test_predict_on_every_image_format(voc_run, tmp_path):
    _, out, _ = voc_run
    folder = write_varied_folder(tmp_path / "mine") / "JPEGImages"
    args = [f"ckpt_path={out / 'fcn16s/checkpoints/best.ckpt'}", f"input={folder}",
            f"output={tmp_path / 'pred'}", "device=cpu"]  # fmt: skip
    written = predict(cfg_of("predict", args, tmp_path / "run"))
    assert len(written) == len(VARIED_FOLDER)
    for i, _, (h, w) in VARIED_FOLDER:
        label = Image.open(tmp_path / "pred" / f"{i}.png")
        assert label.mode == "P" and label.size == (w, h), i
        assert np.asarray(label).max() < 21


def test_folder_run_on_every_image_format(tmp_path):
    root = write_varied_folder(tmp_path / "mine")
    overrides = ["arch=fcn32s", "data=folder", f"data.root={root}", "data.batching=pad",
                 "data.batch_size=2", "data.scale_range=null", *SMALL]  # fmt: skip
    train(cfg_of("config", overrides, tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["fcn32s"]
    assert set(metrics["per_class_IoU"]) == {"background", "cat", "dog", "car"}
    assert panels(tmp_path / "run", "fcn32s")


def test_binary_masks_saved_as_0_255_are_named_and_mapped(tmp_path, capsys):
    # as the command runs it (as_command: a typed error is printed, no traceback, an exit status)
    root = write_binary_masks_folder(tmp_path / "masks")
    args = ["arch=fcn32s", "data=folder", f"data.root={root}", "data.batching=pad",
            "data.batch_size=2", "data.scale_range=null", *SMALL]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as plain:
        as_command(train, cfg_of("config", args, tmp_path / "a"))
    assert plain.value.code not in (0, None)  # not a run that reports 100% on ignored objects
    said = capsys.readouterr().err
    assert "holds only class ['background']" in said
    assert "data.label_map={255: 1}" in said and "Traceback" not in said
    assert not list((tmp_path / "a").glob("fcn32s/checkpoints/*.ckpt"))
    as_command(train, cfg_of("config", [*args, "data.label_map={255: 1}"], tmp_path / "b"))
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())["fcn32s"]
    assert metrics["per_class_IoU"]["object"] is not None  # foreground is a class, not ignored
