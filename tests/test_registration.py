"""The heads' registration: every score lands where its tap's coordinate map puts it, on every
trunk in both geometries (docs/TRUNKS.md, Geometry and the half pixel).

The coordinate maps themselves are checked against backpropagation in tests/test_table1.py; here
the heads are checked against the maps: a one-pixel score at any tap comes out centred on that
pixel's input coordinate, random scores come out as the exact bilinear interpolation between the
coordinates, and a thin bar in the input, through a trunk of symmetric averaging weights, comes
out centred on the bar. Before the odd kernels, AlexNet's and GoogLeNet's outputs were all half an
input pixel off (measured: docs/TRUNKS.md). ResNet-50 at output stride 32 and, dilated, 8 (there
FCN-32s only: the skips are no finer than its final map); torchvision's head (fcn_torchvision)
draws its pixels where torchvision does, off the coordinate maps (the last test).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fcn_lightning.models import TRUNKS
from fcn_lightning.models.fcn import SKIPS, ConvHead, FCNHead
from fcn_lightning.models.trunks import DILATABLE

# the trunks by the name the tests give them: (backbone, output stride)
VARIANTS = {
    "vgg16": ("vgg16", 32), "alexnet": ("alexnet", 32), "googlenet": ("googlenet", 32),
    "resnet50": ("resnet50", 32), "resnet50_os8": ("resnet50", 8),
}  # fmt: skip
BACKBONES = tuple(VARIANTS)
GEOMETRIES = ("paper", "same")
ARCHS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")
TINY = 1 / 32
SIDE = 192  # the input of the score tests: every tap's middle pixel's spread inside it


def _trunk(name: str, geometry: str) -> nn.Module:
    backbone, output_stride = VARIANTS[name]
    dilated = {"output_stride": output_stride} if backbone in DILATABLE else {}
    return TRUNKS[backbone](width=TINY, geometry=geometry, **dilated).eval()


def _archs(name: str) -> tuple[str, ...]:
    """The archs a trunk takes: at a dilated output stride FCN-32s only (the skips would be no
    finer than the final map; refused, tests/test_resnet.py)."""
    return ARCHS if VARIANTS[name][1] == 32 else ("fcn32s",)


@pytest.fixture(scope="module")
def trunks():
    """Per (backbone, geometry): the trunk, its maps' sizes for a SIDE x SIDE input and, per tap,
    where its pixel 0 really sits (from backpropagation, not from the trunk's own ``Tap``)."""
    out = {}
    for backbone in BACKBONES:
        for geometry in GEOMETRIES:
            trunk = _trunk(backbone, geometry)
            with torch.no_grad():
                feats = trunk(torch.zeros(1, 3, SIDE, SIDE))
            sizes = {k: v.shape[-2:] for k, v in feats.items()}
            out[backbone, geometry] = trunk, sizes, _field_origins(trunk)
    return out


def _field_origins(trunk: nn.Module) -> dict[str, float]:
    """Per tap, the centre of the input rows its pixel 0 depends on (found by backpropagation
    from a middle pixel, as tests/test_table1.py finds them), minus its stride times the pixel."""
    t = _averaging(trunk)
    x = torch.ones(1, 3, 640, 5, dtype=torch.float64, requires_grad=True)
    origins = {}
    for name, y in t(x).items():
        i = y.shape[-2] // 2
        (grad,) = torch.autograd.grad(y[0, :, i, y.shape[-1] // 2].sum(), x, retain_graph=True)
        rows = (grad[0].abs().sum((0, 2)) > 0).nonzero().flatten()
        assert 0 < rows.min() and rows.max() < 639, name  # the whole field inside
        origins[name] = (int(rows.min()) + int(rows.max())) / 2 - trunk.taps[name].stride * i
    return origins


def _head(arch: str, trunk: nn.Module, classes: int = 1) -> FCNHead:
    """A head whose score layers pass the taps through: its input is the scores themselves."""
    head = FCNHead(arch, classes, trunk).eval()
    for name, _ in list(head.named_children()):
        if name.startswith("score"):
            setattr(head, name, nn.Identity())
    return head


def _centroid(profile: torch.Tensor) -> float:
    profile = profile.double()
    return float((profile * torch.arange(len(profile))).sum() / profile.sum())


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize(("backbone", "arch"), [(b, a) for b in BACKBONES for a in _archs(b)])
def test_a_one_pixel_score_comes_out_centred_on_its_pixel(trunks, backbone, geometry, arch):
    trunk, sizes, origins = trunks[backbone, geometry]
    head = _head(arch, trunk)
    for tap_name in ("final", *SKIPS[arch]):
        tap, origin = trunk.taps[tap_name], origins[tap_name]
        i = round((SIDE / 2 - origin) / tap.stride)  # the pixel nearest the middle
        feats = {t: torch.zeros(1, 1, *sizes[t]) for t in sizes}
        feats[tap_name][0, 0, i, i] = 1.0
        with torch.no_grad():
            out = head(feats, SIDE, SIDE)[0, 0]
        where = origin + tap.stride * i
        assert out.min() >= 0 and out[0].abs().max() == out[:, 0].abs().max() == 0  # inside
        assert abs(_centroid(out.sum(1)) - where) < 1e-4, (tap_name, _centroid(out.sum(1)), where)
        assert abs(_centroid(out.sum(0)) - where) < 1e-4, (tap_name, _centroid(out.sum(0)), where)


def _interpolation(out_pos: torch.Tensor, in_pos: torch.Tensor, half: int) -> torch.Tensor:
    """The weights of linear interpolation (a tent of half-width ``half``) at ``out_pos``."""
    return (1 - (out_pos[:, None] - in_pos[None, :]).abs() / half).clamp(min=0)


def _registered(trunk, origins, arch: str, scores: dict[str, torch.Tensor], side: int):
    """What the head should compute, from where the taps' pixels are: each map linearly
    interpolated at the next one's pixels and the skip added; the last at the input's pixels."""

    def grid(n: int, stride: int, origin: float) -> torch.Tensor:
        return origin + stride * torch.arange(n, dtype=torch.float64)

    def resample(score, tap, size, stride, origin):
        s = trunk.taps[tap].stride
        w_y, w_x = (
            _interpolation(grid(n, stride, origin), grid(m, s, origins[tap]), s)
            for n, m in zip(size, score.shape[-2:], strict=True)
        )
        return torch.einsum("yi,ncij,xj->ncyx", w_y, score.double(), w_x)

    tap, score = "final", scores["final"]
    for name in SKIPS[arch]:
        size, stride = scores[name].shape[-2:], trunk.taps[name].stride
        score = resample(score, tap, size, stride, origins[name]) + scores[name].double()
        tap = name
    return resample(score, tap, (side, side), 1, 0.0)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_random_scores_come_out_as_the_exactly_registered_interpolation(trunks, backbone, geometry):
    # measured before the odd kernels (500 x 500, 21 classes): AlexNet's and GoogLeNet's argmax
    # differed from this on 3.5-3.8% of the pixels (FCN-32s), 5.9-6.1% (16s), 10.0-10.5% (8s)
    trunk, sizes, origins = trunks[backbone, geometry]
    g = torch.Generator().manual_seed(0)
    for arch in [a for a in ("fcn32s", "fcn16s", "fcn8s") if a in _archs(backbone)]:
        head = _head(arch, trunk, classes=5)
        scores = {t: torch.randn(1, 5, *sizes[t], generator=g) for t in ("final", *SKIPS[arch])}
        with torch.no_grad():
            out = head(scores, SIDE, SIDE)
        want = _registered(trunk, origins, arch, scores, SIDE)
        inner = (slice(None), slice(None), slice(24, -24), slice(24, -24))  # past the maps' edges
        torch.testing.assert_close(out.double()[inner], want[inner], atol=1e-5, rtol=1e-5)
        assert (out.argmax(1) == want.argmax(1))[0][inner[2:]].all(), arch


def _averaging(trunk: nn.Module) -> nn.Module:
    """A copy of ``trunk`` in double precision whose every layer is symmetric: convolutions of
    equal positive weights and no bias, average poolings for the max poolings, no batch norms
    (GoogLeNet's, ResNet's: as initialised a scale by 1 / sqrt(1 + eps), but a trained one's shift
    would move the zeros around the bar as an input transform does), no input transform
    (GoogLeNet's: it moves the zeros around the bar below ReLU's threshold). A ResNet bottleneck
    stays as it is: both its paths (the three convolutions, and the residual: a strided 1x1
    downsampling or none) are then symmetric about the same pixel (``layer_map`` refuses
    parallel paths that disagree), and so is their sum."""
    t = copy.deepcopy(trunk).eval().double()
    t.transform_input = False
    for m in list(t.modules()):
        for name, child in m.named_children():
            if isinstance(child, nn.MaxPool2d):
                avg = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode)
                setattr(m, name, avg)
            elif isinstance(child, nn.BatchNorm2d):
                setattr(m, name, nn.Identity())
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
    return t


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_thin_bar_comes_out_centred_on_itself(trunks, backbone, geometry):
    # A vertical bar in the input, centred on an fc7 pixel (1 px wide on AlexNet's, GoogLeNet's
    # and ResNet's whole-pixel maps, 2 px on VGG16's half-pixel ones), through a trunk of symmetric
    # layers: every tap's response is symmetric about the bar, so a registered head's output is.
    # Measured before the odd kernels: every AlexNet and GoogLeNet arch shifted by +0.5 px.
    trunk, _, origins = trunks[backbone, geometry]
    archs = _archs(backbone)
    trunk, stride, width = _averaging(trunk), trunk.taps["final"].stride, 640
    x0 = origins["final"] + stride * round((width / 2 - origins["final"]) / stride)
    x = torch.zeros(1, 3, 48, width, dtype=torch.float64)
    left, right = math.floor(x0), math.ceil(x0)
    x[..., left : right + 1] = 1.0
    with torch.no_grad():
        feats = trunk(x)
        for arch in archs:
            head = FCNHead(arch, 1, trunk).double().eval()
            for name, m in head.named_children():
                if name.startswith("score"):
                    m.weight.fill_(1.0 / m.weight.shape[1])
            profile = head(feats, 48, width)[0, 0].sum(0)
            assert profile.abs().max() > 0 and profile[0] == profile[-1] == 0  # the bar's only
            shift = _centroid(profile) - x0
            assert abs(shift) < 1e-6, (arch, shift)
            n = min(left + 1, width - right)  # the profile mirrored about the bar: the same
            mirrored = profile[left + 1 - n : left + 1].flip(0), profile[right : right + n]
            torch.testing.assert_close(*mirrored, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_odd_kernels_on_whole_pixels_even_on_half_pixels_and_no_resampling(geometry):
    kernels = {}
    for backbone in BACKBONES:
        trunk = _trunk(backbone, geometry)
        assert not any(
            isinstance(m, nn.ReplicationPad2d | nn.AvgPool2d) for m in trunk.modules()
        ), backbone
        kernels[backbone] = {}
        if "fcn8s" in _archs(backbone):
            head = FCNHead("fcn8s", 2, trunk)
            kernels[backbone] = {
                name: getattr(head, name).kernel_size[0]
                for name in ("upscore2", "upscore_pool4", "upscore8")
            }
        fcn32s = FCNHead("fcn32s", 2, trunk)
        kernels[backbone]["upscore"] = fcn32s.upscore.kernel_size[0]
    assert kernels == {
        "vgg16": {"upscore2": 4, "upscore_pool4": 4, "upscore8": 16, "upscore": 64},  # 2x2 pools
        "alexnet": {"upscore2": 3, "upscore_pool4": 3, "upscore8": 15, "upscore": 63},  # 3x3
        # inception5b is a 2x2 maxpool4 on from inception4e: between two of its pixels
        "googlenet": {"upscore2": 4, "upscore_pool4": 3, "upscore8": 15, "upscore": 63},
        # strided 3x3 convolutions and pool, 1x1 downsamplings: every map on whole pixels
        "resnet50": {"upscore2": 3, "upscore_pool4": 3, "upscore8": 15, "upscore": 63},
        "resnet50_os8": {"upscore": 15},  # stride 8: one upsampling by 8
    }


@pytest.mark.parametrize("size", [(64, 72), (61, 75)])
def test_torchvision_s_head_draws_a_pixel_where_torchvision_does(trunks, size):
    """fcn_torchvision interpolates as torchvision does (``align_corners=False`` to the input's
    size): a one-pixel score of its map of h x w comes out centred at (i + 1/2) H / h - 1/2, not
    on its pixel's coordinate: (stride - 1) / 2 = 3.5 pixels on at output stride 8 where H = 8 h,
    and drifting across an image of another size. What torchvision's weights were trained with;
    not what shift-and-stitch upsamples with for f > 1 (tests/test_stitch.py)."""
    trunk, _, origins = trunks["resnet50_os8", "same"]
    head, stride, origin = ConvHead("fcn_torchvision", 1, trunk).eval(), 8, origins["final"]
    assert trunk.taps["final"].stride == stride and origin == 0.0  # pixel i at 8 i, measured
    (height, width), n = size, [-(-s // stride) for s in size]  # the final map's size
    for i in (1, 4, n[0] - 2):
        score = torch.zeros(1, 1, *n)
        score[0, 0, i, 3] = 1.0
        out = head.upsample(score, height, width)[0, 0]
        where = (i + 0.5) * height / n[0] - 0.5
        # H = 8 h: a tent of half-width 8, its centroid exact; else one stretched to H / h pixels,
        # sampled at whole ones: its centroid within 0.003 of its centre
        tolerance = 1e-4 if height == stride * n[0] else 1e-2
        centre = _centroid(out.sum(1))
        assert abs(centre - where) < tolerance, (i, centre, where)
        if height == stride * n[0]:  # its pixel (measured) at 8 i: 3.5 pixels before
            assert abs(centre - (origin + stride * i) - (stride - 1) / 2) < 1e-4
