"""FCN-32s, FCN-16s, FCN-8s and FCN-8s at-once on a VGG16 trunk (Long et al. 2015).

Forward contract: ``model(x)`` with ``x`` of shape (N, C, H, W) returns a dict from head name
to logits of shape (N, classes, H, W); a single-head model has the one head ``"out"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .upsample import upsampler
from .vgg import BACKBONES, GEOMETRIES, VGG16Trunk
from .weights import Normalization, get_normalization, load_trunk_state_dict

ARCHS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")
# How many skips an arch fuses: the order of the staged pipeline (32s -> 16s -> 8s).
STAGE = {"fcn32s": 0, "fcn16s": 1, "fcn8s": 2, "fcn8s_atonce": 2}
# Crop offsets of the reference (REFERENCE section 1) in the paper geometry.
PAPER_OFFSETS = {
    "fcn32s": {"final": 19},
    "fcn16s": {"pool4": 5, "final": 27},
    "fcn8s": {"pool4": 5, "pool3": 9, "final": 31},
}
PAPER_OFFSETS["fcn8s_atonce"] = PAPER_OFFSETS["fcn8s"]
# Layers that exist in a later stage but not in the earlier one: left at their initial values
# (zero scores, bilinear upsampling) by the stage transfer.
NEW_IN_STAGE = (
    "score_pool4",
    "score_pool3",
    "upscore",
    "upscore2",
    "upscore16",
    "upscore_pool4",
    "upscore8",
)


@dataclass(frozen=True)
class FCNSpec:
    """What fixes a model's layers and their shapes; saved in its state dict (``_extra_state``)."""

    arch: str = "fcn8s"
    heads: tuple[tuple[str, int], ...] = (("out", 21),)
    backbone: str = "vgg16"
    geometry: str = "paper"
    width: float = 1.0
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if not self.heads:
            raise ValueError("a model needs at least one head")
        for name, n in self.heads:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"head {name!r} needs a positive number of classes, got {n!r}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heads"] = {name: n for name, n in self.heads}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FCNSpec:
        d = dict(d)
        d["heads"] = tuple((str(k), int(v)) for k, v in dict(d["heads"]).items())
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def _crop(x: torch.Tensor, offset: int, height: int, width: int) -> torch.Tensor:
    return x[:, :, offset : offset + height, offset : offset + width]


class FCNHead(nn.Module):
    """Score layers and upsampling of one output head (its own score_fr and skips)."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        trunk: VGG16Trunk,
        geometry: str,
        learnable_upsampling: bool,
    ) -> None:
        super().__init__()
        self.arch, self.geometry = arch, geometry
        n = num_classes
        self.score_fr = nn.Conv2d(trunk.out_channels, n, 1)
        # paper: unpadded transposed convs, then the reference's fixed crops; same: padding f/2
        # centres each coarse cell on the pixels it pools, then a crop at 0 to the target size.
        pad = (lambda f: 0) if geometry == "paper" else (lambda f: f // 2)
        if arch == "fcn32s":
            self.upscore = upsampler(n, 32, padding=pad(32), learnable=False)
        else:
            self.score_pool4 = nn.Conv2d(trunk.pool4_channels, n, 1)
            self.upscore2 = upsampler(n, 2, padding=pad(2), learnable=learnable_upsampling)
            if arch == "fcn16s":
                self.upscore16 = upsampler(n, 16, padding=pad(16), learnable=False)
            else:
                self.score_pool3 = nn.Conv2d(trunk.pool3_channels, n, 1)
                self.upscore_pool4 = upsampler(n, 2, padding=pad(2), learnable=learnable_upsampling)
                self.upscore8 = upsampler(n, 8, padding=pad(8), learnable=False)
        # FCN-8s at-once (PAMI): skips scaled before scoring so training straight from VGG16 is stable.
        at_once = arch == "fcn8s_atonce"
        self.pool4_scale = 0.01 if at_once else 1.0
        self.pool3_scale = 1e-4 if at_once else 1.0
        self.offsets = PAPER_OFFSETS[arch] if geometry == "paper" else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # zero-initialised scores (the paper)
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def _fuse(self, up: torch.Tensor, skip: torch.Tensor, name: str) -> torch.Tensor:
        if self.offsets is not None:
            return up + _crop(skip, self.offsets[name], up.shape[-2], up.shape[-1])
        return _crop(up, 0, skip.shape[-2], skip.shape[-1]) + skip

    def forward(self, feats: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        score = self.score_fr(feats["fc7"])
        if self.arch == "fcn32s":
            out = self.upscore(score)
        else:
            score = self._fuse(
                self.upscore2(score), self.score_pool4(feats["pool4"] * self.pool4_scale), "pool4"
            )
            if self.arch == "fcn16s":
                out = self.upscore16(score)
            else:
                score = self._fuse(
                    self.upscore_pool4(score),
                    self.score_pool3(feats["pool3"] * self.pool3_scale),
                    "pool3",
                )
                out = self.upscore8(score)
        offset = self.offsets["final"] if self.offsets is not None else 0
        return _crop(out, offset, height, width)


class FCN(nn.Module):
    """A VGG16 trunk and one or more FCN heads sharing it."""

    def __init__(
        self,
        spec: FCNSpec,
        *,
        learnable_upsampling: bool = True,
        dropout: float = 0.5,
        normalization: str | Normalization | dict = "imagenet",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.normalization = get_normalization(normalization)
        self.trunk = VGG16Trunk(
            width=spec.width,
            batch_norm=spec.backbone == "vgg16_bn",
            geometry=spec.geometry,
            in_channels=spec.in_channels,
            dropout=dropout,
        )
        self.heads = nn.ModuleDict(
            {
                name: FCNHead(spec.arch, n, self.trunk, spec.geometry, learnable_upsampling)
                for name, n in spec.heads
            }
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.spec.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.spec.in_channels}, H, W), got {tuple(x.shape)}"
            )
        height, width = x.shape[-2], x.shape[-1]
        feats = self.trunk(x)
        return {name: head(feats, height, width) for name, head in self.heads.items()}

    # The spec travels in the state dict, so a checkpoint says what it was built as, and loading
    # it into a differently built model fails with both sides named.
    def get_extra_state(self) -> dict[str, Any]:
        return self.spec.as_dict()

    def set_extra_state(self, state: Any) -> None:
        if not state:
            return
        other = FCNSpec.from_dict(state)
        if other != self.spec:
            diffs = [
                f"{f.name}: checkpoint {getattr(other, f.name)!r} vs model {getattr(self.spec, f.name)!r}"
                for f in fields(FCNSpec)
                if getattr(other, f.name) != getattr(self.spec, f.name)
            ]
            raise ValueError("state dict was saved from a different FCN: " + "; ".join(diffs))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], **kwargs: Any) -> FCN:
        """Build the model a state dict (with its ``_extra_state``) was saved from and load it."""
        if "_extra_state" not in state:
            raise ValueError("state dict has no '_extra_state' entry saying how the FCN was built")
        model = cls(FCNSpec.from_dict(state["_extra_state"]), **kwargs)
        model.load_state_dict(state)
        return model

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split as the paper's solver treats them: weights and biases."""
        groups: dict[str, list[nn.Parameter]] = {"weight": [], "bias": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups["bias" if name.endswith("bias") else "weight"].append(p)
        return groups


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
) -> FCN:
    """Build an FCN from plain arguments.

    Args:
        arch: ``fcn32s``, ``fcn16s``, ``fcn8s`` or ``fcn8s_atonce``.
        num_classes: classes of the single head ``"out"`` (ignored when ``heads`` is given).
        heads: several heads sharing the trunk, e.g. ``{"sem": 33, "geo": 3}`` (SIFT Flow).
        backbone: ``vgg16`` or ``vgg16_bn`` (batch norm, for training from scratch).
        geometry: ``paper`` (pad 100, the reference crops) or ``same`` (no margin, ~half the FLOPs).
        width: multiplier on every channel count; 1.0 is the paper's VGG16.
        pretrained: ``None`` (random trunk), ``"imagenet"`` (torchvision's weights API) or the
            path of a local torchvision-layout VGG16 state dict.
        in_channels: input channels; extra channels' conv1_1 filters start as the RGB mean.
        learnable_upsampling: learn the intermediate 2x upsamplings (the final one stays fixed).
        normalization: ``imagenet`` or ``caffe`` input normalisation the model expects; defaults
            to ``imagenet`` (what torchvision's weights need).
        streams: late fusion, e.g. ``{"rgb": 3, "hha": 3}``: one FCN per stream on its own input
            channels (in that order), score maps averaged. ``in_channels`` is then ignored.
    """
    if streams:
        from .fusion import LateFusionFCN

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
        else (("out", int(num_classes)),),
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
        model.trunk.load_torchvision_state_dict(
            load_trunk_state_dict(pretrained, backbone, progress=progress)
        )
    return model
