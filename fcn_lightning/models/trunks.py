"""The trunks an FCN can be built on, by ``arch.backbone`` name (docs/PAPER.md, Other trunks;
docs/TRUNKS.md)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .alexnet import AlexNetTrunk
from .googlenet import GoogLeNetTrunk
from .trunk import Trunk
from .vgg import VGG16Trunk

# backbone name -> trunk constructor (keyword arguments width, geometry, in_channels, dropout)
TRUNKS: dict[str, Callable[..., Trunk]] = {
    "vgg16": partial(VGG16Trunk, batch_norm=False),
    "vgg16_bn": partial(VGG16Trunk, batch_norm=True),
    "alexnet": AlexNetTrunk,
    "googlenet": GoogLeNetTrunk,
}
BACKBONES = tuple(TRUNKS)
