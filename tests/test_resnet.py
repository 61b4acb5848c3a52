"""ResNet trunks at output stride 32 / 16 / 8, torchvision's FCN head and its import: the same
outputs as torchvision, a checkpoint eval.py / predict.py / fine-tuning take, the staged protocol
on a ResNet-50 through train.py, and the refusals of what cannot be built."""

from __future__ import annotations

import json
import re
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, SHARED_DATA, TINY
from helpers.launcher import cli, commands
from torchvision.models import resnet50 as tv_resnet50
from torchvision.models.segmentation import fcn_resnet50, fcn_resnet101

from fcn_lightning.app.torchvision_fcn import torchvision_checkpoint
from fcn_lightning.errors import CheckpointError, PretrainedWeightsUnavailable, UserError
from fcn_lightning.models import build_fcn, transfer_stage
from fcn_lightning.models import torchvision_fcn as tvfcn
from fcn_lightning.models.torchvision_fcn import import_torchvision_fcn
from fcn_lightning.module import FCNModule, load_checkpoint

SIZES = ((33, 47), (64, 64), (97, 81))  # odd, square, taller than wide: none a multiple of 8


def _randomized(net: torch.nn.Module) -> torch.nn.Module:
    """Batch norms with running statistics and affine terms other than their defaults (identity
    batch norms would let a wrong key or order pass), then eval mode."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.3 + 0.2)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return net.eval()


@pytest.mark.parametrize("ctor", [fcn_resnet50, fcn_resnet101], ids=["resnet50", "resnet101"])
def test_an_imported_torchvision_fcn_gives_torchvision_s_out_and_aux(ctor):
    torch.manual_seed(0)
    theirs = _randomized(ctor(weights=None, weights_backbone=None, aux_loss=True))
    ours = import_torchvision_fcn(theirs.state_dict()).eval()
    assert ours.spec.backbone == ctor.__name__.removeprefix("fcn_") and ours.spec.output_stride == 8
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            want, got = theirs(x), ours(x, aux=True)
        assert set(got) == {"out", "aux"}
        for key in ("out", "aux"):
            assert got[key].shape == (2, 21, *size)
            scale = want[key].abs().max()
            # the maps vary over pixels and images far above the tolerance: a match means something
            assert (want[key].amax((0, 2, 3)) - want[key].amin((0, 2, 3))).min() > 1e-3 * scale
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6 * scale)


def test_the_trunk_at_each_output_stride_is_torchvision_s_dilated_resnet(tmp_path):
    # torchvision's ResNet-50 with replace_stride_with_dilation, its ImageNet layout saved as a
    # file and loaded through arch.pretrained: layer4's map is the trunk's final tap
    dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}
    x = torch.randn(1, 3, 61, 75)
    for stride, flags in dilate.items():
        ref = _randomized(tv_resnet50(replace_stride_with_dilation=flags))
        path = tmp_path / f"resnet50_{stride}.pth"
        torch.save(ref.state_dict(), path)
        net = build_fcn("fcn32s", backbone="resnet50", geometry="same", output_stride=stride,
                        pretrained=path, num_classes=3).eval()  # fmt: skip
        with torch.no_grad():
            feats = net.trunk(x)
            want = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))  # fmt: skip
        torch.testing.assert_close(feats["final"], want, rtol=0, atol=0)
        taps = net.trunk.taps
        assert [taps[t].stride for t in ("pool3", "pool4", "final")] == {
            32: [8, 16, 32], 16: [8, 16, 16], 8: [8, 8, 8]}[stride]  # fmt: skip
        assert feats["final"].shape[-2:] == (-(-61 // stride), -(-75 // stride))
        assert taps["final"].field == 427  # dilation keeps ResNet-50's receptive field


def test_staged_32s_16s_8s_on_resnet50_through_train_py_with_each_stage_s_lr(tmp_path):
    lrs = tmp_path / "lrs.jsonl"
    out = tmp_path / "run"
    done = cli(
        *[o for o in TINY if not o.startswith(("arch.width", "data.image_size", "trainer.max_steps"))],
        "arch=fcn8s", "staged=true", "arch.backbone=resnet50", "arch.width=0.25",
        "data.image_size=64", "trainer.max_steps=2", "optimizer.lr=0.002",
        "+callbacks.lr._target_=interrupts.RecordLr", f"+callbacks.lr.path={lrs}",
        f"hydra.run.dir={out}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s for s in ("fcn32s", "fcn16s", "fcn8s") if s in metrics] == [
        "fcn32s",
        "fcn16s",
        "fcn8s",
    ]
    # the optimizer's lr at each step of each stage (a new trainer per stage: steps restart at 0)
    steps = [json.loads(line) for line in lrs.read_text().splitlines()]
    stages = [[lr for step, (lr, _) in steps[i : i + 2]] for i in range(0, len(steps), 2)]
    assert [s for s, _ in steps] == [0, 1] * 3
    # the synthetic recipe halves the lr into each later stage (stages.<stage>.lr_factor 0.5)
    assert stages == [[0.002] * 2, [0.001] * 2, [0.0005] * 2]
    log = done.stdout + done.stderr
    for stage, before in (("fcn16s", "fcn32s"), ("fcn8s", "fcn16s")):
        assert re.search(rf"{stage}: from \S*{before}/checkpoints/best\.ckpt", log), log[-2000:]
    ckpt = torch.load(out / "fcn8s" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["model._extra_state"]["backbone"] == "resnet50"
    assert "model.heads.out.score_pool3.weight" in ckpt["state_dict"]


@pytest.mark.parametrize(
    "arch,stride,message",
    [
        (
            "fcn16s",
            16,
            r"fcn16s fuses the pool4 tap \(stride 16\).*output_stride=16.*stride 16 too",
        ),
        ("fcn8s", 8, r"fcn8s fuses the pool4 tap \(stride 8\).*output_stride=8"),
        ("fcn8s", 16, r"fcn8s fuses the pool4 tap \(stride 16\).*output_stride=16"),
    ],
)
def test_an_arch_whose_tap_the_output_stride_lacks_is_refused_naming_both(arch, stride, message):
    with pytest.raises(ValueError, match=message):
        build_fcn(arch, backbone="resnet50", output_stride=stride, width=1 / 16)
    build_fcn("fcn32s", backbone="resnet50", output_stride=stride, width=1 / 16)  # no skips: fine


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            {"backbone": "vgg16", "output_stride": 8},
            r"output_stride=8 dilates a ResNet trunk.*'vgg16'",
        ),
        (
            {"output_stride": 4, "backbone": "resnet50"},
            r"output_stride must be one of \(32, 16, 8\)",
        ),
        (
            {"arch": "fcn_torchvision", "geometry": "paper", "backbone": "resnet50"},
            r"geometry='same'",
        ),
        ({"aux": True, "backbone": "resnet50"}, r"the auxiliary head is fcn_torchvision's"),
    ],
)
def test_what_cannot_be_built_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        build_fcn(**{"arch": "fcn8s", "width": 1 / 16, **settings})


def test_the_auxiliary_loss_is_weighted_and_only_in_training():
    module = FCNModule({"arch": "fcn_torchvision", "backbone": "resnet50", "geometry": "same",
                        "output_stride": 8, "width": 1 / 16, "aux_weight": 0.4, "pretrained": None})  # fmt: skip
    x, y = torch.randn(2, 3, 40, 40), torch.randint(0, 21, (2, 40, 40))
    y[0, :5] = 255
    module.train()
    out = module(x)
    assert set(out) == {"out", "aux"}
    ce = lambda s: F.cross_entropy(s, y, ignore_index=255)  # noqa: E731
    torch.testing.assert_close(module.loss(out, {"out": y}), ce(out["out"]) + 0.4 * ce(out["aux"]))
    assert ce(out["aux"]) > 0.1  # the aux term is not negligible
    module.eval()
    assert set(module(x)) == {"out"}  # evaluation, prediction and export see one output


def _torchvision_layout(net) -> dict[str, torch.Tensor]:
    """A tiny fcn_torchvision net's weights under torchvision's keys (its FCN is full width
    only): what a torchvision fcn_resnet50 state dict of that width would hold."""
    pre = {"trunk.": "backbone.", "heads.out.aux_classifier.": "aux_classifier.",
           "heads.out.classifier.": "classifier."}  # fmt: skip
    out = {}
    for key, value in net.state_dict().items():
        for ours, theirs in pre.items():
            if key.startswith(ours):
                out[theirs + key[len(ours) :]] = value
    return out


def test_a_torchvision_checkpoint_is_evaluated_predicted_with_and_fine_tuned(tmp_path):
    net = _randomized(build_fcn("fcn_torchvision", backbone="resnet50", geometry="same",
                                output_stride=8, aux=True, width=1 / 16, dropout=0.0))  # fmt: skip
    # torchvision's reference scripts save {"model": state dict, "optimizer": ..., ...}
    torch.save({"model": _torchvision_layout(net), "epoch": 29}, tmp_path / "model_29.pth")
    ckpt = torchvision_checkpoint(tmp_path / "model_29.pth", tmp_path / "tv.ckpt")
    with pytest.raises(UserError, match=r"tv.ckpt exists: nothing is written over it"):
        torchvision_checkpoint(tmp_path / "model_29.pth", ckpt)
    module = load_checkpoint(ckpt).eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(module(x)["out"], net(x)["out"], rtol=0, atol=0)
    assert module.contract.class_names("out")[15] == "person"
    voc = SHARED_DATA / "voc_mini"
    if not voc.is_dir():
        pytest.skip("../shared/data/voc_mini not present")
    images = voc / "VOCdevkit" / "VOC2012" / "JPEGImages"
    data = [f"data.root={voc}", "data.year=2012", "data.val_split=val"]
    evaluated, predicted, tuned = commands(
        [ROOT / "eval.py", f"ckpt_path={ckpt}", "data=voc", *data, f"hydra.run.dir={tmp_path}/e"],
        [ROOT / "predict.py", f"ckpt_path={ckpt}", f"input={images}", f"output={tmp_path}/p",
         "shift_stitch=2", f"hydra.run.dir={tmp_path}/pr"],
        # fine-tuned on data of other classes (the synthetic scenes' 5): the score layers start afresh
        [ROOT / "train.py", "arch=fcn_torchvision", f"arch.init_from={ckpt}", *TINY,
         f"hydra.run.dir={tmp_path}/t"],
        cwd=tmp_path,
    )  # fmt: skip
    for done in (evaluated, predicted, tuned):
        assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert 0 <= scores["metrics"]["mIoU"] <= 100 and "person" in json.dumps(scores)
    assert len(list((tmp_path / "p").glob("*_overlay.jpg"))) == 4
    assert re.search(r"heads\.out\.classifier\.4, heads\.out\.aux_classifier\.4 start afresh \(for other",
                     tuned.stdout + tuned.stderr)  # fmt: skip
    tuned_state = torch.load(tmp_path / "t" / "fcn_torchvision" / "checkpoints" / "last.ckpt",
                             weights_only=True)["state_dict"]  # fmt: skip
    assert tuned_state["model.heads.out.classifier.4.weight"].shape[0] == 5


def test_transfer_to_other_classes_keeps_all_but_the_class_sized_layers():
    source = _randomized(build_fcn("fcn_torchvision", backbone="resnet50", geometry="same",
                                   output_stride=8, aux=True, width=1 / 16, num_classes=21))  # fmt: skip
    target = build_fcn("fcn_torchvision", backbone="resnet50", geometry="same", output_stride=8,
                       aux=True, width=1 / 16, num_classes=4)  # fmt: skip
    with pytest.raises(ValueError, match="heads differs"):
        transfer_stage(source, target)
    transfer_stage(source, target, new_classes=True)
    assert sorted(target.fresh) == sorted(
        f"heads.out.{h}.4.{p}" for h in ("classifier", "aux_classifier") for p in ("weight", "bias")
    )
    src = source.state_dict()
    for key, value in target.state_dict().items():
        if key not in target.fresh and key != "_extra_state":
            assert torch.equal(value, src[key]), key


def test_other_classes_without_an_aux_head_make_a_checkpoint_to_fine_tune_from(tmp_path):
    # torchvision's reference trained on 5 classes without --aux-loss: numbered class names;
    # fine-tuned with the auxiliary head on, that head starts afresh as the score layers do
    net = _randomized(build_fcn("fcn_torchvision", backbone="resnet50", geometry="same",
                                output_stride=8, width=1 / 16, num_classes=5))  # fmt: skip
    torch.save(_torchvision_layout(net), tmp_path / "five.pth")
    module = load_checkpoint(torchvision_checkpoint(tmp_path / "five.pth", tmp_path / "five.ckpt"))
    assert module.contract.class_names("out") == ["0", "1", "2", "3", "4"]
    assert not module.model.spec.aux and module.hparams.model["aux_weight"] == 0
    target = build_fcn("fcn_torchvision", backbone="resnet50", geometry="same", output_stride=8,
                       aux=True, width=1 / 16, num_classes=3)  # fmt: skip
    transfer_stage(tmp_path / "five.ckpt", target, new_classes=True)
    assert {k.rsplit(".", 1)[0] for k in target.fresh} == {
        "heads.out.classifier.4",
        *(f"heads.out.aux_classifier.{i}" for i in (0, 1, 4)),
    }
    with pytest.raises(
        ValueError, match=r"width differs \(source 0.0625, target 0.125\): set arch.width=0.0625"
    ):
        transfer_stage(tmp_path / "five.ckpt", build_fcn("fcn_torchvision", backbone="resnet50",
                       geometry="same", output_stride=8, width=1 / 8, num_classes=5))  # fmt: skip


def test_import_refusals_name_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "garbage.pth").write_bytes(b"hello world, not weights\n" * 50)
    with pytest.raises(
        CheckpointError, match=r"cannot read .*garbage.pth .*not a file torch.save wrote"
    ):
        import_torchvision_fcn(tmp_path / "garbage.pth")
    with pytest.raises(ValueError, match="not a torchvision fcn_resnet50 / fcn_resnet101"):
        import_torchvision_fcn(tv_resnet50().state_dict())  # a classifier, not an FCN
    with pytest.raises(FileNotFoundError, match="torchvision FCN weights not found: .*nothere.pth"):
        import_torchvision_fcn(tmp_path / "nothere.pth")
    state = _torchvision_layout(build_fcn("fcn_torchvision", backbone="resnet50", geometry="same",
                                          output_stride=8, width=1 / 16))  # fmt: skip
    with pytest.raises(ValueError, match="unexpected key 'classifier.9.weight'"):
        import_torchvision_fcn({**state, "classifier.9.weight": torch.zeros(1)})
    del state["classifier.1.running_mean"]
    with pytest.raises(ValueError, match=r"lacks \['heads.out.classifier.1.running_mean'\]"):
        import_torchvision_fcn(state)

    def offline(**_):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(
        type(tvfcn.RELEASED["fcn_resnet50"]), "get_state_dict", lambda self, **kw: offline()
    )
    with pytest.raises(
        PretrainedWeightsUnavailable, match=r"(?s)fcn_resnet50_coco-1167a1af\.pth.*give its path"
    ):
        import_torchvision_fcn("fcn_resnet50")


def test_the_short_side_scaling_of_torchvision_s_recipe():
    from torchvision import tv_tensors

    from fcn_lightning.data.transforms import RandomScale

    image = tv_tensors.Image(torch.zeros(3, 375, 500))
    for _ in range(20):  # shorter side drawn in 0.5-2.0 x 520 whatever the image's own size
        out = RandomScale((0.5, 2.0), short_side=520)(image)
        short = min(out.shape[-2:])
        assert 260 <= short <= 1040 and abs(out.shape[-1] / out.shape[-2] - 500 / 375) < 0.01
    assert RandomScale((1.0, 1.0), short_side=520)(image).shape[-2:] == (520, 693)
    with pytest.raises(ValueError, match="data.scale_short_side must be a size >= 1"):
        RandomScale((0.5, 2.0), short_side=0)


def test_the_voc_fcn_resnet50_preset_trains_on_the_voc_layout(tmp_path):
    voc = SHARED_DATA / "voc_mini"
    if not voc.is_dir():
        pytest.skip("../shared/data/voc_mini not present")
    lrs, out = tmp_path / "lrs.jsonl", tmp_path / "run"
    done = cli(
        "experiment=voc_fcn_resnet50", f"data.root={voc}", "arch.width=0.0625",
        "arch.pretrained=null", "trainer.max_steps=1", "trainer.accumulate_grad_batches=1",
        "data.batch_size=2", "data.num_workers=0", "trainer.accelerator=cpu", "callbacks=none",
        "images.every_n_epochs=0", "+callbacks.lr._target_=interrupts.RecordLr",
        f"+callbacks.lr.path={lrs}", f"hydra.run.dir={out}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ((step, (weights, biases)),) = [json.loads(line) for line in lrs.read_text().splitlines()]
    assert step == 0 and weights == biases == pytest.approx(0.02)  # torchvision's: biases alike
    run = json.loads((out / "run.json").read_text())
    assert "fcn_torchvision" in json.dumps(run) and "resnet50" in json.dumps(run)
    ckpt = torch.load(out / "fcn_torchvision" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "model.heads.out.aux_classifier.4.weight" in ckpt["state_dict"]
    assert ckpt["hyper_parameters"]["model"]["aux_weight"] == 0.5


def test_synced_batch_norms_of_a_ddp_run_save_the_plain_net_s_keys():
    # trainer=ddp on GPUs converts every batch norm (Lightning's sync_batchnorm): the trunk's and
    # both heads'; its checkpoint must load into the plain net that eval.py and predict.py build
    settings = dict(backbone="resnet50", geometry="same", output_stride=8, aux=True, width=1 / 16)
    net = _randomized(build_fcn("fcn_torchvision", **settings))
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert (
        sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == 55
    )  # 53 + 2 heads
    plain = build_fcn("fcn_torchvision", **settings).eval()
    plain.load_state_dict(synced.state_dict())  # strict: the same keys
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():  # in eval mode a synced batch norm uses its running statistics alone
        torch.testing.assert_close(plain(x)["out"], synced.eval()(x)["out"], rtol=0, atol=0)
