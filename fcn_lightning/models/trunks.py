"""The trunks an FCN can be built on, by ``arch.backbone`` name (docs/PAPER.md, Other trunks;
docs/TRUNKS.md)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .alexnet import AlexNetTrunk
from .googlenet import GoogLeNetTrunk
from .resnet import OUTPUT_STRIDES, ResNetTrunk
from .trunk import Trunk
from .vgg import VGG16Trunk

# backbone name -> trunk constructor (keyword arguments width, geometry, in_channels, dropout;
# output_stride for DILATABLE ones)
TRUNKS: dict[str, Callable[..., Trunk]] = {
    "vgg16": partial(VGG16Trunk, batch_norm=False),
    "vgg16_bn": partial(VGG16Trunk, batch_norm=True),
    "alexnet": AlexNetTrunk,
    "googlenet": GoogLeNetTrunk,
    "resnet50": partial(ResNetTrunk, backbone="resnet50"),
    "resnet101": partial(ResNetTrunk, backbone="resnet101"),
}
BACKBONES = tuple(TRUNKS)
# the trunks that also take ``output_stride`` (16 or 8: strides turned into dilation)
DILATABLE = ("resnet50", "resnet101")
__all__ = ["BACKBONES", "DILATABLE", "OUTPUT_STRIDES", "TRUNKS"]
