"""Shift-and-stitch (paper, section 3.2): f = 1 is the plain forward, f = 2 the interlace of four
shifted forwards, f = 32 the dilated FCN-32s on every pixel, any batch and input size, the
refusals, and predict.py's shift_stitch."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, TINY, cfg_of
from helpers.launcher import commands
from PIL import Image
from torch import nn
from torchvision import tv_tensors

import fcn_lightning.app.common as common_module
import fcn_lightning.app.console as console_module
import fcn_lightning.models.stitch as stitch_module
from fcn_lightning.app.common import as_command, load_module
from fcn_lightning.app.evaluate import evaluate
from fcn_lightning.app.predict import MANIFEST, predict
from fcn_lightning.data import eval_transforms, read_image
from fcn_lightning.errors import ConfigError
from fcn_lightning.models import FCNHead, Tap, Trunk, build_fcn, upsampler
from fcn_lightning.models.stitch import (
    ShiftAndStitch,
    allowed_factors,
    shift,
    shift_and_stitch,
    stitched_grid,
    upsample,
    with_shift_and_stitch,
)
from fcn_lightning.module import FCNModule

ARCHS = ("fcn32s", "fcn16s", "fcn8s")
GEOMETRIES = ("paper", "same")
HEADS = {"sem": 3, "geo": 2}


def net(arch: str, geometry: str, **kw):
    """A tiny FCN in eval mode whose score layers are not the zeros they start as (else every
    output would be zero and equal to every other)."""
    kw.setdefault("heads", HEADS)
    model = build_fcn(arch, width=1 / 16, geometry=geometry, **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".score_" in name:
                p.normal_(std=0.5)
    return model


def moved(x: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """x with its content moved down and right: zero rows on top, zero columns on the left,
    nothing cut off at the bottom or right (the result is larger by the move)."""
    h, w = x.shape[-2:]
    out = x.new_zeros(*x.shape[:-2], h + down, w + right)
    out[:, :, down:, right:] = x
    return out


def test_a_shift_pads_and_cuts_nothing_off():
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(shift(x, 2, 3), moved(x, 2, 3))
    assert shift(x, 2, 3).shape == (2, 3, 7, 10)
    assert torch.equal(shift(x, 0, 0), x)


# --------------------------------------------------------------------------- f = 1
# even kernels (VGG16's half pixels) and odd ones (the whole pixels of the others)
@pytest.mark.parametrize("trunk", ["vgg16", "alexnet", "googlenet", "resnet50"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_one_shift_is_the_plain_forward(arch, geometry, trunk):
    model = net(arch, geometry, backbone=trunk)
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        plain, stitched = model(x), shift_and_stitch(model, x, 1)
        wrapped = ShiftAndStitch(model, 1)(x)
    assert list(stitched) == list(plain) == ["sem", "geo"]
    for head in HEADS:
        assert plain[head].abs().max() > 0
        if trunk == "vgg16":  # the same operations as the net's own
            assert torch.equal(stitched[head], plain[head]), head
            assert torch.equal(wrapped[head], plain[head]), head
        else:  # registered alike: to float rounding (a half-pixel offset would be ~0.1 of it)
            atol = 1e-6  # ResNet-50's logits are ~100 (its batch norms' initial scale): theirs
            atol *= float(plain[head].abs().max()) if trunk == "resnet50" else 1.0
            torch.testing.assert_close(stitched[head], plain[head], atol=atol, rtol=0)
            torch.testing.assert_close(wrapped[head], plain[head], atol=atol, rtol=0)


def torchvision_net() -> nn.Module:
    """A tiny fcn_torchvision (ResNet-50 at output stride 8, the same geometry) with its auxiliary
    head, in eval mode: its score layers are torchvision's, not zero-initialised."""
    return build_fcn(
        "fcn_torchvision", backbone="resnet50", output_stride=8, aux=True, width=1 / 16,
        geometry="same", heads=HEADS,
    ).eval()  # fmt: skip


def test_one_shift_is_the_plain_forward_of_torchvision_s_head():
    """fcn_torchvision interpolates its scores as torchvision does, off the coordinate maps
    (``align_corners=False``): f = 1 is its plain forward all the same, without the auxiliary
    scores. Before, its f = 1 was upsampled on the coordinate maps: a third of the largest logit
    off the plain forward here, 7% of the pixels labelled otherwise."""
    model = torchvision_net()
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        plain, stitched = model(x), shift_and_stitch(model, x, 1)
        wrapped = ShiftAndStitch(model, 1)(x)
        with_aux = model(x, aux=True)
    assert list(stitched) == list(wrapped) == list(plain) == ["sem", "geo"]
    assert set(with_aux) == {"sem", "geo", "sem_aux", "geo_aux"}  # the net has them
    for head in HEADS:
        assert plain[head].abs().max() > 0
        assert torch.equal(stitched[head], plain[head]), head
        assert torch.equal(wrapped[head], plain[head]), head


# --------------------------------------------------------------------------- f = 2, written out
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_two_shifts_upsample_the_interlace_of_four_shifted_forwards(arch, geometry):
    model = net(arch, geometry)
    x = torch.randn(2, 3, 45, 38)
    h, w = x.shape[-2:]
    with torch.no_grad():
        out = shift_and_stitch(model, x, 2)
        plain = model(x)
        for name, head in model.heads.items():
            stride, origin = head.grid
            u = stride // 2
            # coarse maps of the input moved down by y and right by x, for y, x in {0, u}
            coarse = {(y, x_): model.coarse(moved(x, y, x_))[name] for y in (0, u) for x_ in (0, u)}
            # a moved input is larger: its map may have a row / column more; the others repeat
            # their last there (samples past the image's bottom / right edge)
            ch = max(t.shape[-2] for t in coarse.values())
            cw = max(t.shape[-1] for t in coarse.values())
            for key, t in coarse.items():
                coarse[key] = F.pad(t, (0, cw - t.shape[-1], 0, ch - t.shape[-2]), mode="replicate")
            n, c = coarse[0, 0].shape[:2]
            fine = torch.zeros(n, c, 2 * ch, 2 * cw)
            # moved by u: its samples sit u pixels up / left, between the unmoved ones
            fine[:, :, 1::2, 1::2] = coarse[0, 0]
            fine[:, :, 1::2, 0::2] = coarse[0, u]
            fine[:, :, 0::2, 1::2] = coarse[u, 0]
            fine[:, :, 0::2, 0::2] = coarse[u, u]
            # fine pixel m at input coordinate origin - u + u * m; a transposed convolution of
            # kernel 2u, stride u, no padding puts input pixel i at output u * i + u - 0.5
            up = upsampler(c, u, padding=0, learnable=False)(fine)
            start = u - 0.5 - (origin - u)
            assert start == int(start) and start >= 0
            start = int(start)
            # nothing cut off the moved inputs: the stitched map reaches every pixel
            assert up.shape[2] - start >= h and up.shape[3] - start >= w
            expected = up[:, :, start : start + h, start : start + w]
            torch.testing.assert_close(out[name], expected, atol=1e-6, rtol=1e-5)
            assert not torch.allclose(out[name], plain[name], atol=1e-3)  # not the plain one


# --------------------------------------------------------------------------- sizes and batches
@pytest.mark.parametrize(
    "arch, geometry, f, size",
    [
        ("fcn32s", "same", 2, (1, 1)),
        ("fcn32s", "paper", 4, (5, 7)),  # smaller than the stride
        ("fcn32s", "same", 32, (9, 6)),  # the fully dense version
        ("fcn16s", "paper", 2, (31, 33)),  # odd
        ("fcn16s", "same", 16, (12, 20)),
        ("fcn8s", "same", 4, (70, 33)),  # portrait
        ("fcn8s", "paper", 8, (17, 61)),  # landscape
    ],
)
def test_any_input_size_gives_scores_at_that_size(arch, geometry, f, size):
    model = net(arch, geometry)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = shift_and_stitch(model, x, f)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "sem": (2, 3, *size),
        "geo": (2, 2, *size),
    }
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("arch, geometry", [("fcn32s", "same"), ("fcn8s", "paper")])
def test_a_batch_is_stitched_as_its_images_alone(arch, geometry):
    model = net(arch, geometry)
    x = torch.randn(3, 3, 29, 41)
    with torch.no_grad():
        batch = shift_and_stitch(model, x, 4)
        for i in range(3):
            alone = shift_and_stitch(model, x[i : i + 1], 4)
            for head in HEADS:
                torch.testing.assert_close(
                    batch[head][i : i + 1], alone[head], atol=1e-6, rtol=1e-5
                )


class BoxTrunk(Trunk):
    """A stride-32 trunk that is a 32 x 32 mean of the first channel: pixel i covers input
    pixels 32i .. 32i + 31, its centre 32i + 15.5 (as VGG16's same geometry)."""

    def __init__(self) -> None:
        super().__init__()
        self.geometry, self.taps = "same", {"final": Tap(channels=1, stride=32, origin=15.5)}

    def forward(self, x):
        return {"final": F.avg_pool2d(x[:, :1], 32)}

    def load_pretrained(self, source, *, progress=True):
        raise NotImplementedError


def test_the_fully_dense_version_removes_the_subsampling():
    """f = s: every sample of the box trunk at every pixel, as the box filter without the
    subsampling (zeros entering on the top and left) at its centre, then the 2 x 2 bilinear step
    from pixel corners to centres."""
    model = build_fcn("fcn32s", width=1 / 16, geometry="same", num_classes=1).eval()
    model.trunk = BoxTrunk()
    model.heads["out"] = FCNHead("fcn32s", 1, model.trunk)
    with torch.no_grad():
        model.heads["out"].score_fr.weight.fill_(1.0)
        x = torch.randn(2, 1, 64, 96)
        out = shift_and_stitch(model, x.expand(-1, 3, -1, -1), 32)["out"]
        # box[m, n]: the mean of input rows m - 31 .. m, columns n - 31 .. n (zeros before 0)
        box = F.avg_pool2d(F.pad(x, (31, 0, 31, 0)), 32, stride=1)
    # sample m sits at coordinate m - 15.5: pixel k is the mean of samples k + 15 and k + 16
    dense = (box[..., :-1, :-1] + box[..., 1:, :-1] + box[..., :-1, 1:] + box[..., 1:, 1:]) / 4
    torch.testing.assert_close(out[..., :48, :80], dense[..., 15:63, 15:95])
    # past the last sample (k + 16 > 63) only its side of the kernel is left
    edge = (box[..., 63, 15:95] + box[..., 63, 16:96]) / 4
    torch.testing.assert_close(out[..., 48, :80], edge)


# --------------------------------------------------------------------------- the dilated net
def float64_fcn32s(geometry: str, width: float, *, biases: bool = False):
    """A tiny FCN-32s in float64, random score layer; the trunk's biases as initialised (zero)
    or, with ``biases``, random."""
    with torch.random.fork_rng():  # the trunk's initialisation, the same every run
        torch.manual_seed(0)
        model = build_fcn("fcn32s", width=width, geometry=geometry, heads={"sem": 3})
    model = model.eval().double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".score_" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
            elif biases and name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
    return model


def dilated_scores(model, x: torch.Tensor) -> torch.Tensor:
    """The dilated FCN-32s (paper, section 3.2: the subsampling removed, the filters after it
    dilated): ``model``'s VGG16 layers with every pooling at stride 1 (its ceil mode: a window
    past the bottom / right edge takes the max of what is inside) and each later layer dilated
    by the stride before it, its zero padding scaled alike; the score at every pixel: sample
    ``i`` at input coordinate ``origin + i`` (the trunk's final tap's origin)."""
    trunk, d = model.trunk, 1
    for layer in trunk.features:
        if isinstance(layer, nn.Conv2d):
            x = F.conv2d(x, layer.weight, layer.bias, padding=d * layer.padding[0], dilation=d)
        elif isinstance(layer, nn.MaxPool2d):
            assert layer.kernel_size == layer.stride == 2 and layer.ceil_mode
            x = F.max_pool2d(F.pad(x, (0, d, 0, d), value=-math.inf), 2, stride=1, dilation=d)
            d *= 2
        else:
            assert isinstance(layer, nn.ReLU), layer
            x = F.relu(x)
    fc6 = trunk.fc6
    x = F.relu(F.conv2d(x, fc6.weight, fc6.bias, padding=d * fc6.padding[0], dilation=d))
    return model.heads["sem"].score_fr(F.relu(trunk.fc7(x)))


def test_f_32_is_the_dilated_fcn32s_on_every_pixel():
    """f = stride = 32, the paper geometry: every in-image pixel as the dilated net's, to float64
    rounding (before the shifted inputs were padded, every pixel of this small input differed,
    by up to 1.8: the copies moved by b had lost the bottom / right b rows and columns). The
    trunk's biases are zero, as built: then the zero padding of each shifted copy's layers (it
    begins b pixels further out than the dilated net's) meets only zeros behind the paper
    geometry's 100-pixel margin; test_the_bottom_and_right_edges_are_the_dilated_nets: biases."""
    model = float64_fcn32s("paper", 1 / 32)
    h, w = 45, 67  # odd, and not a multiple of 32: ceil-mode windows cut by the edge
    x = torch.randn(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (head,) = model.heads.values()
    with torch.no_grad():
        out = shift_and_stitch(model, x, 32)["sem"]
        # the dilated net on a frame 31 pixels larger at the top / left: its samples then start
        # 31 pixels before sample 0, as the stitched map's (the copies moved by 1 .. 31)
        dense = dilated_scores(model, F.pad(x, (31, 0, 31, 0)))
    stride, origin = stitched_grid(head.grid, 32)
    assert stride == 1 and origin == head.grid[1] - 31
    # the final step (a bilinear upsampling of factor 1): pixel k is the mean of the samples at
    # k - 0.5 and k + 0.5, samples a and a + 1
    a = int(-0.5 - origin)
    expected = F.avg_pool2d(dense, 2, stride=1)[..., a : a + h, a : a + w]
    assert expected.shape == out.shape == (1, 3, h, w) and out.std(dim=(2, 3)).min() > 0.01
    assert (out - expected).abs().max() < 1e-5


def test_the_bottom_and_right_edges_are_the_dilated_nets():
    """Random biases, the same geometry, f = 4: the stitched samples are the dilated net's up to
    the bottom / right edges. Not within reach of the top / left edges (about half the
    receptive field, 202 pixels, and the upsampling's 8): there each copy moved by b has its
    layers' zero padding b pixels further out than the dilated net's, and a padded pixel is not
    the value its layer computes from the zeros beyond the image (docs/PAPER.md)."""
    model = float64_fcn32s("same", 1 / 64, biases=True)
    h, w = 243, 251
    x = torch.randn(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (head,) = model.heads.values()
    with torch.no_grad():
        out = shift_and_stitch(model, x, 4)["sem"]
        dense = dilated_scores(model, x)
    # the stitched map's sample m sits at origin - 24 + 8 m: the dilated net's sample 8 m - 24
    grid = stitched_grid(head.grid, 4)
    samples = F.pad(dense[..., ::8, ::8], (3, 0, 3, 0))  # the first 3: out of its frame
    expected = upsample(samples, grid, head.geometry, h, w)
    far = 210
    assert (out[..., far:, far:] - expected[..., far:, far:]).abs().max() < 1e-5
    assert out[..., far:, far:].std(dim=(2, 3)).min() > 0.01  # the input shows through


def float64_resnet_fcn(arch: str, output_stride: int):
    """A tiny FCN on ResNet-50 (the same geometry) in float64: random score layers, and batch
    norms whose statistics and affine terms are random, so that a layer maps zeros to other
    values and its zero padding is not what it would compute from the zeros beyond the image."""
    with torch.random.fork_rng():  # the trunk's initialisation, the same every run
        torch.manual_seed(0)
        model = build_fcn(
            arch, backbone="resnet50", output_stride=output_stride, width=1 / 32,
            geometry="same", heads={"sem": 3},
        )  # fmt: skip
    model = model.eval().double()
    generator = torch.Generator().manual_seed(0)

    def uniform(n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(uniform(n, -0.1, 0.1))
                m.running_var.copy_(uniform(n, 0.5, 2.0))
                m.weight.copy_(uniform(n, 0.7, 1.0))
                m.bias.copy_(uniform(n, -0.1, 0.1))
        for name, p in model.named_parameters():
            if ".score_" in name or ".classifier.4." in name:  # the score layer
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    return model


def dilated_resnet_scores(model, x: torch.Tensor) -> torch.Tensor:
    """The dilated net (paper, section 3.2, as ``dilated_scores`` for VGG16; torchvision's
    ``replace_stride_with_dilation`` taken to every stride): ``model``'s ResNet layers with every
    stride 1, each later layer dilated by the product of the strides before it and its padding
    scaled alike (the max pooling's with -inf), a bottleneck's 1x1 downsampling at stride 1; then
    the head's scores before its upsampling (torchvision's head: its 3x3 convolution dilated
    alike). Sample ``i`` at input coordinate ``origin + i`` (the trunk's final tap's origin)."""
    trunk, d = model.trunk, 1

    def conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        nonlocal d
        (k, _), (s, _), (p, _), (dilation, _) = (
            layer.kernel_size, layer.stride, layer.padding, layer.dilation
        )  # fmt: skip
        assert layer is trunk.conv1 or p == dilation * (k - 1) // 2, layer  # "same" padding
        x = F.conv2d(x, layer.weight, layer.bias, padding=d * p, dilation=d * dilation)
        d *= s
        return x

    x = F.relu(trunk.bn1(conv(trunk.conv1, x)))
    pool = trunk.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    x = F.max_pool2d(F.pad(x, (d, d, d, d), value=-math.inf), 3, stride=1, dilation=d)
    d *= 2
    for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        for block in layer:
            identity = x
            if block.downsample is not None:
                down, norm = block.downsample
                assert down.kernel_size == (1, 1) and down.bias is None
                identity = norm(F.conv2d(x, down.weight))
            out = F.relu(block.bn1(conv(block.conv1, x)))
            out = F.relu(block.bn2(conv(block.conv2, out)))
            x = F.relu(block.bn3(conv(block.conv3, out)) + identity)
    (head,) = model.heads.values()
    if model.spec.arch != "fcn_torchvision":
        return head.score_fr(x)
    first, *rest = head.classifier  # 3x3 conv, batch norm, ReLU, dropout, the score layer
    x = F.conv2d(x, first.weight, first.bias, padding=d * first.padding[0], dilation=d)
    for layer in rest:
        x = layer(x)
    return x


@pytest.mark.parametrize(
    ("arch", "output_stride", "f", "reach"),
    [
        # f = the output stride: the dilated net at every pixel; the head's 3x3 convolution,
        # dilated by 8, reaches 8 pixels further
        ("fcn_torchvision", 8, 8, 8),
        # f = 4 of 32 (f = 32's 1024 forwards: too slow here): every 8th sample of the dilated
        # net, upsampled by 8 (its kernel 15 reaches 7 pixels), as VGG16's test above
        ("fcn32s", 32, 4, 7),
    ],
)
def test_a_resnet50_s_stitched_scores_are_the_dilated_nets(arch, output_stride, f, reach):
    """Random batch norms: the stitched samples are the dilated net's up to the bottom / right
    edges, wherever the dilated net's dependence on the input stays clear of its top / left
    padding (half ResNet-50's receptive field of 427, and the head's and upsampling's reach):
    nearer the top / left each copy's layers pad where the dilated net computes. Past the last
    sample the copies computed (ResNet's maps stop before the bottom / right edge) nothing is
    made up: before, the f = 4 case's last 4 rows and 2 columns took in a repeat of a sample 32
    pixels back (up to 1.6 off, 322 pixels labelled otherwise)."""
    model = float64_resnet_fcn(arch, output_stride)
    h, w = 237, 243  # odd, not a multiple of the stride
    x = torch.randn(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (head,) = model.heads.values()
    with torch.no_grad():
        out = shift_and_stitch(model, x, f)["sem"]
        dense = dilated_resnet_scores(model, x)
    # torchvision's head draws coarse pixel i where its training put it, (s - 1) / 2 pixels on
    drawn = (output_stride - 1) / 2 if arch == "fcn_torchvision" else 0.0
    assert head.grid == (output_stride, drawn) and dense.shape[-2:] == (h, w)
    u = output_stride // f
    grid = stitched_grid(head.grid, f)
    assert grid == (u, drawn - (f - 1) * u)
    # the stitched map's sample m is the dilated net's sample u (m - (f - 1)), the first f - 1
    # out of its frame; drawn at the head's grid
    samples = F.pad(dense[..., ::u, ::u], (f - 1, 0, f - 1, 0))
    expected = upsample(samples, grid, head.geometry, h, w)
    if f == output_stride and not drawn:  # a factor-1 upsampling on whole pixels: the samples
        torch.testing.assert_close(expected, dense, rtol=0, atol=0)
    if f == output_stride and drawn:  # 3.5 pixels on: the mean of the samples 3 and 4 back
        later = (
            dense[..., :-4, :-4]
            + dense[..., 1:-3, :-4]
            + dense[..., :-4, 1:-3]
            + dense[..., 1:-3, 1:-3]
        ) / 4
        torch.testing.assert_close(expected[..., 4:, 4:], later, rtol=0, atol=1e-12)
    field = model.trunk.taps["final"].field
    assert field == 427  # ResNet-50's at every output stride (tests/test_resnet.py)
    far = (field - 1) // 2 + reach
    assert h - far >= 16
    region = (..., slice(far, None), slice(far, None))
    assert (out[region] - expected[region]).abs().max() < 1e-9
    assert out[region].std(dim=(2, 3)).min() > 0.01  # the input shows through


# --------------------------------------------------------------------------- late fusion
def test_late_fusion_stitches_each_stream_and_averages():
    model = build_fcn(
        "fcn16s", width=1 / 16, geometry="same", heads=HEADS, streams={"rgb": 3, "d": 1}
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".score_" in name:
                p.normal_(std=0.5)
        x = torch.randn(2, 4, 30, 26)
        plain, one = model(x), shift_and_stitch(model, x, 1)
        two = shift_and_stitch(model, x, 2)
        rgb = shift_and_stitch(model.streams["rgb"], x[:, :3], 2)
        depth = shift_and_stitch(model.streams["d"], x[:, 3:], 2)
    for head in HEADS:
        assert torch.equal(one[head], plain[head])
        torch.testing.assert_close(two[head], (rgb[head] + depth[head]) / 2)
        assert not torch.allclose(two[head], plain[head], atol=1e-3)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "arch, f, allowed",
    [
        ("fcn32s", 3, "1, 2, 4, 8, 16, 32"),
        ("fcn32s", 0, "1, 2, 4, 8, 16, 32"),
        ("fcn16s", -2, "1, 2, 4, 8, 16"),
        ("fcn16s", 32, "1, 2, 4, 8, 16"),
        ("fcn8s", 16, "1, 2, 4, 8"),
        ("fcn8s", 2.5, "1, 2, 4, 8"),
        ("fcn8s", "2", "1, 2, 4, 8"),
        ("fcn8s", True, "1, 2, 4, 8"),
        ("fcn8s", None, "1, 2, 4, 8"),
    ],
)
def test_a_factor_that_does_not_divide_the_stride_is_refused(arch, f, allowed):
    model = net(arch, "same")
    pattern = (
        rf"shift_stitch={f!r}: .*divides the output stride of {arch}.*allowed values: {allowed} "
    )
    for attempt in (
        lambda: ShiftAndStitch(model, f),
        lambda: with_shift_and_stitch(model, f),
        lambda: shift_and_stitch(model, torch.randn(1, 3, 8, 8), f),
    ):
        with pytest.raises(ValueError, match=pattern):
            attempt()
    assert ", ".join(map(str, allowed_factors(model))) == allowed


def test_a_net_without_coarse_maps_is_refused():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return {"out": x}

    with pytest.raises(TypeError, match="needs an FCN or a late-fusion FCN.*got Plain"):
        shift_and_stitch(Plain(), torch.randn(1, 3, 8, 8), 2)


# --------------------------------------------------------------------------- in place of a model
def test_wrapper_keeps_what_module_and_panels_read():
    settings = {"arch": "fcn16s", "width": 1 / 16, "geometry": "same", "pretrained": None}
    module = FCNModule({**settings, "heads": HEADS}).eval()
    model = module.model
    assert with_shift_and_stitch(model, 1) is model
    wrapped = with_shift_and_stitch(model, 4)
    assert isinstance(wrapped, ShiftAndStitch) and wrapped.f == 4 and wrapped.net is model
    assert wrapped.spec == model.spec and wrapped.normalization is model.normalization
    assert wrapped.head_names == ("sem", "geo") and not wrapped.training
    with pytest.raises(ValueError, match="already shift-and-stitched"):
        ShiftAndStitch(wrapped, 2)
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        expected = shift_and_stitch(model, x, 4)
        module.model = wrapped
        labels = module.predict_step((x, []), 0)
    assert set(labels) == {"sem", "geo"}
    for head in labels:
        assert torch.equal(labels[head], expected[head].argmax(1))


# --------------------------------------------------------------------------- predict.py
@pytest.fixture(scope="module")
def ckpt(tiny_run, tmp_path_factory) -> Path:
    """A tiny FCN-16s checkpoint whose score layers are random (not a step away from zero): the
    shared tiny run's (conftest: arch=fcn16s and helpers.TINY), changed in a copy."""
    out, _ = tiny_run
    state = torch.load(out / "fcn16s" / "checkpoints" / "best.ckpt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in state["state_dict"].items():
        if ".score_" in key:
            value.copy_(torch.randn(value.shape, generator=generator))
    path = tmp_path_factory.mktemp("stitch") / "random_scores.ckpt"
    torch.save(state, path)
    return path


def labels_of(ckpt: Path, image: Path, f: int) -> np.ndarray:
    module = load_module(ckpt)
    x = eval_transforms(normalization=module.model.normalization)(
        tv_tensors.Image(read_image(image, exif_transpose=True))
    ).as_subclass(torch.Tensor)
    with torch.no_grad():
        return shift_and_stitch(module.model, x[None], f)["out"][0].argmax(0).numpy()


@pytest.mark.xdist_group("stitch_ckpt")  # one worker computes the module fixture once
def test_predict_cli_with_shift_stitch(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"wide.png": (23, 41), "tall.png": (41, 23)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / name)
    out = tmp_path / "pred"
    args = [f"ckpt_path={ckpt}", f"input={photos}", f"output={out}", "device=cpu"]
    # a process of its own, forked from helpers.launcher's server (train.py's imports done)
    (result,) = commands(
        [ROOT / "predict.py", *args, "shift_stitch=2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shift_stitch=2: shift-and-stitch, 4 forwards per image" in result.stdout
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["shift_stitch"] == dict.fromkeys(manifest["outputs"], 2)
    assert len(manifest["outputs"]) == 4
    differs = False
    for name in ("wide.png", "tall.png"):
        expected = labels_of(ckpt, photos / name, 2)
        with Image.open(out / name) as label:
            assert label.mode == "P" and np.array_equal(np.asarray(label), expected), name
        differs |= not np.array_equal(expected, labels_of(ckpt, photos / name, 1))
    assert differs  # the stitched labels are not the plain ones

    # a factor the net cannot take: refused before any work, with the values it can (as
    # predict.py runs it: as_command, in-process; the command itself ran above)
    refused = tmp_path / "refused"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        as_command(predict, cfg_of("predict", [*args[:2], f"output={refused}", "device=cpu",
                                               "shift_stitch=3"], tmp_path / "run2"))  # fmt: skip
    assert stop.value.code == 1
    said = capsys.readouterr().err
    assert "shift_stitch=3" in said and "allowed values: 1, 2, 4, 8, 16 " in said
    assert not refused.exists()


@pytest.mark.xdist_group("stitch_ckpt")  # one worker computes the module fixture once
def test_manifest_records_each_outputs_setting_across_runs(ckpt, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(photos / name)
    out = tmp_path / "pred"

    def predict_one(name: str, f: int) -> dict:
        args = [f"ckpt_path={ckpt}", f"input={photos / name}", f"output={out}", "device=cpu"]
        predict(cfg_of("predict", [*args, f"shift_stitch={f}"], tmp_path / "run"))
        return json.loads((out / MANIFEST).read_text())

    predict_one("a.png", 4)
    manifest = predict_one("b.png", 1)  # a's outputs stay, made with 4
    assert manifest["shift_stitch"] == {
        "a.png": 4, "a_overlay.jpg": 4, "b.png": 1, "b_overlay.jpg": 1,
    }  # fmt: skip
    # a manifest written before the option existed: its outputs were plain forwards
    del manifest["shift_stitch"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert predict_one("a.png", 2)["shift_stitch"] == {
        "a.png": 2, "a_overlay.jpg": 2, "b.png": 1, "b_overlay.jpg": 1,
    }  # fmt: skip


@pytest.mark.xdist_group("stitch_ckpt")  # one worker computes the module fixture once
def test_eval_with_shift_stitch_records_it_and_keeps_another_evaluation(ckpt, tmp_path):
    data = [o for o in TINY if o.startswith("data.")]
    out = tmp_path / "eval"
    args = [f"ckpt_path={ckpt}", *data, "trainer.accelerator=cpu", f"output={out}"]
    plain = evaluate(cfg_of("eval", args, tmp_path / "h1"))
    stitched_cfg = cfg_of("eval", [*args, "shift_stitch=2"], tmp_path / "h2")
    with pytest.raises(ConfigError, match=r"holds another evaluation .*\)"):
        evaluate(stitched_cfg)  # the f=1 report stays
    assert json.loads((out / "eval.json").read_text())["shift_stitch"] == 1
    stitched_cfg.output = str(tmp_path / "eval2")
    stitched = evaluate(stitched_cfg)
    report = json.loads((tmp_path / "eval2" / "eval.json").read_text())
    assert report["shift_stitch"] == 2 and stitched["metrics"] == report["metrics"]
    assert plain["metrics"] != stitched["metrics"]  # random score layers: other labels
    with pytest.raises(ConfigError, match=r"shift_stitch=3: .*allowed values: 1, 2, 4, 8, 16"):
        evaluate(cfg_of("eval", [*args[:-1], "shift_stitch=3", f"output={tmp_path / 'e3'}"]))


@pytest.mark.parametrize(("arch", "geometry"), [("fcn32s", "same"), ("fcn32s", "paper"),
                                                ("fcn16s", "same"), ("fcn8s", "same")])  # fmt: skip
def test_the_samples_evened_out_past_the_edge_reach_no_pixel(arch, geometry, monkeypatch):
    """A copy's coarse map may be a row / column short of another's (its input is smaller by
    the difference of their shifts): what fills it in (zeros) is never used here (VGG16; nor on
    AlexNet or GoogLeNet, measured). ResNet-50's maps in the same geometry stop before the
    bottom / right edge, and the last pixels do reach the fill: there it counts as no sample
    (test_a_resnet50_s_stitched_scores_are_the_dilated_nets)."""
    model, x = net(arch, geometry), torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        outs = {f: shift_and_stitch(model, x, f) for f in (2, 4)}

    uneven = []

    def nan_filled(maps):
        h, w = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
        uneven.append(any(m.shape[-2:] != (h, w) for m in maps))
        return [F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2]), value=math.nan) for m in maps]

    monkeypatch.setattr(stitch_module, "same_size", nan_filled)
    for f, out in outs.items():
        with torch.no_grad():
            filled = shift_and_stitch(model, x, f)
        for head in HEADS:
            assert torch.equal(filled[head], out[head]), (f, head)
    assert any(uneven)  # there was something to fill


@pytest.mark.parametrize("geometry", ["same", "paper"])
def test_every_pixel_gets_a_stitched_prediction_up_to_the_edges(geometry):
    # the shifted inputs are padded, not cut: the stitched samples reach the bottom / right edge,
    # so the last rows / columns are interpolated, none a repeat of the one before it
    model = net("fcn32s", geometry)
    with torch.no_grad():
        outs = shift_and_stitch(model, torch.randn(1, 3, 64, 67), 4)
    for out in outs.values():
        assert out.shape[-2:] == (64, 67)
        assert (out.abs().sum(1) > 0).all()
        for k in (1, 2, 3):
            assert not torch.equal(out[..., -k, :], out[..., -k - 1, :])
            assert not torch.equal(out[..., -k], out[..., -k - 1])


# --------------------------------------------------------------------------- progress
class Counter:
    """A tqdm-like ``progress``: counts its updates."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n


def test_progress_hears_of_every_forward():
    model, x = net("fcn32s", "same"), torch.randn(2, 3, 40, 44)
    heard: list[tuple[int, int]] = []
    with torch.no_grad():
        plain = shift_and_stitch(model, x, 4)
        told = shift_and_stitch(model, x, 4, lambda done, total: heard.append((done, total)))
    assert heard == [(i, 16) for i in range(1, 17)]
    for head in plain:
        assert torch.equal(told[head], plain[head])  # the same scores
    fused = build_fcn("fcn16s", width=1 / 16, geometry="same", streams={"rgb": 3, "d": 1}).eval()
    counter = Counter()
    wrapped = ShiftAndStitch(fused, 2, progress=counter)
    assert wrapped.forwards == 8
    with torch.no_grad():
        wrapped(torch.randn(1, 4, 30, 26))
    assert counter.n == 8  # 2 x 2 shifts per stream


@pytest.mark.parametrize(("f", "terminal", "bar"), [(4, True, True), (2, True, False),
                                                    (4, False, False)])  # fmt: skip
def test_a_bar_shows_many_forwards_on_stderr(f, terminal, bar, capfd, monkeypatch):
    """16 forwards per image or more: a bar with an ETA on stderr (a terminal only); fewer: none."""
    monkeypatch.setattr(console_module, "on_terminal", lambda: terminal)
    module = FCNModule({"arch": "fcn32s", "width": 1 / 16, "geometry": "same"}).eval()
    module.model = with_shift_and_stitch(module.model, f)
    common_module.show_stitch_progress(module)
    capfd.readouterr()
    with torch.no_grad():
        module.model(torch.randn(1, 3, 40, 44))
    shown = capfd.readouterr()
    assert (module.model.progress is not None) is bar
    if bar:
        assert re.search(r"shift_stitch forwards: +\d+%.*\| \d+/16 \[", shown.err), shown.err
        assert "<?" in shown.err or re.search(r"<\d\d:\d\d", shown.err)  # the ETA
    else:
        assert shown.err == ""
    assert shown.out == ""
