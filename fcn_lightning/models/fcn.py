"""FCN-32s, 16s, 8s and 8s at-once heads on any trunk (paper, section 4.2): upsampling factors
and crop offsets derived from the taps' coordinate maps (docs/PAPER.md, Network geometry)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..normalization import Normalization, get_normalization
from .base import FCNSpec, SegmentationNet
from .trunk import Trunk
from .trunks import TRUNKS
from .upsample import upsampler

# The taps each arch fuses after ``final``, coarse to fine; their count is its stage.
SKIPS = {"fcn32s": (), "fcn16s": ("pool4",), "fcn8s": ("pool4", "pool3")}
SKIPS["fcn8s_atonce"] = SKIPS["fcn8s"]
STAGE = {arch: len(skips) for arch, skips in SKIPS.items()}
# The paper's layer names: the upsampling to a skip's stride; the last one, by skip count.
UPSCORE = {"pool4": "upscore2", "pool3": "upscore_pool4"}
FINAL_UPSCORE = ("upscore", "upscore16", "upscore8")
# FCN-8s at-once (PAMI): skips scaled before scoring so training straight from VGG16 is stable.
AT_ONCE_SCALES = {"pool4": 0.01, "pool3": 1e-4}
# Layers a later stage adds: the stage transfer leaves them at their initial values.
NEW_IN_STAGE = (*(f"score_{t}" for t in UPSCORE), *UPSCORE.values(), *FINAL_UPSCORE)


def _index(value: float, what: str) -> int:
    if value != int(value):
        raise ValueError(f"{what} falls between pixels ({value}): the trunk's taps do not align")
    return int(value)


def _upsampled(stride: int, origin: float, factor: int, padding: int) -> tuple[int, float]:
    """(stride, origin) after a transposed convolution of kernel 2f, stride f, padding p."""
    stride //= factor
    return stride, origin - stride * ((2 * factor - 1) / 2 - padding)


def upsampling_padding(geometry: str, factor: int) -> int:
    """An upsampling's padding: none in the paper geometry, f // 2 in the same geometry."""
    return factor // 2 if geometry == "same" else 0


def output_offset(stride: int, origin: float, padding: int, what: str) -> int:
    """The crop offset of the final upsampling (factor ``stride``) of a map on (stride, origin)."""
    _, origin = _upsampled(stride, origin, stride, padding)
    return _index(-origin, what)


def crop(t: torch.Tensor, offset: int, height: int, width: int) -> torch.Tensor:
    """Rows and columns ``offset`` .. ``offset + height`` / ``+ width`` of ``t``; past its edges
    (a stitched map only) the nearest row or column is repeated."""
    h, w = t.shape[-2], t.shape[-1]
    if 0 <= offset and offset + height <= h and offset + width <= w:
        return t[:, :, offset : offset + height, offset : offset + width]
    top, bottom = max(0, offset), min(h, offset + height)
    left, right = max(0, offset), min(w, offset + width)
    if bottom <= top or right <= left:  # nothing of t inside: no prediction to repeat
        return F.pad(t, (-offset, offset + width - w, -offset, offset + height - h))
    inside = t[:, :, top:bottom, left:right]
    pads = (left - offset, offset + width - right, top - offset, offset + height - bottom)
    return F.pad(inside, pads, mode="replicate")


def _fuse(up: torch.Tensor, skip: torch.Tensor, offset: int) -> torch.Tensor:
    """The sum over the region both maps cover; ``offset``: the skip pixel under up's pixel 0."""
    a, b = max(0, -offset), max(0, offset)
    h = min(up.shape[-2] - a, skip.shape[-2] - b)
    w = min(up.shape[-1] - a, skip.shape[-1] - b)
    return up[:, :, a : a + h, a : a + w] + skip[:, :, b : b + h, b : b + w]


class FCNHead(nn.Module):
    """Score layers and upsampling of one output head; ``offsets``: the crop of every skip and of
    the output (paper: 19; 5, 27; 5, 9, 31, as the reference; same: 0; docs/PAPER.md)."""

    def __init__(
        self, arch: str, num_classes: int, trunk: Trunk, learnable_upsampling: bool = True
    ) -> None:
        super().__init__()
        self.arch, self.skips = arch, SKIPS[arch]
        for tap in ("final", *self.skips):
            if tap not in trunk.taps:
                raise ValueError(
                    f"{arch} needs the trunk's {tap!r} tap; {type(trunk).__name__} has only "
                    f"{list(trunk.taps)}"
                )
        n, final = num_classes, trunk.taps["final"]
        self.geometry = trunk.geometry
        pad = partial(upsampling_padding, trunk.geometry)
        self.score_fr = nn.Conv2d(final.channels, n, 1)
        stride, origin = final.stride, final.origin
        self.offsets: dict[str, int] = {}
        for name in self.skips:
            tap, f = trunk.taps[name], stride // trunk.taps[name].stride
            setattr(self, f"score_{name}", nn.Conv2d(tap.channels, n, 1))
            setattr(
                self, UPSCORE[name], upsampler(n, f, padding=pad(f), learnable=learnable_upsampling)
            )
            stride, origin = _upsampled(stride, origin, f, pad(f))
            self.offsets[name] = _index((origin - tap.origin) / tap.stride, f"{arch}'s {name} crop")
            origin = max(origin, tap.origin)  # the fused map: where both maps are
        # the fused scores before the final upsampling (what shift-and-stitch interlaces)
        self.grid: tuple[int, float] = (stride, origin)
        self.final = FINAL_UPSCORE[len(self.skips)]
        setattr(self, self.final, upsampler(n, stride, padding=pad(stride), learnable=False))
        self.offsets["final"] = output_offset(stride, origin, pad(stride), f"{arch}'s output crop")
        self.scales = {t: AT_ONCE_SCALES[t] if arch == "fcn8s_atonce" else 1.0 for t in self.skips}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # zero-initialised scores (paper, section 4.3)
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def coarse(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fused scores before the final upsampling, on the grid ``self.grid``."""
        score = self.score_fr(feats["final"])
        for name in self.skips:
            skip = getattr(self, f"score_{name}")(feats[name] * self.scales[name])
            score = _fuse(getattr(self, UPSCORE[name])(score), skip, self.offsets[name])
        return score

    def upsample(self, score: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The final upsampling of ``coarse``'s scores, cropped to the input's size."""
        return crop(getattr(self, self.final)(score), self.offsets["final"], height, width)

    def forward(self, feats: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        return self.upsample(self.coarse(feats), height, width)


class FCN(SegmentationNet):
    """A trunk and one or more FCN heads sharing it."""

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
        self.trunk = TRUNKS[spec.backbone](
            width=spec.width, geometry=spec.geometry, in_channels=spec.in_channels, dropout=dropout
        )
        heads = {n: FCNHead(spec.arch, c, self.trunk, learnable_upsampling) for n, c in spec.heads}
        self.heads = nn.ModuleDict(heads)

    def coarse(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per head, the fused scores before the final upsampling (on the head's ``grid``)."""
        if x.dim() != 4 or x.shape[1] != self.spec.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.spec.in_channels}, H, W), got {tuple(x.shape)}"
            )
        feats = self.trunk(x)
        return {name: head.coarse(feats) for name, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.coarse(x)  # checks the input first
        height, width = x.shape[-2], x.shape[-1]
        return {name: self.heads[name].upsample(s, height, width) for name, s in scores.items()}

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
        if "arch" not in state.get("_extra_state", {}):  # none, or a late-fusion net's
            raise ValueError("state dict has no '_extra_state' entry saying how the FCN was built")
        model = cls(FCNSpec.from_dict(state["_extra_state"]), **kwargs)
        model.load_state_dict(state)
        return model
