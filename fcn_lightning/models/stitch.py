"""Shift-and-stitch (paper, section 3.2), an evaluation / prediction option the paper compared
with its skip architecture and did not adopt.

For a head whose coarse (fused, pre-upsampling) scores have stride ``s`` (32, 16 or 8) and the
option ``f`` (shifts per axis, a divisor of ``s``), with ``u = s / f``: the net runs on the input
shifted right by ``bx * u`` and down by ``by * u`` pixels for every ``0 <= bx, by < f`` (zeros, in
normalised input space, enter on the top / left; the content that moves past the bottom / right
edge is dropped, so every shifted input keeps the input's size). Coarse pixel ``j`` of the
shift ``b * u`` sits at input coordinate ``origin + s * j - b * u``, so the ``f x f`` coarse maps
interlace into one map of stride ``u`` whose pixel ``m = f * j + (f - 1 - b)`` sits at
``origin - (f - 1) * u + u * m``: each prediction at the centre of its receptive field. That map
is brought to the input's resolution as the net brings its own: a fixed bilinear transposed
convolution, of factor ``u`` here, cropped where the coordinate maps say
(``fcn.output_offset``). ``f = 1`` is the plain forward (the same operations on the one
unshifted input); ``f = s`` is the paper's fully dense version, equivalent to removing the
subsampling and dilating the later filters.

The stitched samples reach ``(f - 1) * u`` pixels further up / left than the plain ones and no
further down / right, and the finer upsampling kernel (2u wide, not 2s) reaches less past the
last sample: where the output passes that reach the scores are zero, as the transposed
convolution gives them there (in the same geometry a strip of up to s / 2 - u pixels at the
bottom and right; in the paper geometry, whose margin leaves more room, a few pixels at some
sizes).

Late fusion: everything after the coarse maps is linear, so each stream is stitched (with its own
grid) and the streams' outputs are averaged as ``LateFusionFCN`` averages them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .base import SegmentationNet
from .fcn import FCN, crop, output_offset, upsampling_padding
from .fusion import LateFusionFCN
from .upsample import bilinear_weight

SETTING = "shift_stitch"  # the option's name in conf/predict.yaml and conf/eval.yaml


def output_strides(net: SegmentationNet) -> tuple[int, ...]:
    """The strides of the net's coarse score maps (one per head and stream; all equal for the
    package's FCNs), sorted and without repeats."""
    if isinstance(net, LateFusionFCN):
        return tuple(sorted({s for stream in net.streams.values() for s in output_strides(stream)}))
    if isinstance(net, FCN):
        return tuple(sorted({head.grid[0] for head in net.heads.values()}))
    raise TypeError(
        f"shift-and-stitch needs an FCN or a late-fusion FCN (their coarse score maps and grids); "
        f"got {type(net).__name__}"
    )


def allowed_factors(net: SegmentationNet) -> list[int]:
    """The values of ``f`` the net allows: the divisors of its output stride(s)."""
    strides = output_strides(net)
    return [f for f in range(1, min(strides) + 1) if all(s % f == 0 for s in strides)]


def check_factor(f: Any, net: SegmentationNet, setting: str = SETTING) -> int:
    """``f`` as an int, if it is a whole number >= 1 that divides the net's output stride;
    otherwise a ValueError naming ``setting`` and the values allowed."""
    strides = output_strides(net)
    allowed = ", ".join(map(str, allowed_factors(net)))
    what = (
        f"the output stride of {net.spec.arch} ({strides[0]})"
        if len(strides) == 1
        else f"every output stride of the net ({', '.join(map(str, strides))})"
    )
    try:
        value = operator.index(f) if not isinstance(f, bool) else None
    except TypeError:
        value = None
    if value is None or value < 1 or any(s % value for s in strides):
        raise ValueError(
            f"{setting}={f!r}: shift-and-stitch takes a number of shifts per axis that divides "
            f"{what}; allowed values: {allowed} (1 = off, the plain forward)"
        )
    return value


def shift(x: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """``x`` with its content moved ``down`` and ``right`` pixels (zeros entering on the top and
    left, what passes the bottom and right edges dropped): same size."""
    height, width = x.shape[-2], x.shape[-1]
    return F.pad(x, (right, 0, down, 0))[..., :height, :width]


def interlace(maps: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """One map of ``f`` times the rows and columns from the coarse maps of the ``f * f`` shifts,
    ``maps[by * f + bx]`` for the input moved ``by`` steps down and ``bx`` right: its pixel
    ``(j, i)`` goes to ``(f * j + f - 1 - by, f * i + f - 1 - bx)``."""
    if len(maps) != f * f:
        raise ValueError(f"interlacing f={f} needs {f * f} maps, got {len(maps)}")
    n, c, h, w = maps[0].shape
    # (f, f, ...) indexed by (by, bx); flipped: by f - 1 - by, the row within each block of f
    grid = torch.stack(list(maps)).reshape(f, f, n, c, h, w).flip(0, 1)
    return grid.permute(2, 3, 4, 0, 5, 1).reshape(n, c, h * f, w * f)


def stitched_grid(grid: tuple[int, float], f: int) -> tuple[int, float]:
    """(stride, origin) of the interlaced map of coarse maps on ``grid`` (pixel i at input
    coordinate origin + stride * i)."""
    stride, origin = grid
    step = stride // f
    return step, origin - (f - 1) * step


def upsample(
    score: torch.Tensor, grid: tuple[int, float], geometry: str, height: int, width: int
) -> torch.Tensor:
    """The net's kind of final upsampling of a map on ``grid``: a fixed bilinear transposed
    convolution of factor ``grid[0]``, cropped to the input where the coordinate map says.

    It is padded as ``geometry`` pads it (paper: 0, same: f // 2; the plain forward's operation)
    unless the crop needs the pixels that padding trims: then less (the same values, and the
    kernel's reach past the last sample). Beyond that reach the output is zero."""
    factor, origin = grid
    start = output_offset(factor, origin, 0, "the stitched output crop")  # with padding 0
    full_h, full_w = (score.shape[-2] + 1) * factor, (score.shape[-1] + 1) * factor
    fits = min(start, full_h - start - height, full_w - start - width)
    padding = max(0, min(upsampling_padding(geometry, factor), fits))
    weight = bilinear_weight(score.shape[1], 2 * factor, score.dtype, score.device)
    up = F.conv_transpose2d(score, weight, stride=factor, padding=padding)
    return crop(up, start - padding, height, width)


def stitch_fcn(net: FCN, x: torch.Tensor, f: int) -> dict[str, torch.Tensor]:
    """Shift-and-stitch of one FCN: per head, the scores (N, classes, H, W) at the input's size."""
    check_factor(f, net)
    (stride,) = output_strides(net)
    step, height, width = stride // f, x.shape[-2], x.shape[-1]
    coarse: dict[str, list[torch.Tensor]] = {name: [] for name in net.heads}
    for by in range(f):
        for bx in range(f):
            for name, score in net.coarse(shift(x, by * step, bx * step)).items():
                coarse[name].append(score)
    return {
        name: upsample(
            interlace(coarse[name], f), stitched_grid(head.grid, f), head.geometry, height, width
        )
        for name, head in net.heads.items()
    }


def shift_and_stitch(net: SegmentationNet, x: torch.Tensor, f: int) -> dict[str, torch.Tensor]:
    """``net``'s scores per head for ``x`` (N, C, H, W) by shift-and-stitch with ``f`` shifts per
    axis; a late-fusion net's streams are each stitched, then averaged as its forward does."""
    check_factor(f, net)  # also refuses a net without coarse score maps, naming what it needs
    if isinstance(net, LateFusionFCN):
        parts = net.split(x)
        return net.average(
            [stitch_fcn(s, p, f) for s, p in zip(net.streams.values(), parts, strict=True)]
        )
    return stitch_fcn(net, x, f)


class ShiftAndStitch(SegmentationNet):
    """A net whose forward is shift-and-stitch with ``f`` shifts per axis; it keeps what the
    module, the panels and the writers read of the model (``spec``, ``normalization``,
    ``head_names``). Put it in place of ``module.model`` to evaluate or predict with it."""

    def __init__(self, net: SegmentationNet, f: int, *, setting: str = SETTING) -> None:
        super().__init__()
        if isinstance(net, ShiftAndStitch):
            raise ValueError(f"the net is already shift-and-stitched (f={net.f})")
        self.f = check_factor(f, net, setting)
        self.net = net
        self.spec = net.spec
        self.normalization = net.normalization
        self.training = net.training  # wrapped as it is (train() would set every layer alike)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return shift_and_stitch(self.net, x, self.f)

    def get_extra_state(self) -> dict[str, Any]:
        return {SETTING: self.f}

    def set_extra_state(self, state: Any) -> None:
        if state and state.get(SETTING) != self.f:
            raise ValueError(
                f"state dict was saved with {SETTING}={state.get(SETTING)!r}, this net has {self.f}"
            )

    def extra_repr(self) -> str:
        return f"f={self.f}"


def with_shift_and_stitch(
    net: SegmentationNet, f: Any, *, setting: str = SETTING
) -> SegmentationNet:
    """``net`` for ``f = 1`` (off: the plain forward, which shift-and-stitch with one shift
    equals), else ``ShiftAndStitch(net, f)``; a bad ``f`` is refused either way."""
    return net if check_factor(f, net, setting) == 1 else ShiftAndStitch(net, f, setting=setting)
