"""Model geometry, initialisation, weight loading and stage transfer."""

from __future__ import annotations

import ast
import functools
import importlib
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import cfg_of
from hypothesis import given, settings
from hypothesis import strategies as st

import fcn_lightning.models as models_pkg
from fcn_lightning.app.checks import check_settings
from fcn_lightning.models import (
    ARCHS,
    FCNHead,
    PretrainedWeightsUnavailable,
    SegmentationNet,
    Tap,
    Trunk,
    bilinear_kernel,
    build_fcn,
    expand_input_channels,
    export_torchfcn,
    import_torchfcn,
    transfer_stage,
    upsampler,
)
from fcn_lightning.models import weights as weights_mod

TINY = 1 / 16


def tiny(arch: str, geometry: str = "paper", **kw):
    return build_fcn(arch, width=TINY, geometry=geometry, **kw).eval()


# --------------------------------------------------------------------------- shared per-arch class
class ArchContract:
    """Every architecture runs these; a subclass only names its arch."""

    arch: str

    @pytest.mark.parametrize("geometry", ["paper", "same"])
    @pytest.mark.parametrize("size", [(1, 1), (1, 7), (33, 17), (500, 375), (64, 64)])
    def test_output_size_equals_input(self, geometry, size):
        model = tiny(self.arch, geometry, num_classes=3)
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))["out"]
        assert out.shape == (1, 3, *size)

    def test_forward_backward(self):
        model = build_fcn(self.arch, width=TINY, num_classes=4).train()
        # zero scores give zero trunk gradients at the start: perturb them as after a few steps
        with torch.no_grad():
            for head in model.heads.values():
                head.score_fr.weight.normal_(std=0.1)
        out = model(torch.randn(2, 3, 40, 52))["out"]
        loss = F.cross_entropy(out, torch.randint(0, 4, (2, 40, 52)))
        loss.backward()
        assert torch.isfinite(loss)
        assert model.trunk.features[0].weight.grad.abs().sum() > 0
        assert model.heads["out"].score_fr.weight.grad.abs().sum() > 0

    def test_torch_export(self):
        model = tiny(self.arch, num_classes=3)
        x = torch.randn(1, 3, 48, 40)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x)["out"], model(x)["out"])


@pytest.mark.slow
def test_torch_compile():
    # FCN-8s holds every op of the other heads (both skips, their crops and upsamplings)
    model = tiny("fcn8s", num_classes=3)
    x = torch.randn(1, 3, 48, 40)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x)["out"], model(x)["out"], atol=1e-5, rtol=1e-4)


class TestFCN32s(ArchContract):
    arch = "fcn32s"


class TestFCN16s(ArchContract):
    arch = "fcn16s"


class TestFCN8s(ArchContract):
    arch = "fcn8s"


class TestFCN8sAtOnce(ArchContract):
    arch = "fcn8s_atonce"


@settings(max_examples=25, deadline=None)
@given(
    arch=st.sampled_from(ARCHS),
    geometry=st.sampled_from(["paper", "same"]),
    h=st.integers(1, 300),
    w=st.integers(1, 300),
)
def test_output_size_property(arch, geometry, h, w):
    geometry = "same" if arch == "fcn_torchvision" else geometry  # it has no margin to crop
    model = build_fcn(arch, width=1 / 32, geometry=geometry, num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, h, w))["out"].shape[-2:] == (h, w)


def test_paper_crops_valid_at_large_sizes():
    model = tiny("fcn8s", num_classes=2)
    with torch.no_grad():
        for size in [(999, 1000), (1000, 1), (511, 257)]:
            assert model(torch.randn(1, 3, *size))["out"].shape[-2:] == size


def test_flops_at_500_match_reference_and_same_geometry_is_cheaper():
    from torch.utils.flop_counter import FlopCounterMode

    def gflops(geometry):
        with torch.device("meta"):  # full width, no memory or compute
            model = build_fcn("fcn8s", geometry=geometry).eval()
            x = torch.randn(1, 3, 500, 500)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return counter.get_total_flops() / 1e9

    paper, same = gflops("paper"), gflops("same")
    assert 355 < paper < 370, paper  # docs/PAPER.md, Network geometry: 363 GFLOP
    # measured 216.6 GFLOP: the convs shrink ~2x without the margin, but fc6 (kept padded so any
    # input size works) costs the same 53 GFLOP in both geometries
    assert 1.6 < paper / same < 2.2, (paper, same)


# --------------------------------------------------------------------------- trunk interface
PAPER_OFFSETS = {  # the authors' reference code (docs/PAPER.md, Network geometry)
    "fcn32s": {"final": 19},
    "fcn16s": {"pool4": 5, "final": 27},
    "fcn8s": {"pool4": 5, "pool3": 9, "final": 31},
    "fcn8s_atonce": {"pool4": 5, "pool3": 9, "final": 31},
}


@pytest.mark.parametrize("arch", list(PAPER_OFFSETS))
def test_crop_offsets_derived_from_coordinate_maps(arch):
    paper, same = tiny(arch), tiny(arch, "same")
    assert paper.heads["out"].offsets == PAPER_OFFSETS[arch]
    assert same.heads["out"].offsets == dict.fromkeys(PAPER_OFFSETS[arch], 0)
    origins = {name: (t.stride, t.origin) for name, t in paper.trunk.taps.items()}
    assert origins == {"pool3": (8, -95.5), "pool4": (16, -91.5), "final": (32, 12.5)}
    origins = {name: (t.stride, t.origin) for name, t in same.trunk.taps.items()}
    assert origins == {"pool3": (8, 3.5), "pool4": (16, 7.5), "final": (32, 15.5)}


class FinalOnlyTrunk(Trunk):
    """A toy trunk with only a stride-32 map."""

    def __init__(self) -> None:
        super().__init__()
        self.geometry, self.taps = "paper", {"final": Tap(channels=4, stride=32, origin=12.5)}

    def forward(self, x):
        return {"final": F.avg_pool2d(x[:, :1].expand(-1, 4, -1, -1), 32)}

    def load_pretrained(self, source, *, progress=True):
        raise NotImplementedError


def test_heads_take_any_trunk_and_refuse_a_missing_tap():
    trunk = FinalOnlyTrunk()
    head = FCNHead("fcn32s", 3, trunk)
    assert head.offsets == {"final": 19}
    assert head(trunk(torch.randn(1, 3, 64, 64)), 40, 50).shape == (1, 3, 40, 50)
    with pytest.raises(
        ValueError,
        match=r"fcn16s needs the trunk's 'pool4' tap; FinalOnlyTrunk has only \['final'\]",
    ):
        FCNHead("fcn16s", 3, trunk)
    trunk.taps["pool4"] = Tap(channels=4, stride=16, origin=-91.5)
    with pytest.raises(ValueError, match="fcn8s needs the trunk's 'pool3' tap; FinalOnlyTrunk"):
        FCNHead("fcn8s", 3, trunk)


def test_fcn_and_late_fusion_share_the_interface():
    single = tiny("fcn16s", heads={"sem": 3, "geo": 2})
    fused = build_fcn("fcn16s", width=TINY, heads={"sem": 3, "geo": 2}, streams={"rgb": 3, "d": 1})
    for m in (single, fused):
        assert isinstance(m, SegmentationNet) and m.head_names == ("sem", "geo")
        assert m.anchor.endswith("trunk.features.0.weight") and m.anchor in m.state_dict()


def test_models_package_has_no_import_cycles_or_function_local_imports():
    folder = Path(models_pkg.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
                assert not inner, f"{path.name}: import inside {node.name}()"
            if isinstance(node, ast.ImportFrom) and node.level:
                target = "." * (node.level - 1) + (node.module or "")
                assert not target.startswith((".data", ".module", ".pipeline")), path.name
                if node.level == 1 and node.module:
                    graph[path.stem].add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = (
                    [node.module]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                assert not any(n and n.startswith("fcn_lightning") for n in names), path.name
        importlib.import_module(f"fcn_lightning.models.{path.stem}".removesuffix(".__init__"))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start]
        )

    assert [m for m in graph if reaches(m, m, set())] == []


# --------------------------------------------------------------------------- upsampling
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 16, 32, 63, 64])
def test_bilinear_kernel_formula(k):
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    expected = torch.tensor(
        [
            [(1 - abs(i - center) / factor) * (1 - abs(j - center) / factor) for j in range(k)]
            for i in range(k)
        ]
    )
    torch.testing.assert_close(bilinear_kernel(k), expected)


@pytest.mark.parametrize("odd", [False, True])
@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_bilinear_upsampling_keeps_constant_map_constant(factor, odd):
    up = upsampler(3, factor, kernel=2 * factor - odd, learnable=False)
    assert up.kernel_size == (2 * factor - odd,) * 2
    with torch.no_grad():
        out = up(torch.full((1, 3, 6, 5), 2.5))
    inside = out[:, :, 2 * factor : -2 * factor, 2 * factor : -2 * factor]
    torch.testing.assert_close(inside, torch.full_like(inside, 2.5))
    # one kernel per class on the diagonal: class 0 never leaks into class 1
    assert up.weight[0, 1].abs().sum() == 0 and up.bias is None


@pytest.mark.parametrize("kernel", [4, 3])
def test_bilinear_2x_of_linear_ramp_is_linear(kernel):
    up = upsampler(1, 2, kernel=kernel, learnable=True)
    ramp = torch.arange(8, dtype=torch.float32).expand(1, 1, 8, 8).contiguous()
    with torch.no_grad():
        row = up(ramp)[0, 0, 8, 2:-2]
    steps = row.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, 0.5))
    assert up.weight.requires_grad
    if kernel == 3:  # the odd kernel keeps the coarse samples (pixel i at 2i + 1) and between
        with torch.no_grad():
            row = up(ramp)[0, 0, 9]
        torch.testing.assert_close(row[1:16:2], torch.arange(8.0))
        torch.testing.assert_close(row[2:15:2], torch.arange(7.0) + 0.5)
    with pytest.raises(ValueError, match="kernel 4 or 3"):
        upsampler(1, 2, kernel=5, learnable=True)


def test_final_upsampling_fixed_intermediate_switchable():
    m = build_fcn("fcn8s", width=TINY)
    h = m.heads["out"]
    assert not h.upscore8.weight.requires_grad
    assert h.upscore2.weight.requires_grad and h.upscore_pool4.weight.requires_grad
    h = build_fcn("fcn8s", width=TINY, learnable_upsampling=False).heads["out"]
    assert not h.upscore2.weight.requires_grad and not h.upscore_pool4.weight.requires_grad


def test_score_layers_zero_initialised_and_dropout_elementwise():
    m = build_fcn("fcn8s", width=TINY)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = getattr(m.heads["out"], name)
        assert layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0
    assert type(m.trunk.drop6) is torch.nn.Dropout and m.trunk.drop6.p == 0.5
    assert type(m.trunk.drop7) is torch.nn.Dropout


def test_paper_geometry_layers():
    m = build_fcn("fcn32s", width=TINY)
    assert m.trunk.features[0].padding == (100, 100)
    assert all(p.ceil_mode for p in m.trunk.features if isinstance(p, torch.nn.MaxPool2d))
    assert m.trunk.fc6.kernel_size == (7, 7) and m.trunk.fc6.padding == (0, 0)
    assert m.trunk.fc7.kernel_size == (1, 1)
    s = build_fcn("fcn32s", width=TINY, geometry="same")
    assert s.trunk.features[0].padding == (1, 1) and s.trunk.fc6.padding == (3, 3)


def test_width_scales_every_channel():
    m = build_fcn("fcn8s", width=0.25, num_classes=5)
    convs = [c.out_channels for c in m.trunk.features if isinstance(c, torch.nn.Conv2d)]
    assert convs == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    assert m.trunk.fc6.out_channels == 1024 and m.trunk.fc7.out_channels == 1024


def test_fcn8s_parameter_count_matches_table1():
    with torch.device("meta"):  # full width, shapes only: nothing to initialise
        m = build_fcn("fcn8s", num_classes=21)
    n = sum(p.numel() for p in m.parameters())
    assert 133e6 < n < 136e6, n  # paper: 134M


# --------------------------------------------------------------------------- pretrained trunk
@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(1)
    vgg = torchvision.models.vgg16().eval()
    path = tmp_path_factory.mktemp("weights") / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    return vgg, path


def test_convolutionalized_fc7_equals_torchvision_classifier(vgg_file):
    vgg, path = vgg_file
    model = build_fcn("fcn32s", geometry="same", pretrained=path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fc7 = model.trunk(x)["final"]
        assert fc7.shape[-2:] == (7, 7)
        ours = fc7[0, :, 3, 3]  # centre: its receptive field is the whole 7x7 pool5
        theirs = vgg.classifier[:5](torch.flatten(vgg.avgpool(vgg.features(x)), 1))[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_pretrained_rgbd_conv1_matches_rgb_with_zero_depth(vgg_file):
    _, path = vgg_file
    rgb = build_fcn("fcn32s", width=1.0, pretrained=path).trunk.conv1_1
    rgbd = build_fcn("fcn32s", width=1.0, pretrained=path, in_channels=4).trunk.conv1_1
    w = rgbd.weight
    torch.testing.assert_close(w[:, 3], w[:, :3].mean(1))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rgbd(torch.cat([x, torch.zeros(1, 1, 8, 8)], 1)), rgb(x))
    assert expand_input_channels(rgb.weight, 1).shape[1] == 1


def test_imagenet_weights_read_from_torch_hub_cache(vgg_file, tmp_path, monkeypatch):
    vgg, path = vgg_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]).write_bytes(path.read_bytes())
    model = build_fcn("fcn32s", pretrained="imagenet")
    torch.testing.assert_close(model.trunk.features[0].weight, vgg.features[0].weight)
    assert model.normalization.mean == (0.485, 0.456, 0.406)


def test_offline_imagenet_weights_give_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(
        weights_mod.VGG16_Weights.IMAGENET1K_V1.__class__,
        "get_state_dict",
        lambda self, *a, **k: offline(),
    )
    with pytest.raises(
        PretrainedWeightsUnavailable, match=r"vgg16-397923af\.pth[\s\S]*arch\.pretrained="
    ) as offline_error:
        build_fcn("fcn32s", width=TINY, pretrained="imagenet")
    # its from-scratch advice is a recipe that runs (not one refused as learning nothing)
    scratch = re.search(r"from scratch as the quickstart does: (\S+) ", str(offline_error.value))
    check_settings(cfg_of("config", ["data=folder", "data.root=/d", scratch.group(1)]))


def test_bad_pretrained_files(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with torch.device("meta"):  # the full-size nets refused: no weights to initialise
        with pytest.raises(FileNotFoundError, match="nope.pth"):
            build_fcn("fcn32s", pretrained=tmp_path / "nope.pth")
        with pytest.raises(ValueError, match="bad.pth.*torchvision-layout"):
            build_fcn("fcn32s", pretrained=bad)


def test_pretrained_needs_full_width(vgg_file):
    with pytest.raises(ValueError, match="width=1.0"):
        build_fcn("fcn32s", width=0.5, pretrained=vgg_file[1])


def test_caffe_normalization_travels_with_model():
    m = build_fcn("fcn32s", width=TINY, normalization="caffe")
    assert m.normalization.bgr and m.normalization.scale == 255.0


# --------------------------------------------------------------------------- stage transfer
def _randomize_scores(model):
    with torch.no_grad():
        for name, p in model.heads.named_parameters():
            if name.split(".")[1].startswith("score"):  # out.score_fr.weight, ...
                assert p.requires_grad
                p.normal_(
                    std=0.1 if name.endswith("weight") else 0.01
                )  # biases must not drown the features
    return model


@pytest.mark.parametrize("geometry,min_agreement", [("paper", 0.99), ("same", 0.95)])
def test_stage_transfer_keeps_predictions(geometry, min_agreement):
    # Measured (224x288 input, 2-3 classes predicted): paper geometry 99.6% of pixels agree
    # 32s->16s and 99.9% 16s->8s; same geometry 97.6% and 99.3% (the coarse maps' border cells
    # fade differently without the 100-pixel margin).
    kw = dict(width=1 / 8, geometry=geometry, num_classes=5)
    m32 = _randomize_scores(build_fcn("fcn32s", **kw)).eval()
    m16 = transfer_stage(m32, build_fcn("fcn16s", **kw)).eval()
    m8 = transfer_stage(m16, build_fcn("fcn8s", **kw)).eval()
    assert m16.heads["out"].score_pool4.weight.abs().sum() == 0
    torch.testing.assert_close(m16.trunk.fc7.weight, m32.trunk.fc7.weight)
    torch.testing.assert_close(m16.heads["out"].score_fr.weight, m32.heads["out"].score_fr.weight)
    x = torch.randn(2, 3, 224, 288)
    with torch.no_grad():
        p32, p16, p8 = (m(x)["out"].argmax(1) for m in (m32, m16, m8))
    assert len(p32.unique()) > 1 and len(p8.unique()) > 1  # real predictions, not all one class
    assert (p32 == p16).float().mean() >= min_agreement
    assert (p16 == p8).float().mean() >= min_agreement


def test_stage_transfer_from_lightning_style_checkpoint(tmp_path):
    m32 = _randomize_scores(build_fcn("fcn32s", width=TINY, num_classes=3))
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in m32.state_dict().items()}}, ckpt
    )
    m16 = transfer_stage(ckpt, build_fcn("fcn16s", width=TINY, num_classes=3))
    torch.testing.assert_close(m16.trunk.features[0].weight, m32.trunk.features[0].weight)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"num_classes": 4}, "heads differs"),
        ({"width": 1 / 8}, "width differs"),
        ({"geometry": "same"}, "geometry differs"),
        ({"in_channels": 4}, "in_channels differs"),
        ({"heads": {"sem": 3, "geo": 3}}, "heads differs"),
    ],
)
def test_stage_transfer_mismatch_is_named(change, match):
    src = build_fcn("fcn32s", width=TINY, num_classes=3)
    kw = dict(width=TINY, num_classes=3) | change
    with pytest.raises(ValueError, match=match):
        transfer_stage(src, build_fcn("fcn16s", **kw))


def test_stage_transfer_raw_state_dict_mismatch_names_layer_and_shapes():
    state = build_fcn("fcn32s", width=TINY, num_classes=3).state_dict()
    del state["_extra_state"]
    with pytest.raises(
        ValueError, match=r"heads\.out\.score_fr\.weight.*\(3, 256, 1, 1\).*\(4, 256, 1, 1\)"
    ):
        transfer_stage(state, build_fcn("fcn16s", width=TINY, num_classes=4))


def test_stage_transfer_refuses_later_to_earlier():
    with pytest.raises(ValueError, match="later stage"):
        transfer_stage(build_fcn("fcn8s", width=TINY), build_fcn("fcn16s", width=TINY))


def test_multi_head_model():
    m = build_fcn("fcn16s", width=TINY, heads={"sem": 33, "geo": 3}).eval()
    out = m(torch.randn(1, 3, 64, 64))
    assert set(out) == {"sem", "geo"} and out["sem"].shape[1] == 33 and out["geo"].shape[1] == 3
    assert m.heads["sem"].score_fr is not m.heads["geo"].score_fr


def test_state_dict_carries_spec_and_refuses_mismatch():
    m = build_fcn("fcn16s", width=TINY, num_classes=3)
    again = type(m).from_state_dict(m.state_dict())
    assert again.spec == m.spec
    with pytest.raises(ValueError, match=r"arch: checkpoint 'fcn16s' vs model 'fcn8s'"):
        build_fcn("fcn8s", width=TINY, num_classes=3).load_state_dict(m.state_dict(), strict=False)


def test_wrong_input_channels_is_named():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        tiny("fcn32s")(torch.randn(1, 4, 8, 8))


# --------------------------------------------------------------------------- torchfcn
def _torchfcn_shapes(arch: str, n: int) -> dict[str, tuple[int, ...]]:
    """torchfcn's key set and shapes, written from its published layer list."""
    chans = [
        (3, 64),
        (64, 64),
        (64, 128),
        (128, 128),
        (128, 256),
        (256, 256),
        (256, 256),
        (256, 512),
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 512),
        (512, 512),
    ]
    names = [
        "conv1_1",
        "conv1_2",
        "conv2_1",
        "conv2_2",
        "conv3_1",
        "conv3_2",
        "conv3_3",
        "conv4_1",
        "conv4_2",
        "conv4_3",
        "conv5_1",
        "conv5_2",
        "conv5_3",
    ]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (cin, cout) in zip(names, chans, strict=True):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, 3, 3), (cout,)
    shapes |= {
        "fc6.weight": (4096, 512, 7, 7),
        "fc6.bias": (4096,),
        "fc7.weight": (4096, 4096, 1, 1),
        "fc7.bias": (4096,),
        "score_fr.weight": (n, 4096, 1, 1),
        "score_fr.bias": (n,),
    }
    if arch == "fcn32s":
        shapes["upscore.weight"] = (n, n, 64, 64)
    else:
        shapes |= {
            "score_pool4.weight": (n, 512, 1, 1),
            "score_pool4.bias": (n,),
            "upscore2.weight": (n, n, 4, 4),
        }
        if arch == "fcn16s":
            shapes["upscore16.weight"] = (n, n, 32, 32)
        else:
            shapes |= {
                "score_pool3.weight": (n, 256, 1, 1),
                "score_pool3.bias": (n,),
                "upscore_pool4.weight": (n, n, 4, 4),
                "upscore8.weight": (n, n, 16, 16),
            }
    return shapes


def _caffe_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, arch: str) -> torch.Tensor:
    """The reference net written out functionally (Caffe layer names, pad 100, ceil pooling,
    the reference crops), independent of the package's modules."""
    h = x
    feats = {}
    for block, n in enumerate((2, 2, 3, 3, 3), start=1):
        for i in range(1, n + 1):
            name = f"conv{block}_{i}"
            h = F.relu(
                F.conv2d(
                    h,
                    sd[f"{name}.weight"],
                    sd[f"{name}.bias"],
                    padding=100 if name == "conv1_1" else 1,
                )
            )
        h = F.max_pool2d(h, 2, 2, ceil_mode=True)
        feats[block] = h
    h = F.relu(F.conv2d(h, sd["fc6.weight"], sd["fc6.bias"]))
    h = F.relu(F.conv2d(h, sd["fc7.weight"], sd["fc7.bias"]))
    s = F.conv2d(h, sd["score_fr.weight"], sd["score_fr.bias"])
    H, W = x.shape[-2:]

    def crop(t, o, like):
        return t[:, :, o : o + like.shape[2], o : o + like.shape[3]]

    if arch == "fcn32s":
        out = F.conv_transpose2d(s, sd["upscore.weight"], stride=32)
        return out[:, :, 19 : 19 + H, 19 : 19 + W]
    up = F.conv_transpose2d(s, sd["upscore2.weight"], stride=2)
    up = up + crop(F.conv2d(feats[4], sd["score_pool4.weight"], sd["score_pool4.bias"]), 5, up)
    if arch == "fcn16s":
        return F.conv_transpose2d(up, sd["upscore16.weight"], stride=16)[
            :, :, 27 : 27 + H, 27 : 27 + W
        ]
    up = F.conv_transpose2d(up, sd["upscore_pool4.weight"], stride=2)
    up = up + crop(F.conv2d(feats[3], sd["score_pool3.weight"], sd["score_pool3.bias"]), 9, up)
    return F.conv_transpose2d(up, sd["upscore8.weight"], stride=8)[:, :, 31 : 31 + H, 31 : 31 + W]


@functools.cache
def _torchfcn_trunk(n: int) -> dict[str, torch.Tensor]:
    """Random weights of the layers every arch has (full-size VGG16: made once per process)."""
    g = torch.Generator().manual_seed(2)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in _torchfcn_shapes("fcn32s", n).items()
            if not k.startswith("upscore")}  # fmt: skip


@pytest.mark.parametrize("arch", ["fcn32s", "fcn16s", "fcn8s"])
def test_torchfcn_import_matches_reference_forward_and_round_trips(arch):
    n = 3
    torch.manual_seed(2)
    trunk = _torchfcn_trunk(n)
    sd = {k: trunk[k] if k in trunk else torch.randn(shape) * 0.02
          for k, shape in _torchfcn_shapes(arch, n).items()}  # fmt: skip
    model = import_torchfcn(sd).eval()
    assert model.spec.arch == arch and model.spec.heads == (("out", n),)
    assert model.normalization.bgr  # Caffe-converted weights
    exported = export_torchfcn(model)
    assert set(exported) == set(sd)
    for k in sd:  # the very values (exact, and cheaper than a tolerance on 134M numbers)
        assert exported[k].dtype == sd[k].dtype and torch.equal(exported[k], sd[k]), k
    x = torch.randn(1, 3, 37, 45) * 50
    with torch.no_grad():
        torch.testing.assert_close(
            model(x)["out"], _caffe_forward(sd, x, arch), atol=1e-4, rtol=1e-4
        )


def _import_on_meta(state: dict[str, torch.Tensor]):
    with torch.device("meta"):  # the layers at full size, no memory, no weights to initialise
        return import_torchfcn(state)


def test_torchfcn_import_refuses_mismatch_naming_key(tmp_path):
    # the values play no part: zeros of one stored number each, expanded to the full shapes
    good = {k: torch.zeros(()).expand(s) for k, s in _torchfcn_shapes("fcn16s", 21).items()}
    missing = dict(good)
    del missing["score_pool4.bias"]
    with pytest.raises(ValueError, match="missing key 'score_pool4.bias'"):
        _import_on_meta(missing)
    extra = dict(good, **{"score_pool3.weight": torch.zeros(21, 256, 1, 1)})
    with pytest.raises(ValueError, match="unexpected key 'score_pool3.weight'"):
        _import_on_meta(extra)
    wrong = dict(good, **{"fc7.weight": torch.zeros(4096, 4096)})
    with pytest.raises(
        ValueError, match=r"'fc7.weight' has shape \(4096, 4096\), expected \(4096, 4096, 1, 1\)"
    ):
        _import_on_meta(wrong)
    with pytest.raises(ValueError, match="not a torchfcn"):
        import_torchfcn({"conv1_1.weight": torch.zeros(1)})
    path = tmp_path / "fcn16s.pth"
    torch.save(good, path)
    assert import_torchfcn(path).spec.arch == "fcn16s"
