"""The trunk interface: a backbone that hands the FCN heads named feature maps ("taps"), each
with its coordinate map (pixel ``i`` at input coordinate ``origin + stride * i``), receptive
field and depth (docs/PAPER.md, Network geometry and Other trunks; docs/TRUNKS.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .weights import load_trunk_state_dict

# paper: the reference's geometry (a margin on the input, upsamplings unpadded, crops from the
# coordinate maps); same: no margin, each upsampling of factor f padded by f // 2, crops at 0.
GEOMETRIES = ("paper", "same")

# Where VGG16's taps sit between input pixels (fc7 at 32i + 12.5): the heads upsample such a map
# with an even kernel 2f, a map on whole pixels (AlexNet's, GoogLeNet's) with an odd 2f - 1
# (docs/TRUNKS.md, Geometry and the half pixel). No tap is declared off its coordinate map.

_PADS = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReplicationPad2d, nn.ReflectionPad2d)


@dataclass(frozen=True)
class Tap:
    """A feature map of a trunk: its channels and where its pixels sit on the input."""

    channels: int
    stride: int
    origin: float  # input coordinate of feature pixel 0 (exact: the heads align to it)
    field: int | None = None  # receptive field: the side of the input square one pixel sees
    depth: int | None = None  # convolutions on the longest path from the input


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
    """Stride, coordinate map, receptive field and convolution depth after ``layers``: convs,
    poolings, padding layers, modules with children (run in order) and tuples of parallel
    branches (an Inception module's; their maps must agree). Other layers keep the map."""
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


def receptive_field(layers: Iterable[nn.Module | tuple]) -> int:
    """The geometric receptive field after ``layers``, in input pixels (Table 1: fc7's 404)."""
    return layer_map(layers).field


def tap_of(channels: int, layers: Iterable[nn.Module | tuple]) -> Tap:
    """The :class:`Tap` of the map after ``layers``: its exact coordinate map."""
    m = layer_map(layers)
    return Tap(channels, m.stride, m.origin, m.field, m.depth)


def scaled(channels: int, width: float) -> int:
    """A channel count times the width multiplier, at least 1."""
    return max(1, round(channels * width))


def expand_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB conv1_1 filters (out, 3, k, k) for ``in_channels`` inputs: extra channels start as
    the RGB filters' mean (RGB-D early fusion); with fewer than 3, every channel is that mean."""
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
    """Load a state dict already renamed to ``module``'s keys, checked first; ``first_conv``'s
    filters are adapted to the input channels, a missing ``num_batches_tracked`` kept."""
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


def convolutionalized(
    state: Mapping[str, torch.Tensor], fc6: str, fc7: str, fc6_size: int
) -> dict[str, torch.Tensor]:
    """A torchvision VGG16 / AlexNet state dict's ``features.*``, with its classifier layers
    ``fc6`` and ``fc7`` (key prefixes) reshaped into the 1x1-or-wider convolutions fc6 / fc7."""
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("features."):
            mapped[key] = value
        elif key.startswith((fc6, fc7)):
            mapped[("fc6." if key.startswith(fc6) else "fc7.") + key.split(".")[-1]] = value
    if "fc6.weight" in mapped:
        w = mapped["fc6.weight"]
        mapped["fc6.weight"] = w.reshape(w.shape[0], -1, fc6_size, fc6_size)
    if "fc7.weight" in mapped:
        mapped["fc7.weight"] = mapped["fc7.weight"].reshape(*mapped["fc7.weight"].shape, 1, 1)
    return mapped


def linear_as_conv(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A classifier's Linear layer as the equivalent 1x1 convolution."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.copy_(bias)
    return conv


class Trunk(nn.Module, ABC):
    """A backbone: ``forward(x)`` returns one tensor per tap, named as in ``taps``.

    The heads read ``final`` (the last, coarsest map: VGG16's fc7) and, for the FCN-16s / 8s
    skips, ``pool4`` (stride 16) and ``pool3`` (stride 8): tap names are roles, so AlexNet's
    ``pool4`` is its pool2, GoogLeNet's its inception4e output.
    """

    taps: dict[str, Tap]
    geometry: str
    backbone: str

    @abstractmethod
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def load_pretrained(self, source: str | Path, *, progress: bool = True) -> None:
        """Load ``"imagenet"`` (torchvision's weights) or a torchvision-layout file of the
        backbone, through the trunk's ``load_torchvision_state_dict``."""
        self.load_torchvision_state_dict(
            load_trunk_state_dict(source, self.backbone, progress=progress)
        )
