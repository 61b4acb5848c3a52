"""The trunk interface: a backbone that hands the FCN heads named feature maps ("taps").

Each tap carries its coordinate map, as the authors' reference code computes it (Caffe's
``coord_map``): feature pixel ``i`` sits at input coordinate ``origin + stride * i``. The heads
derive their upsampling factors and crop offsets from these (docs/PAPER.md, Network geometry),
so any trunk with the taps an arch needs works (docs/PAPER.md, Other trunks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# paper: the reference's geometry (a margin on the input, upsamplings unpadded, crops from the
# coordinate maps); same: no margin, each upsampling of factor f padded by f // 2, crops at 0.
GEOMETRIES = ("paper", "same")


@dataclass(frozen=True)
class Tap:
    """A feature map of a trunk: its channels and where its pixels sit on the input."""

    channels: int
    stride: int
    origin: float  # input coordinate of feature pixel 0


def _side(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def coord_map(
    layers: Iterable[nn.Module], stride: int = 1, origin: float = 0.0
) -> tuple[int, float]:
    """(stride, origin) of the map after ``layers``, starting from a map at (stride, origin).

    A convolution or pooling of kernel k, stride s, padding p (dilation d) maps output pixel i to
    input coordinate ``s * i + d * (k - 1) / 2 - p``; other layers keep the map.
    """
    for m in layers:
        if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            k, s, p = _side(m.kernel_size), _side(m.stride), _side(m.padding)
            d = _side(getattr(m, "dilation", 1))
            origin += stride * (d * (k - 1) / 2 - p)
            stride *= s
    return stride, origin


class Trunk(nn.Module, ABC):
    """A backbone: ``forward(x)`` returns one tensor per tap, named as in ``taps``.

    The heads read ``final`` (the last, coarsest map: VGG16's fc7) and, for the FCN-16s / 8s
    skips, ``pool4`` and ``pool3``.
    """

    taps: dict[str, Tap]
    geometry: str

    @abstractmethod
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_pretrained(self, source: str | Path, *, progress: bool = True) -> None:
        """Load pretrained classifier weights (a name such as ``"imagenet"``, or a file)."""
