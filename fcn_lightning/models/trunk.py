"""The trunk interface: a backbone that hands the FCN heads named feature maps ("taps").

Each tap carries its coordinate map, as the authors' reference code computes it (Caffe's
``coord_map``): feature pixel ``i`` sits at input coordinate ``origin + stride * i``. The heads
derive their upsampling factors and crop offsets from these (docs/PAPER.md, Network geometry),
so any trunk with the taps an arch needs works (docs/PAPER.md, Other trunks; docs/TRUNKS.md).
A tap also carries its receptive field and its depth in convolutions (:func:`layer_map`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# paper: the reference's geometry (a margin on the input, upsamplings unpadded, crops from the
# coordinate maps); same: no margin, each upsampling of factor f padded by f // 2, crops at 0.
GEOMETRIES = ("paper", "same")

# The heads upsample a factor f with a kernel of 2f (the reference's), whose output pixels land
# on whole input pixels only when the map it upsamples sits on half pixels, as the taps of
# VGG16 do (its 2x2 poolings). A trunk of odd kernels only (AlexNet, GoogLeNet) has its taps on
# whole pixels: it declares them HALF_PIXEL further on (``Tap.shift``), so its output is
# registered to within half an input pixel of its exact coordinate map (docs/TRUNKS.md).
HALF_PIXEL = 0.5

_PADS = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReplicationPad2d, nn.ReflectionPad2d)


@dataclass(frozen=True)
class Tap:
    """A feature map of a trunk: its channels and where its pixels sit on the input."""

    channels: int
    stride: int
    origin: float  # input coordinate of feature pixel 0, as the heads align it
    field: int | None = None  # receptive field: the side of the input square one pixel sees
    depth: int | None = None  # convolutions on the longest path from the input
    shift: float = 0.0  # origin minus the exact coordinate map (HALF_PIXEL or 0)


@dataclass(frozen=True)
class LayerMap:
    """What a stack of layers does to coordinates: see :func:`layer_map`."""

    stride: int = 1
    origin: float = 0.0
    field: int = 1
    depth: int = 0


def _side(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def layer_map(layers: Iterable[nn.Module | tuple], start: LayerMap | None = None) -> LayerMap:
    """Stride, coordinate map, receptive field and convolution depth after ``layers``.

    A convolution or pooling of kernel k, stride s, padding p (dilation d) maps output pixel i to
    input coordinate ``s * i + d * (k - 1) / 2 - p`` and widens the receptive field by
    ``d * (k - 1)`` pixels of its input; a padding layer (``nn.ZeroPad2d`` ...) moves the map by
    its left (= top) padding; a module with children runs them in order (``nn.Sequential``);
    a tuple holds parallel branches (an Inception module's), each a module or a list of layers,
    whose maps must agree: the receptive field and depth are those of the widest and deepest
    branch. Other layers (activations, batch norm, dropout) keep the map.
    """
    m = start or LayerMap()
    stride, origin, field, depth = m.stride, m.origin, m.field, m.depth
    for layer in layers:
        if isinstance(layer, tuple):
            maps = [layer_map(b if isinstance(b, list) else [b], m) for b in layer]
            if len({(b.stride, b.origin) for b in maps}) != 1:
                raise ValueError(f"parallel branches disagree on the coordinate map: {maps}")
            stride, origin = maps[0].stride, maps[0].origin
            field, depth = max(b.field for b in maps), max(b.depth for b in maps)
        elif isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            k, s, p = _side(layer.kernel_size), _side(layer.stride), _side(layer.padding)
            d = _side(getattr(layer, "dilation", 1))
            origin += stride * (d * (k - 1) / 2 - p)
            field += stride * d * (k - 1)
            stride *= s
            depth += isinstance(layer, nn.Conv2d)
        elif isinstance(layer, _PADS):
            left, _, top, _ = layer.padding
            if left != top:
                raise ValueError(f"{layer}: the map needs the same padding on the left and top")
            origin -= stride * left
        elif next(layer.children(), None) is not None:
            inner = layer_map(layer.children(), LayerMap(stride, origin, field, depth))
            stride, origin, field, depth = inner.stride, inner.origin, inner.field, inner.depth
        m = LayerMap(stride, origin, field, depth)
    return m


def coord_map(
    layers: Iterable[nn.Module | tuple], stride: int = 1, origin: float = 0.0
) -> tuple[int, float]:
    """(stride, origin) of the map after ``layers``, starting from a map at (stride, origin).

    See :func:`layer_map` for the layers it reads.
    """
    m = layer_map(layers, LayerMap(stride, origin))
    return m.stride, m.origin


def receptive_field(layers: Iterable[nn.Module | tuple]) -> int:
    """The side, in input pixels, of the input square one pixel after ``layers`` depends on.

    The geometric ("theoretical") receptive field, as in the paper's Table 1 (VGG16's fc7: 404):
    the layers' kernels only, whatever their weights and the input's borders.
    """
    return layer_map(layers).field


def tap_of(channels: int, layers: Iterable[nn.Module | tuple], *, shift: float = 0.0) -> Tap:
    """The :class:`Tap` of the map after ``layers`` (its origin moved by ``shift``)."""
    m = layer_map(layers)
    return Tap(channels, m.stride, m.origin + shift, m.field, m.depth, shift)


def half_pixel_resampler() -> nn.Sequential:
    """Resample a map half its own pixel further on (origin + stride / 2, same size): the mean
    of each 2x2 neighbourhood, the last row and column repeated. No parameters.

    A trunk whose poolings have odd kernels (3x3, stride 2) puts a coarse pixel on a fine one,
    where the heads' 2x upsamplings (kernel 4, from VGG16's 2x2 poolings) expect it between two:
    such a trunk hands its skip taps through this, so that every crop lands on a whole pixel.
    """
    return nn.Sequential(nn.ReplicationPad2d((0, 1, 0, 1)), nn.AvgPool2d(2, stride=1))


def scaled(channels: int, width: float) -> int:
    """A channel count times the width multiplier, at least 1."""
    return max(1, round(channels * width))


def expand_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt RGB conv1_1 filters (out, 3, k, k) to ``in_channels`` inputs.

    The RGB filters are kept; every extra channel starts as the mean of the RGB filters (the
    paper's RGB-D early fusion). With fewer than 3 channels every channel is that mean.
    """
    mean = weight.mean(dim=1, keepdim=True)
    if in_channels < weight.shape[1]:
        return mean.expand(-1, in_channels, -1, -1).clone()
    extra = mean.expand(-1, in_channels - weight.shape[1], -1, -1)
    return torch.cat([weight, extra], dim=1)


def check_trunk_args(geometry: str, width: float, in_channels: int) -> None:
    """Refuse a geometry, width or input channel count no trunk can be built with."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")


@torch.no_grad()
def load_mapped_state_dict(
    module: nn.Module, mapped: Mapping[str, torch.Tensor], *, what: str, first_conv: str
) -> None:
    """Load a state dict already renamed to ``module``'s keys, checking it first.

    The first convolution's RGB filters (``first_conv``) are adapted to the module's input
    channels (:func:`expand_input_channels`); a batch norm's ``num_batches_tracked`` missing from
    older files is kept as it is. Raises ``ValueError`` naming missing keys, or a key whose shape
    differs (pretrained weights need width 1.0 and the matching backbone).
    """
    own, mapped = module.state_dict(), dict(mapped)
    w = mapped.get(first_conv)
    if w is not None and w.shape[1] != own[first_conv].shape[1]:
        mapped[first_conv] = expand_input_channels(w, own[first_conv].shape[1])
    for key in own:
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = own[key]
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ValueError(
            f"pretrained {what} state dict lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}"
        )
    for key, value in mapped.items():
        if key not in own:
            raise ValueError(f"pretrained {what} state dict has {key!r}, which the trunk lacks")
        if own[key].shape != value.shape:
            raise ValueError(
                f"pretrained weight {key!r} has shape {tuple(value.shape)} but the trunk expects "
                f"{tuple(own[key].shape)} (pretrained weights need width=1.0 and the matching "
                "backbone)"
            )
    module.load_state_dict(mapped, strict=True)


class Trunk(nn.Module, ABC):
    """A backbone: ``forward(x)`` returns one tensor per tap, named as in ``taps``.

    The heads read ``final`` (the last, coarsest map: VGG16's fc7) and, for the FCN-16s / 8s
    skips, ``pool4`` (stride 16) and ``pool3`` (stride 8): tap names are roles, so AlexNet's
    ``pool4`` is its pool2, GoogLeNet's its inception4e output.
    """

    taps: dict[str, Tap]
    geometry: str

    @abstractmethod
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_pretrained(self, source: str | Path, *, progress: bool = True) -> None:
        """Load pretrained classifier weights (a name such as ``"imagenet"``, or a file)."""
