"""The paper's Table 1 trunks: FCN-AlexNet and FCN-GoogLeNet beside FCN-VGG16 (docs/TRUNKS.md).

CPU only, no downloads: pretrained weights are state dicts saved here from randomly initialised
torchvision models.
"""

from __future__ import annotations

import copy
import itertools
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import TINY as TINY_RUN
from helpers import cfg_of
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn
from torchvision.models.googlenet import GoogLeNet

from fcn_lightning.app.checks import check_settings
from fcn_lightning.app.train import train
from fcn_lightning.bench import model_cost
from fcn_lightning.errors import ConfigError
from fcn_lightning.models import (
    BACKBONES,
    FCN,
    TRUNKS,
    AlexNetTrunk,
    GoogLeNetTrunk,
    PretrainedWeightsUnavailable,
    alexnet_fc8_as_conv,
    build_fcn,
    googlenet_fc_as_conv,
    receptive_field,
    transfer_stage,
)
from fcn_lightning.models import weights as weights_mod
from fcn_lightning.models.trunks import DILATABLE, OUTPUT_STRIDES

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
NEW = ("alexnet", "googlenet")
TINY = 1 / 32
SIZES = [(1, 1), (1, 9), (9, 1), (31, 33), (33, 17), (17, 33), (64, 48), (97, 131), (250, 187)]


def tiny(arch: str, backbone: str, geometry: str = "paper", **kw):
    return build_fcn(arch, backbone=backbone, width=TINY, geometry=geometry, **kw).eval()


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("geometry", ["paper", "same"])
@pytest.mark.parametrize("arch", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("backbone", NEW)
def test_output_size_equals_input(backbone, arch, geometry):
    model = tiny(arch, backbone, geometry, num_classes=3)
    with torch.no_grad():
        for name, p in model.heads.named_parameters():
            if ".score" in name:
                p.normal_(std=0.1)
        for size in SIZES:
            out = model(torch.randn(1, 3, *size))["out"]
            assert out.shape == (1, 3, *size), size
            # every pixel is upsampled from the scores (none lies past the maps' edges)
            assert (out.abs().sum(1) > 0).all(), size


# The offsets the heads derive from the taps. AlexNet's taps sit on whole pixels (3x3 poolings):
# upsampled with odd kernels (3 per 2x step, 2f - 1 for the last), fc7 at 32i + 13 comes out at
# the reference FCN-AlexNet's crop 18 (its 63 kernel), and so does every arch's output. GoogLeNet's
# margin is not eaten by a valid fc6, so its crops are larger; its 2x2 maxpool4 puts inception5b
# between inception4e's pixels (a 4 kernel there); a skip may start one pixel after the upsampled
# map (docs/TRUNKS.md, Geometry and the half pixel).
OFFSETS = {
    ("alexnet", "fcn32s"): {"final": 18},
    ("alexnet", "fcn16s"): {"pool4": 5, "final": 18},
    ("alexnet", "fcn8s"): {"pool4": 5, "pool3": 10, "final": 18},
    ("googlenet", "fcn32s"): {"final": 106},
    ("googlenet", "fcn16s"): {"pool4": -1, "final": 98},
    ("googlenet", "fcn8s"): {"pool4": -1, "pool3": 0, "final": 98},
}


@pytest.mark.parametrize("backbone,arch", list(OFFSETS))
def test_crop_offsets_derived_from_the_taps(backbone, arch):
    assert tiny(arch, backbone).heads["out"].offsets == OFFSETS[backbone, arch]
    same = tiny(arch, backbone, "same").heads["out"].offsets
    assert same == dict.fromkeys(OFFSETS[backbone, arch], 0)


def test_taps_strides_channels_and_exact_coordinate_maps():
    a, g = AlexNetTrunk(width=0.25), GoogLeNetTrunk(width=0.25)
    assert {k: (t.stride, t.channels) for k, t in a.taps.items()} == {
        "pool3": (8, 16),  # pool1: conv1's 64 filters
        "pool4": (16, 48),  # pool2: conv2's 192
        "final": (32, 1024),  # fc7: 4096
    }
    assert {k: (t.stride, t.channels) for k, t in g.taps.items()} == {
        "pool3": (8, 120),  # inception3b: 480
        "pool4": (16, 208),  # inception4e: 832
        "final": (32, 256),  # inception5b: 1024
    }
    # the exact coordinate maps (paper geometry), on whole pixels: nothing declared half a pixel
    # on, no map resampled (the heads' odd kernels register them: tests/test_registration.py)
    assert {k: t.origin for k, t in a.taps.items()} == {
        "pool3": -91.0,  # pool1
        "pool4": -83.0,  # pool2
        "final": 13.0,  # fc7, as the reference's FCN-AlexNet
    }
    assert {k: t.origin for k, t in g.taps.items()} == {
        "pool3": -91.0,  # inception3b
        "pool4": -83.0,  # inception4e
        "final": -75.0,  # inception5b: a 2x2 maxpool4 on, half a stride-16 pixel
    }
    same = {b: TRUNKS[b](width=TINY, geometry="same").taps for b in NEW}
    assert {b: {k: t.origin for k, t in taps.items()} for b, taps in same.items()} == {
        "alexnet": {"pool3": -1.0, "pool4": -1.0, "final": 15.0},
        "googlenet": {"pool3": -1.0, "pool4": 7.0, "final": 15.0},
    }
    for trunk in (a, g):
        assert not any(isinstance(m, nn.AvgPool2d | nn.ReplicationPad2d) for m in trunk.modules())


def _gradient_support(trunk: nn.Module, tap: str, height: int) -> tuple[float, int, int]:
    """Which input rows one pixel of a tap depends on, found by backpropagation through a copy
    of the trunk whose weights are positive and whose max poolings average (so that every input
    of every window gets a gradient): (centre row, its first and last row)."""
    t = copy.deepcopy(trunk).eval().double()
    for m in list(t.modules()):
        for name, child in m.named_children():
            if isinstance(child, nn.MaxPool2d):
                avg = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode)
                setattr(m, name, avg)
    for m in t.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.1)
    x = torch.ones(1, 3, height, 5, dtype=torch.float64, requires_grad=True)
    y = t(x)[tap]
    i = y.shape[-2] // 2
    y[0, :, i, y.shape[-1] // 2].sum().backward()
    rows = (x.grad[0].abs().sum((0, 2)) > 0).nonzero().flatten()
    return i, int(rows.min()), int(rows.max())


@pytest.mark.parametrize("geometry", ["paper", "same"])
@pytest.mark.parametrize("backbone", ["vgg16", "alexnet", "googlenet"])
def test_coordinate_maps_and_receptive_fields_agree_with_backpropagation(backbone, geometry):
    trunk = TRUNKS[backbone](width=TINY, geometry=geometry)
    for name, tap in trunk.taps.items():
        i, first, last = _gradient_support(trunk, name, 640)
        assert 0 < first and last < 639, (name, first, last)  # the whole field inside the input
        assert last - first + 1 == tap.field, name
        assert (first + last) / 2 == tap.origin + tap.stride * i, name


def test_receptive_fields_are_the_papers_definition():
    # the side of the input square one pixel of the last map sees, kernels only (paper, Table 1):
    # VGG16 404 and AlexNet 355 as in the paper; torchvision's GoogLeNet 379 (see below)
    fields = {b: TRUNKS[b](width=TINY).taps["final"].field for b in ("vgg16", "alexnet")}
    assert fields == {"vgg16": 404, "alexnet": 355}
    assert GoogLeNetTrunk(width=TINY).taps["final"].field == 379
    # The paper's 907 is Caffe's GoogLeNet up to its classifier: 5x5 convolutions in the third
    # branches, a 3x3 pool4, and the 7x7 average pooling (which the FCN drops).
    with torch.device("meta"):
        ref = GoogLeNet(aux_logits=False, init_weights=False)
    layers = []
    for name, m in ref.named_children():
        if name.startswith("inception"):
            five = nn.Conv2d(1, 1, 5, padding=2)  # Caffe's 5x5 where torchvision has 3x3
            layers.append((m.branch1, m.branch2, [m.branch3[0], five], m.branch4))
        elif name == "maxpool4":
            layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
        elif name == "avgpool":
            layers.append(nn.AvgPool2d(7, 1))
            break
        else:
            layers.append(m)
    assert receptive_field(layers) == 907
    assert receptive_field(layers[:-1]) == 715  # without the average pooling


# --------------------------------------------------------------------------- torchvision's nets
@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    torch.manual_seed(1)
    net = torchvision.models.alexnet().eval()
    path = tmp_path_factory.mktemp("weights") / "alexnet.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def googlenet_file(tmp_path_factory):
    torch.manual_seed(2)
    # as torchvision's pretrained GoogLeNet: input transform on, auxiliary heads in the file
    net = GoogLeNet(aux_logits=True, transform_input=True, init_weights=True).eval()
    with torch.no_grad():  # activations that keep their scale; batch norm not the identity
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("weights") / "googlenet.pth"
    torch.save(net.state_dict(), path)
    assert any(k.startswith("aux1.") for k in net.state_dict())
    return net, path


def test_convolutionalised_alexnet_equals_torchvision_classifier(alexnet_file):
    net, path = alexnet_file
    trunk = build_fcn("fcn32s", backbone="alexnet", pretrained=path).trunk.eval()
    trunk.conv1.padding = (2, 2)  # torchvision's, instead of the paper geometry's 100
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fc7 = trunk(x)["final"]
        assert fc7.shape == (1, 4096, 1, 1)  # fc6 (6x6 over pool5's 6x6) -> one pixel
        theirs = net.classifier[:6](torch.flatten(net.avgpool(net.features(x)), 1))
        torch.testing.assert_close(fc7.flatten(1), theirs, atol=1e-5, rtol=1e-4)
        fc8 = alexnet_fc8_as_conv(net.state_dict())
        torch.testing.assert_close(fc8(fc7).flatten(1), net(x), atol=1e-5, rtol=1e-4)


def test_googlenet_trunk_computes_torchvisions_pretrained_features(googlenet_file):
    net, path = googlenet_file
    trunk = build_fcn("fcn32s", backbone="googlenet", pretrained=path).trunk.eval()
    trunk.conv1.conv.padding = (3, 3)  # torchvision's, instead of the paper geometry's 100
    seen = {}
    net.inception5b.register_forward_hook(lambda m, i, o: seen.update(out=o))
    x = torch.randn(1, 3, 224, 224)  # ImageNet-normalised input, as both expect it
    with torch.no_grad():
        logits = net(x)
        final = trunk(x)["final"]
        assert final.shape == (1, 1024, 7, 7) and final.abs().mean() > 0.1  # no average pooling
        torch.testing.assert_close(final, seen["out"], atol=1e-4, rtol=1e-4)
        fc = googlenet_fc_as_conv(net.state_dict())
        torch.testing.assert_close(fc(final).mean((2, 3)), logits, atol=1e-4, rtol=1e-4)
        trunk.transform_input = False  # without torchvision's input transform: other features
        assert (trunk(x)["final"] - final).abs().mean() > 0.1 * final.abs().mean()


@pytest.mark.parametrize("backbone", NEW)
def test_pretrained_from_a_file_and_its_errors(backbone, alexnet_file, googlenet_file, tmp_path):
    net, path = alexnet_file if backbone == "alexnet" else googlenet_file
    model = build_fcn("fcn32s", backbone=backbone, pretrained=path)
    first = "features.0.weight" if backbone == "alexnet" else "conv1.conv.weight"
    torch.testing.assert_close(model.trunk.state_dict()[first], net.state_dict()[first])
    rgbd = build_fcn("fcn32s", backbone=backbone, pretrained=path, in_channels=4)
    w = rgbd.trunk.state_dict()[first]
    torch.testing.assert_close(w[:, 3], w[:, :3].mean(1))  # the RGB-D early fusion start
    with pytest.raises(ValueError, match="width=1.0"):
        build_fcn("fcn32s", backbone=backbone, width=0.5, pretrained=path)
    other = googlenet_file[1] if backbone == "alexnet" else alexnet_file[1]
    name = "AlexNet" if backbone == "alexnet" else "GoogLeNet"
    with pytest.raises(ValueError, match=f"does not hold a torchvision-layout {name} state dict"):
        build_fcn("fcn32s", backbone=backbone, pretrained=other)
    partial = tmp_path / "partial.pth"
    state = net.state_dict()
    torch.save(
        {k: v for k, v in state.items() if "inception5b" not in k and "classifier.4" not in k},
        partial,
    )
    with pytest.raises(ValueError, match="state dict lacks"):
        build_fcn("fcn32s", backbone=backbone, pretrained=partial)


@pytest.mark.parametrize("backbone", NEW)
def test_imagenet_weights_read_from_torch_hub_cache(
    backbone, alexnet_file, googlenet_file, tmp_path, monkeypatch
):
    net, path = alexnet_file if backbone == "alexnet" else googlenet_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = weights_mod.TORCHVISION_WEIGHTS[backbone].url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]).write_bytes(path.read_bytes())
    model = build_fcn("fcn32s", backbone=backbone, pretrained="imagenet")
    key = "features.3.weight" if backbone == "alexnet" else "inception4e.branch2.1.conv.weight"
    torch.testing.assert_close(model.trunk.state_dict()[key], net.state_dict()[key])
    assert model.normalization.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    "backbone,file",
    [("alexnet", r"alexnet-owt-7be5be79\.pth"), ("googlenet", r"googlenet-1378be20\.pth")],
)
def test_offline_imagenet_weights_give_clear_error(backbone, file, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    weights = weights_mod.TORCHVISION_WEIGHTS[backbone]
    monkeypatch.setattr(weights.__class__, "get_state_dict", lambda self, *a, **k: offline())
    pattern = rf"{file}[\s\S]*arch\.pretrained=/path/to/{backbone}\.pth[\s\S]*recipe=scratch"
    with pytest.raises(PretrainedWeightsUnavailable, match=pattern):
        build_fcn("fcn32s", backbone=backbone, width=TINY, pretrained="imagenet")


# --------------------------------------------------------------------------- training
def _randomize_scores(model):
    """Scores as after some training, on trunk features of unit scale."""
    with torch.no_grad():
        for m in model.trunk.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        for name, p in model.heads.named_parameters():
            if name.split(".")[1].startswith("score"):
                p.normal_(std=0.1 if name.endswith("weight") else 0.01)
    return model


@pytest.mark.parametrize("backbone", NEW)
def test_stage_transfer_32s_16s_8s_keeps_predictions(backbone):
    kw = dict(backbone=backbone, width=1 / 8, num_classes=5)
    m32 = _randomize_scores(build_fcn("fcn32s", **kw)).eval()
    x = torch.randn(2, 3, 224, 288)
    with torch.no_grad():  # classes balanced, as after training, rather than one everywhere
        m32.heads["out"].score_fr.bias -= m32(x)["out"].mean((0, 2, 3))
    m16 = transfer_stage(m32, build_fcn("fcn16s", **kw)).eval()
    m8 = transfer_stage(m16, build_fcn("fcn8s", **kw)).eval()
    assert m16.heads["out"].score_pool4.weight.abs().sum() == 0
    assert m8.heads["out"].score_pool3.weight.abs().sum() == 0
    for a, b in ((m32, m16), (m16, m8)):
        for key, value in a.trunk.state_dict().items():
            assert torch.equal(value, b.trunk.state_dict()[key]), key
        assert torch.equal(a.heads["out"].score_fr.weight, b.heads["out"].score_fr.weight)
    with torch.no_grad():
        o32, o16, o8 = (m(x)["out"] for m in (m32, m16, m8))
    p32, p16, p8 = (o.argmax(1) for o in (o32, o16, o8))
    assert len(p32.unique()) == 5 and len(p8.unique()) == 5
    # The new stage repeats the previous one's scores through a different chain of bilinear
    # upsamplings. Where the chain's first step is an odd kernel (a coarse pixel on a fine one),
    # the linear interpolation of the linear interpolation is the same one: the same scores (all
    # of AlexNet's steps; GoogLeNet's 16s -> 8s). GoogLeNet's 32s -> 16s step is a 4 kernel (its
    # 2x2 maxpool4): measured, 95.2-97.7% of the pixels keep their class (five balanced classes:
    # many boundaries). Before the odd kernels: AlexNet 97.2% and 99.3%, GoogLeNet 94.9%, 98.7%.
    if backbone == "alexnet":
        torch.testing.assert_close(o32, o16, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o16, o8, atol=1e-4, rtol=1e-4)
    assert (p32 == p16).float().mean() >= 0.93


@pytest.mark.parametrize("backbone", NEW)
def test_state_dict_round_trip(backbone):
    m = tiny("fcn16s", backbone, num_classes=3)
    again = FCN.from_state_dict(m.state_dict()).eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(again(x)["out"], m(x)["out"])
    with pytest.raises(ValueError, match="backbone: checkpoint"):
        tiny("fcn16s", "vgg16", num_classes=3).load_state_dict(m.state_dict(), strict=False)


def test_dropout_after_fc7_and_after_the_last_inception():
    a = AlexNetTrunk(width=TINY, dropout=0.3).eval()
    g = GoogLeNetTrunk(width=TINY, dropout=0.3).eval()
    assert [type(m) for m in (a.drop6, a.drop7, g.dropout)] == [nn.Dropout] * 3
    assert a.drop6.p == a.drop7.p == g.dropout.p == 0.3
    x = torch.randn(1, 3, 128, 96)
    for trunk, drop in ((a, a.drop7), (g, g.dropout)):
        with torch.no_grad():
            kept = trunk(x)["final"]
            drop.train()  # only the last dropout: the final tap is its output
            out = trunk(x)["final"]
        alive = kept != 0
        dropped = (out[alive] == 0).float().mean()
        assert 0.2 < dropped < 0.4, dropped  # element-wise, like Caffe's
        survived = alive & (out != 0)
        torch.testing.assert_close(out[survived], kept[survived] / 0.7)
        assert not any(isinstance(m, nn.AdaptiveAvgPool2d | nn.Linear) for m in trunk.modules())
    assert not hasattr(g, "aux1") and not hasattr(g, "fc")


@pytest.mark.parametrize("backbone", NEW)
def test_tiny_staged_run(backbone, tmp_path, caplog, capsys):
    # in-process (train.py's command is run by test_app, test_console and others)
    # no validation figures (tests/test_board.py's; they draw predictions, not trunks)
    overrides = ["arch=fcn8s", f"arch.backbone={backbone}", *TINY_RUN]
    with caplog.at_level("INFO", logger="fcn_lightning"):
        train(cfg_of("config", overrides, tmp_path))
    said = caplog.text + capsys.readouterr().out
    for stage in ("fcn32s", "fcn16s", "fcn8s"):
        assert f"{stage} done" in said
    ckpt = {
        s: torch.load(tmp_path / f"{s}/checkpoints/best.ckpt", weights_only=True)["state_dict"]
        for s in ("fcn32s", "fcn16s", "fcn8s")
    }
    assert ckpt["fcn8s"]["model._extra_state"]["backbone"] == backbone
    assert "model.heads.out.score_pool3.weight" in ckpt["fcn8s"]
    assert "model.heads.out.score_pool4.weight" in ckpt["fcn16s"]


# --------------------------------------------------------------------------- configs, cost table
def _cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_backbones_registered_and_validated():
    assert set(NEW) <= set(BACKBONES)
    check_settings(_cfg(["arch.backbone=googlenet", "trainer.max_steps=1"]))
    with pytest.raises(
        ConfigError, match=r"arch\.backbone must be one of .*'alexnet', 'googlenet', 'resnet50'"
    ):
        check_settings(_cfg(["arch.backbone=resnet18", "trainer.max_steps=1"]))


@pytest.mark.parametrize("backbone,lr", [("alexnet", 1e-3), ("vgg16", 1e-4), ("googlenet", 5e-5)])
def test_table1_presets(backbone, lr):
    cfg = _cfg([f"experiment=table1_{backbone}", "data.root=/d"])
    assert cfg.arch.name == "fcn32s" and cfg.arch.backbone == backbone and not cfg.staged
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == lr and cfg.optimizer.momentum == 0.9
    assert cfg.data.batch_size == 1 and cfg.trainer.accumulate_grad_batches == 20
    assert (cfg.data.year, cfg.data.train_split, cfg.data.val_split) == (2011, "train", "val")
    assert cfg.data._target_ == "fcn_lightning.data.VOCDataModule"
    check_settings(cfg)


def test_cost_table_per_backbone(capsys):
    model_cost.main(["--trunks", "--size", "64", "64"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    rows = {tuple(w[:3]): w[3:] for w in lines if w and w[0] in BACKBONES}
    strides = {b: OUTPUT_STRIDES if b in DILATABLE else (32,) for b in BACKBONES}
    assert set(rows) == {(b, g, str(s)) for b in BACKBONES for g in ("paper", "same") for s in strides[b]}  # fmt: skip
    # learnt params (M), GFLOP, receptive field, conv layers; dilation keeps all but the GFLOP
    # (ResNet-50: torchvision's 23.51M without fc, + score_fr's 43k)
    for backbone, params, field, convs in [
        ("vgg16", 134.3, 404, 16),
        ("alexnet", 57.1, 355, 8),
        ("googlenet", 5.6, 379, 22),
        ("resnet50", 23.6, 427, 50),
        ("resnet101", 42.5, 971, 101),
    ]:
        for geometry in ("paper", "same"):
            gflops = []
            for stride in strides[backbone]:
                p, gflop, rf, depth = rows[backbone, geometry, str(stride)]
                assert float(p) == pytest.approx(params, abs=0.05)
                assert (int(rf), int(depth)) == (field, convs)
                gflops.append(float(gflop))
            assert 0 < gflops[0] and all(a < b for a, b in itertools.pairwise(gflops))  # 32, 16, 8
    with torch.device("meta"):
        resnet50 = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    learnt = model_cost.measure((64, 64), arch="fcn32s", backbone="resnet50")["learnt"]
    assert round(learnt * 1e6) == resnet50 - (2048 * 1000 + 1000) + (2048 * 21 + 21)
    # torchvision's FCN: the same parameters as torchvision's model, with the aux head and without
    tv = {w[0]: w[1:] for w in lines if w and w[0].startswith("fcn_resnet")}
    assert set(tv) == {"fcn_resnet50", "fcn_resnet101"}
    for name in tv:
        counts = []
        for aux in (True, False):
            with torch.device("meta"):
                ctor = getattr(torchvision.models.segmentation, name)
                theirs = ctor(weights=None, weights_backbone=None, aux_loss=aux)
            ours = model_cost.measure(
                (64, 64), arch="fcn_torchvision", backbone=name[4:], geometry="same",
                output_stride=8, aux=aux,
            )  # fmt: skip
            counts.append(sum(p.numel() for p in theirs.parameters()))
            assert round(ours["learnt"] * 1e6) == counts[-1], (name, aux)
        stride, with_aux, without, gflop = tv[name]
        assert int(stride) == 8 and float(gflop) > 0
        assert [float(with_aux), float(without)] == pytest.approx([c / 1e6 for c in counts], abs=0.05)  # fmt: skip
