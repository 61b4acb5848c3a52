"""``build_fcn``: an FCN, or a late-fusion net of FCN streams, from plain arguments."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..contract import SINGLE_HEAD
from ..normalization import Normalization
from .base import FCNSpec
from .fcn import FCN
from .fusion import LateFusionFCN


def build_fcn(
    arch: str = "fcn8s",
    *,
    num_classes: int = 21,
    heads: Mapping[str, int] | None = None,
    backbone: str = "vgg16",
    geometry: str = "paper",
    width: float = 1.0,
    pretrained: str | Path | None = None,
    in_channels: int = 3,
    learnable_upsampling: bool = True,
    dropout: float = 0.5,
    normalization: str | Normalization | None = None,
    streams: Mapping[str, int] | None = None,
    progress: bool = True,
    output_stride: int = 32,
    aux: bool = False,
) -> FCN | LateFusionFCN:
    """Build an FCN from plain arguments (the ``arch`` settings: docs/CONFIG.md; geometry:
    docs/PAPER.md; trunks: docs/TRUNKS.md). ``heads`` (name -> classes) replaces the single head
    of ``num_classes``; ``streams`` (name -> input channels, in order) builds a late-fusion net of
    one FCN per stream, ``in_channels`` then ignored. ``output_stride`` (16, 8: a ResNet trunk
    dilated) and ``aux`` (fcn_torchvision's auxiliary head): docs/TRUNKS.md, ResNet."""
    if streams:
        kw = dict(num_classes=num_classes, heads=heads, backbone=backbone, geometry=geometry, width=width,
                  pretrained=pretrained, learnable_upsampling=learnable_upsampling, dropout=dropout,
                  normalization=normalization, progress=progress, output_stride=output_stride,
                  aux=aux)  # fmt: skip
        return LateFusionFCN(
            {name: build_fcn(arch, in_channels=int(c), **kw) for name, c in streams.items()}
        )
    named = heads.items() if heads else [(SINGLE_HEAD, num_classes)]
    heads_ = tuple((str(k), int(v)) for k, v in named)
    spec = FCNSpec(
        arch,
        heads_,
        backbone,
        geometry,
        float(width),
        int(in_channels),
        int(output_stride),
        bool(aux),
    )
    model = FCN(
        spec,
        learnable_upsampling=learnable_upsampling,
        dropout=dropout,
        normalization=normalization or "imagenet",
    )
    if pretrained:
        model.trunk.load_pretrained(pretrained, progress=progress)
    return model
