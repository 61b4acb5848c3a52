"""NYUDv2 modalities and fusion, SIFT Flow's two heads, end to end on generated fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io
import torch
from helpers import FIGURES, ROOT, TINY_NOSYN, cfg_of
from helpers.datasets import SIFT_SUBDIR, one_head, write_nyud, write_siftflow
from helpers.launcher import commands
from PIL import Image

from fcn_lightning.app.evaluate import evaluate
from fcn_lightning.app.predict import predict
from fcn_lightning.app.train import train
from fcn_lightning.data import DataError, NYUDDataModule, SiftFlowDataModule
from fcn_lightning.errors import ConfigError
from fcn_lightning.models import LateFusionFCN, build_fcn, compose_late_fusion, transfer_stage
from fcn_lightning.module import FCNModule

WHOLE = {"batching": "pad", "crop_size": None, "scale_range": None, "hflip": False}


@pytest.fixture
def nyud(tmp_path):
    return write_nyud(
        tmp_path / "nyud", {"train": ["5001", "5002"], "val": ["5003"], "test": ["5004", "5005"]}
    )


@pytest.fixture
def sift(tmp_path):
    return write_siftflow(
        tmp_path / "sift",
        train=["coast_a1", "street_b2", "tallbuilding_c3"],
        test=["coast_t1", "highway_t2"],
        unlabelled=["highway_bost181"],
    )


# --------------------------------------------------------------------------- NYUDv2
@pytest.mark.parametrize(
    "modality,channels", [("rgb", 3), ("hha", 3), ("depth", 1), ("rgbd", 4), ("rgb+hha", 6)]
)
def test_nyud_modalities(nyud, modality, channels):
    dm = NYUDDataModule(nyud, modality=modality, **WHOLE)
    dm.setup("fit")
    assert (
        dm.contract.in_channels == channels and len(dm.datasets["train"]) == 3
    )  # trainval = 2 + 1
    assert len(dm.datasets["val"]) == 2  # the test split
    image, label = one_head(dm.datasets["train"][0])
    assert image.shape == (channels, 30, 40) and image.dtype == torch.float32
    assert label.shape == (30, 40) and label.dtype == torch.int64
    assert dm.contract.num_classes == {"out": 40} and dm.contract.class_names("out")[0] == "wall"


def test_nyud_label_mapping(nyud):
    seg = scipy.io.loadmat(nyud / "segmentation" / "img_5004.mat")["segmentation"]
    dm = NYUDDataModule(nyud, **WHOLE)
    dm.setup("validate")
    _, label = one_head(dm.datasets["val"][0])
    label = label.numpy()
    assert (label[seg == 0] == 255).all()  # void
    assert (label[seg > 0] == seg[seg > 0] - 1).all()  # 1..40 -> 0..39
    assert label[seg > 0].max() <= 39


def test_nyud_depth_channel_is_log_depth_and_not_normalised_as_rgb(nyud):
    from PIL import Image

    dm = NYUDDataModule(nyud, modality="rgbd", **WHOLE)
    dm.setup("validate")
    image, _ = dm.datasets["val"][0]
    depth = np.asarray(Image.open(nyud / "data/depth/img_5004.png"), dtype=np.float32)
    np.testing.assert_allclose(image[3].numpy(), np.log(depth) - 7.844, rtol=1e-5)


def test_nyud_bad_input(nyud, tmp_path):
    import shutil

    shutil.rmtree(nyud / "data" / "hha")
    with pytest.raises(DataError, match="data.modality=hha needs .*data/hha, which does not exist"):
        NYUDDataModule(nyud, modality="hha").setup("fit")
    scipy.io.savemat(
        nyud / "segmentation" / "img_5004.mat", {"labels": np.zeros((30, 40), np.uint8)}
    )
    dm = NYUDDataModule(nyud, **WHOLE)
    dm.setup("validate")
    with pytest.raises(
        DataError, match=r"img_5004.mat has no 'segmentation' key \(found \['labels'\]\)"
    ):
        dm.datasets["val"][0]
    scipy.io.savemat(
        nyud / "segmentation" / "img_5004.mat", {"segmentation": np.full((30, 40), 77, np.uint8)}
    )
    with pytest.raises(DataError, match=r"values \[76\] outside 0..39"):
        dm.datasets["val"][0]
    with pytest.raises(ValueError, match="data.modality must be one of"):
        NYUDDataModule(nyud, modality="thermal")


def test_late_fusion_output_is_the_average_of_the_streams():
    torch.manual_seed(0)
    fused = build_fcn("fcn32s", width=1 / 16, num_classes=4, streams={"rgb": 3, "hha": 3}).eval()
    assert isinstance(fused, LateFusionFCN)
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(std=0.05)
        x = torch.randn(2, 6, 40, 36)
        out = fused(x)["out"]
        rgb = fused.streams["rgb"](x[:, :3])["out"]
        hha = fused.streams["hha"](x[:, 3:])["out"]
    torch.testing.assert_close(out, (rgb + hha) / 2)
    assert out.shape == (2, 4, 40, 36)


def test_late_fusion_composed_from_two_single_modality_checkpoints(tmp_path):
    rgb = build_fcn("fcn32s", width=1 / 16, num_classes=4)
    hha = build_fcn("fcn32s", width=1 / 16, num_classes=4)
    with torch.no_grad():
        hha.trunk.features[0].weight.add_(1.0)
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in hha.state_dict().items()}},
        tmp_path / "hha.ckpt",
    )
    fused = compose_late_fusion({"rgb": rgb, "hha": tmp_path / "hha.ckpt"})
    torch.testing.assert_close(
        fused.streams["hha"].trunk.features[0].weight, hha.trunk.features[0].weight
    )
    # and the staged transfer works stream by stream: fused 32s -> fused 16s
    fused16 = transfer_stage(
        fused, build_fcn("fcn16s", width=1 / 16, num_classes=4, streams={"rgb": 3, "hha": 3})
    )
    torch.testing.assert_close(fused16.streams["hha"].trunk.fc7.weight, hha.trunk.fc7.weight)


def test_rgbd_initial_conv1_equals_rgb_net_with_zero_depth(tmp_path):
    import torchvision

    with torch.device("meta"):  # the layout alone: no weights made
        layout = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    # a VGG16 file whose conv1 is random: the only layer compared; the others zeros, one stored
    # number each (expanded to their shapes)
    state = {k: torch.zeros(()).expand(shape) for k, shape in layout.items()}
    state["features.0.weight"] = torch.randn(layout["features.0.weight"]) * 0.1
    state["features.0.bias"] = torch.randn(layout["features.0.bias"]) * 0.1
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    rgb = build_fcn("fcn32s", pretrained=path, geometry="same").trunk.conv1_1
    rgbd = build_fcn("fcn32s", pretrained=path, geometry="same", in_channels=4).trunk.conv1_1
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rgbd(torch.cat([x, torch.zeros(1, 1, 16, 16)], 1)), rgb(x))


# --------------------------------------------------------------------------- SIFT Flow
def test_siftflow_splits_and_label_mapping(sift):
    dm = SiftFlowDataModule(sift, **WHOLE)
    with pytest.warns(
        UserWarning, match="1 image\\(s\\) without annotation left out: highway_bost181"
    ):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 2
    assert dm.contract.num_classes == {"sem": 33, "geo": 3}
    _, target = dm.datasets["val"][0]
    assert set(target) == {"sem", "geo"}
    sem = scipy.io.loadmat(sift / "SemanticLabels" / SIFT_SUBDIR / "coast_t1.mat")["S"]
    geo = scipy.io.loadmat(sift / "GeoLabels" / SIFT_SUBDIR / "coast_t1.mat")["S"]
    assert (target["sem"].numpy()[sem == 0] == 255).all() and (
        target["sem"].numpy()[sem > 0] == sem[sem > 0] - 1
    ).all()
    assert (target["geo"].numpy()[geo == -1] == 255).all()  # -1 -> 0 -> void
    assert (target["geo"].numpy()[geo > 0] == geo[geo > 0] - 1).all()
    assert set(target["geo"].unique().tolist()) <= {0, 1, 2, 255}


def test_siftflow_bad_input(sift):
    (sift / "TestSet1.txt").unlink()
    with pytest.raises(DataError, match="TestSet1.txt not found"):
        SiftFlowDataModule(sift).setup("fit")


def test_two_headed_module_metrics_per_head():
    module = FCNModule(
        {"arch": "fcn16s", "heads": {"sem": 33, "geo": 3}, "width": 1 / 16, "geometry": "same"}
    )
    images = torch.randn(2, 3, 32, 32)
    targets = {"sem": torch.randint(0, 33, (2, 32, 32)), "geo": torch.randint(0, 3, (2, 32, 32))}
    logits = module(images)
    assert module.loss(logits, targets) > 0
    for head in ("sem", "geo"):
        module.metrics["val"][head].update(logits[head].argmax(1), targets[head])
    assert module.metrics["val"]["geo"].compute()["confmat"].shape == (3, 3)
    assert module.metrics["val"]["sem"].compute()["confmat"].shape == (33, 33)


def test_exclude_absent_classes_switch():
    from fcn_lightning.metrics import HeadMetrics

    full, excl = HeadMetrics(3), HeadMetrics(3, exclude_absent=True)
    pred = torch.tensor([0, 1, 2, 2])
    gt = torch.tensor([0, 1, 1, 1])  # class 2 never in ground truth but predicted
    for m in (full, excl):
        m.update(pred, gt)
    assert float(full.compute()["mIoU"]) == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert float(excl.compute()["mIoU"]) == pytest.approx((1 + 1 / 3) / 2)


# --------------------------------------------------------------------------- end to end


def test_train_nyud_rgbd_16s(nyud, tmp_path):
    cfg = cfg_of(
        "config",
        [
            "arch=fcn16s",
            "data=nyud",
            f"data.root={nyud}",
            "data.modality=rgbd",
            *TINY_NOSYN,
            FIGURES,
        ],
        tmp_path / "run",
    )
    train(cfg)
    assert (tmp_path / "run" / "fcn16s" / "figures" / "predictions.png").is_file()  # RGB of RGB-D
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics) == ["fcn32s", "fcn16s"] and len(metrics["fcn16s"]["per_class_IoU"]) == 40
    # the 4-channel checkpoint on 3-channel data, or on photos: refused, naming the inputs
    ckpt = tmp_path / "run" / "fcn16s" / "checkpoints" / "best.ckpt"
    evaluation = ["data=nyud", f"data.root={nyud}", f"ckpt_path={ckpt}", "trainer.accelerator=cpu"]
    with pytest.raises(
        ConfigError, match=r"takes 4 input channels but the data gives 3[\s\S]*data.modality"
    ):
        evaluate(cfg_of("eval", evaluation, tmp_path / "eval"))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (20, 16)).save(photos / "a.jpg")
    with pytest.raises(ConfigError, match="predict.py reads photos .* takes 4 input channels"):
        predict(
            cfg_of(
                "predict",
                [f"ckpt_path={ckpt}", f"input={photos}", f"output={tmp_path / 'out'}"],
                tmp_path / "p",
            )
        )
    assert not (tmp_path / "out").exists()  # refused before any work


def test_train_nyud_late_fusion_from_two_checkpoints(nyud, tmp_path):
    runs = {}
    for modality in ("rgb", "hha"):
        cfg = cfg_of(
            "config",
            [
                "arch=fcn32s",
                "data=nyud",
                f"data.root={nyud}",
                f"data.modality={modality}",
                *TINY_NOSYN,
            ],
            tmp_path / modality,
        )
        train(cfg)
        runs[modality] = tmp_path / modality / "fcn32s/checkpoints/best.ckpt"
    fused = cfg_of("config", ["arch=fcn32s", "data=nyud", f"data.root={nyud}", "data.modality=rgb+hha",
                              f"+arch.init_streams={{rgb: {runs['rgb']}, hha: {runs['hha']}}}", *TINY_NOSYN, FIGURES], tmp_path / "fused")  # fmt: skip
    train(fused)
    assert (tmp_path / "fused" / "fcn32s" / "figures" / "predictions.png").is_file()  # two streams
    assert "fcn32s" in json.loads((tmp_path / "fused" / "metrics.json").read_text())
    assert json.loads((tmp_path / "fused" / "run.json").read_text())["stages"]["fcn32s"]["lr"] == (
        pytest.approx(1e-5)  # optimizer.lr 1e-3 x the fusion cut 0.01: one stage further
    )
    # the two checkpoints swapped: refused before training, naming both inputs
    swapped = cfg_of("config", ["arch=fcn32s", "data=nyud", f"data.root={nyud}", "data.modality=rgb+hha",
                                f"+arch.init_streams={{rgb: {runs['hha']}, hha: {runs['rgb']}}}", *TINY_NOSYN], tmp_path / "swapped")  # fmt: skip
    with pytest.raises(ConfigError, match=r"arch.init_streams.rgb: .*hha input.*swapped"):
        train(swapped)
    assert not (tmp_path / "swapped" / "fcn32s" / "checkpoints").exists()


def test_train_nyud_fcn16s(nyud, tmp_path):
    # in-process: the command itself is run on SIFT Flow below
    overrides = ["arch=fcn16s", "data=nyud", f"data.root={nyud}", *TINY_NOSYN]
    train(cfg_of("config", overrides, tmp_path / "run"))
    assert list(json.loads((tmp_path / "run" / "metrics.json").read_text())) == ["fcn32s", "fcn16s"]


def test_cli_train_siftflow_fcn16s_two_heads(sift, tmp_path):
    # a process of its own, forked from helpers.launcher's server (train.py's imports done)
    (result,) = commands(
        [
            ROOT / "train.py",
            "arch=fcn16s",
            "data=siftflow",
            f"data.root={sift}",
            *TINY_NOSYN,
            "trainer.max_steps=2",  # a whole epoch: a validation during training draws the curves
            "exclude_absent_classes=true",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["fcn16s"]) == {"sem", "geo"}
    assert (
        len(metrics["fcn16s"]["sem"]["per_class_IoU"]) == 33
        and len(metrics["fcn16s"]["geo"]["per_class_IoU"]) == 3
    )
    assert "excluded_classes" in metrics["fcn16s"]["sem"]
    assert "fcn16s/sem" in result.stdout and "fcn16s/geo" in result.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "fcn16s"))
    events.Reload()
    assert {"val/sem/mIoU", "val/geo/pixel_acc"} <= set(events.Tags()["scalars"])
