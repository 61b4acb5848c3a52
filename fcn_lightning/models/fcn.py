"""FCN-32s, 16s, 8s and 8s at-once heads on any trunk (paper, section 4.2): upsampling factors
and crop offsets derived from the taps' coordinate maps (docs/PAPER.md, Network geometry); and
torchvision's FCN head (docs/TRUNKS.md, ResNet)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead as TorchvisionHead

from ..contract import SINGLE_HEAD
from ..normalization import Normalization, get_normalization
from .base import FCNSpec, SegmentationNet
from .trunk import Trunk
from .trunks import DILATABLE, TRUNKS
from .upsample import upsampler

# The taps each arch fuses after ``final``, coarse to fine; their count is its stage.
SKIPS = {"fcn32s": (), "fcn16s": ("pool4",), "fcn8s": ("pool4", "pool3")}
SKIPS["fcn8s_atonce"] = SKIPS["fcn8s"]
SKIPS["fcn_torchvision"] = ()
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


def upsampling_kernel(factor: int, offset: float) -> int:
    """The kernel of a factor-``f`` upsampling of a map whose pixel 0 sits at ``offset`` output
    pixels: ``2f`` where that is half a pixel off the output grid (VGG16's 2x2 poolings), ``2f - 1``
    where it is on it (AlexNet's and GoogLeNet's 3x3 ones); either way every output pixel is on
    the grid (docs/TRUNKS.md, Geometry and the half pixel)."""
    return 2 * factor - 1 if offset == int(offset) else 2 * factor


def _upsampled(
    stride: int, origin: float, factor: int, padding: int, kernel: int | None = None
) -> tuple[int, float]:
    """(stride, origin) after a transposed convolution of kernel ``kernel`` (2f unless given),
    stride f, padding p."""
    stride //= factor
    kernel = 2 * factor if kernel is None else kernel
    return stride, origin - stride * ((kernel - 1) / 2 - padding)


def upsampling_padding(geometry: str, factor: int) -> int:
    """An upsampling's padding: none in the paper geometry, f // 2 in the same geometry for a
    2f kernel (:class:`Upsampling` pads so that the crop is 0, whatever the kernel)."""
    return factor // 2 if geometry == "same" else 0


def output_offset(
    stride: int, origin: float, padding: int, what: str, kernel: int | None = None
) -> int:
    """The crop offset of the final upsampling (factor ``stride``) of a map on (stride, origin),
    with the kernel ``kernel`` (:func:`upsampling_kernel`'s unless given)."""
    kernel = upsampling_kernel(stride, origin) if kernel is None else kernel
    _, origin = _upsampled(stride, origin, stride, padding, kernel)
    return _index(-origin, what)


@dataclass(frozen=True)
class Upsampling:
    """One of a head's upsamplings, of a map on (stride, origin) onto a target grid (a skip tap's,
    or the input's): its layer's settings and the upsampled map's grid. ``offset``: the target
    pixel under the upsampled map's pixel 0 (a skip's offset; the output crop is its negative)."""

    factor: int
    kernel: int
    padding: int
    output_padding: int
    stride: int
    origin: float
    offset: int

    @classmethod
    def plan(
        cls, stride: int, origin: float, target: tuple[int, float], geometry: str, what: str
    ) -> Upsampling:
        """The upsampling from (stride, origin) onto ``target`` (stride, origin): the kernel of
        :func:`upsampling_kernel`; in the paper geometry unpadded, in the same geometry padded so
        that the offset is 0 (``f // 2`` for a 2f kernel on half pixels) and extended at the end
        by ``output_padding`` to ``f`` times the coarse map's size where it can be."""
        step, target_origin = target
        factor = stride // step
        where = (origin - target_origin) / step  # the coarse pixel 0 on the target grid
        kernel = upsampling_kernel(factor, where)
        centre = (kernel - 1) / 2
        _index(where - centre, what)  # whole target pixels, or the taps do not align
        padding = output_padding = 0
        if geometry == "same":
            padding = min(max(0, int(centre - where)), kernel - 1)
            output_padding = min(max(0, factor - kernel + 2 * padding), factor - 1)
        offset = int(where - centre) + padding
        return cls(
            factor, kernel, padding, output_padding, step, target_origin + step * offset, offset
        )

    def layer(self, channels: int, learnable: bool) -> nn.ConvTranspose2d:
        return upsampler(
            channels, self.factor, kernel=self.kernel, padding=self.padding,
            output_padding=self.output_padding, learnable=learnable,
        )  # fmt: skip


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
        self.score_fr = nn.Conv2d(final.channels, n, 1)
        stride, origin = final.stride, final.origin
        self.offsets: dict[str, int] = {}
        self.upsamplings: dict[str, Upsampling] = {}  # by layer name
        for name in self.skips:
            tap = trunk.taps[name]
            if tap.stride >= stride:  # a dilated trunk's: no upsampling between the two
                raise ValueError(
                    f"{arch} fuses the {name} tap (stride {tap.stride}) into a coarser map, but at "
                    f"output_stride={getattr(trunk, 'output_stride', 32)} the {trunk.backbone} map "
                    f"before it has stride {stride} too: train {arch} at output_stride=32, or "
                    "fcn32s / fcn_torchvision at this output stride"
                )
            up = Upsampling.plan(
                stride, origin, (tap.stride, tap.origin), self.geometry, f"{arch}'s {name} crop"
            )
            setattr(self, f"score_{name}", nn.Conv2d(tap.channels, n, 1))
            setattr(self, UPSCORE[name], up.layer(n, learnable_upsampling))
            self.upsamplings[UPSCORE[name]] = up
            self.offsets[name] = up.offset
            stride, origin = up.stride, max(up.origin, tap.origin)  # the fused map: where both are
        # the fused scores before the final upsampling (what shift-and-stitch interlaces)
        self.grid: tuple[int, float] = (stride, origin)
        self.final = FINAL_UPSCORE[len(self.skips)]
        up = Upsampling.plan(stride, origin, (1, 0.0), self.geometry, f"{arch}'s output crop")
        setattr(self, self.final, up.layer(n, learnable=False))
        self.upsamplings[self.final] = up
        self.offsets["final"] = -up.offset
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


def aux_key(head: str) -> str:
    """The output key of a head's auxiliary scores: ``aux`` for the single head (torchvision's)."""
    return "aux" if head == SINGLE_HEAD else f"{head}_aux"


class ConvHead(nn.Module):
    """torchvision's FCN head (its ``FCNHead``: 3x3 conv + BN + ReLU + dropout 0.1 + 1x1 score
    layer) on the ``final`` tap, its scores interpolated bilinearly to the input as torchvision
    does (``align_corners=False``); with ``aux``, the same on the ``pool4`` tap (torchvision's
    ``aux_classifier`` on layer3), trained with a weighted loss (docs/TRUNKS.md, ResNet)."""

    def __init__(self, arch: str, num_classes: int, trunk: Trunk, aux: bool = False) -> None:
        super().__init__()
        if trunk.geometry != "same":
            raise ValueError(
                f"{arch} interpolates its scores to the input's size, as torchvision does: its "
                f"trunk needs geometry='same' (no margin), got {trunk.geometry!r}"
            )
        final = trunk.taps["final"]
        # where its training drew each score (shift-and-stitch places them there): interpolated
        # with align_corners=False from inputs a multiple of the stride, coarse pixel i lands at
        # stride * i + (stride - 1) / 2, not at its receptive field's centre stride * i
        grid = (final.stride, final.origin + (final.stride - 1) / 2)
        self.arch, self.geometry, self.grid = arch, trunk.geometry, grid
        self.classifier = TorchvisionHead(final.channels, num_classes)
        self.aux_classifier = (
            TorchvisionHead(trunk.taps["pool4"].channels, num_classes) if aux else None
        )

    def coarse(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(feats["final"])

    def upsample(self, score: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return F.interpolate(score, size=(height, width), mode="bilinear", align_corners=False)

    def aux(self, feats: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        return self.upsample(self.aux_classifier(feats["pool4"]), height, width)


class FCN(SegmentationNet):
    """A trunk and one or more FCN heads sharing it; ``forward`` adds each head's auxiliary
    scores (under :func:`aux_key`) in training, or where ``aux=True`` asks for them."""

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
        dilated = {"output_stride": spec.output_stride} if spec.backbone in DILATABLE else {}
        self.trunk = TRUNKS[spec.backbone](
            width=spec.width, geometry=spec.geometry, in_channels=spec.in_channels,
            dropout=dropout, **dilated,
        )  # fmt: skip
        if spec.arch == "fcn_torchvision":
            heads = {n: ConvHead(spec.arch, c, self.trunk, spec.aux) for n, c in spec.heads}
        else:
            heads = {
                n: FCNHead(spec.arch, c, self.trunk, learnable_upsampling) for n, c in spec.heads
            }
        self.heads = nn.ModuleDict(heads)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.spec.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.spec.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return self.trunk(x)

    def coarse(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per head, the fused scores before the final upsampling (on the head's ``grid``)."""
        feats = self.features(x)
        return {name: head.coarse(feats) for name, head in self.heads.items()}

    def forward(self, x: torch.Tensor, aux: bool | None = None) -> dict[str, torch.Tensor]:
        feats = self.features(x)  # checks the input first
        height, width = x.shape[-2], x.shape[-1]
        out = {
            n: head.upsample(head.coarse(feats), height, width) for n, head in self.heads.items()
        }
        if self.spec.aux and (self.training if aux is None else aux):
            for name, head in self.heads.items():
                out[aux_key(name)] = head.aux(feats, height, width)
        return out

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
