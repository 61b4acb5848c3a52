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
) -> FCN | LateFusionFCN:
    """Build an FCN from plain arguments (docs/PAPER.md, Network geometry).

    Args:
        arch: ``fcn32s``, ``fcn16s``, ``fcn8s`` or ``fcn8s_atonce``.
        num_classes: classes of the single head ``SINGLE_HEAD`` (ignored when ``heads`` is given).
        heads: several heads sharing the trunk, e.g. ``{"sem": 33, "geo": 3}`` (SIFT Flow).
        backbone: ``vgg16``, ``vgg16_bn`` (batch norm, for training from scratch), ``alexnet`` or
            ``googlenet`` (the paper's Table 1; docs/TRUNKS.md).
        geometry: ``paper`` (pad 100, the reference crops) or ``same`` (no margin, ~0.6x the FLOPs).
        width: multiplier on every channel count; 1.0 is the paper's (torchvision's) network.
        pretrained: ``None`` (random trunk), ``"imagenet"`` (torchvision's weights API) or the
            path of a local torchvision-layout state dict of the backbone.
        in_channels: input channels; extra channels' conv1_1 filters start as the RGB mean.
        learnable_upsampling: learn the intermediate 2x upsamplings (the final one stays fixed).
        normalization: ``imagenet`` or ``caffe`` input normalisation the model expects; defaults
            to ``imagenet`` (what torchvision's weights need).
        streams: late fusion, e.g. ``{"rgb": 3, "hha": 3}``: one FCN per stream on its own input
            channels (in that order), score maps averaged. ``in_channels`` is then ignored.
    """
    if streams:
        kw = dict(num_classes=num_classes, heads=heads, backbone=backbone, geometry=geometry, width=width,
                  pretrained=pretrained, learnable_upsampling=learnable_upsampling, dropout=dropout,
                  normalization=normalization, progress=progress)  # fmt: skip
        return LateFusionFCN(
            {name: build_fcn(arch, in_channels=int(c), **kw) for name, c in streams.items()}
        )
    spec = FCNSpec(
        arch=arch,
        heads=tuple((str(k), int(v)) for k, v in heads.items())
        if heads
        else ((SINGLE_HEAD, int(num_classes)),),
        backbone=backbone,
        geometry=geometry,
        width=float(width),
        in_channels=int(in_channels),
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
