"""Shift-and-stitch (paper, section 3.2; docs/PAPER.md, Shift-and-stitch; docs/TRAINING.md).

For coarse scores of stride ``s`` and ``f`` shifts per axis (``f`` divides ``s``), ``u = s / f``:
the net runs on the input moved right / down by ``bx * u``, ``by * u`` for ``0 <= bx, by < f``,
as many zero columns / rows put in front and nothing cut off (:func:`shift`), so every copy's
layers meet the image's bottom and right edges where the unshifted net's do; the ``f x f``
coarse maps (:func:`same_size`) interlace into one map of stride ``u`` (:func:`interlace`,
:func:`stitched_grid`) that reaches every pixel, brought to the input's size by a fixed bilinear
upsampling of factor ``u`` cropped where the coordinate maps say (:func:`upsample`). ``f = 1`` is
the plain forward: torchvision's head (``fcn_torchvision``) interpolates as its forward does
(``align_corners=False``: coarse pixel ``i`` of ``h`` at input coordinate ``(i + 1/2) H / h - 1/2``
of ``H``, ``s * i + (s - 1) / 2`` where ``H = s h``); for ``f > 1`` its stitched maps are drawn on
its ``grid``, that same ``s * i + (s - 1) / 2``: where its training put each score.
Late fusion: each stream is stitched, then the streams averaged.

``f = s``: the scores are the dilated net's (pools at stride 1, the layers after them dilated)
at every pixel the nets' own zero padding does not reach; near the top / left edges it does, as
each copy's padding starts its shift further out (docs/PAPER.md, Shift-and-stitch).

The ``f * f`` forwards (per stream) can take long: ``progress``, where given, hears of each one
(:func:`ticker`); this module prints nothing, the command that runs it draws the bar."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .base import SegmentationNet
from .fcn import FCN, FCNHead, Upsampling, crop, output_offset, upsampling_kernel
from .fusion import LateFusionFCN
from .upsample import bilinear_weight

SETTING = "shift_stitch"  # the option's name in conf/predict.yaml and conf/eval.yaml

# what hears of each forward: a tqdm-like object (``update(1)`` per forward) or a callable
# ``progress(done, total)`` called after forward ``done`` of the ``total`` for one input
Progress = Any


def output_strides(net: SegmentationNet) -> tuple[int, ...]:
    """The strides of the net's coarse score maps (per head and stream), sorted, no repeats."""
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
    """``f`` as an int if it is a whole number >= 1 dividing the net's output stride(s)."""
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
    """``x`` with its content moved ``down`` and ``right`` pixels: ``down`` zero rows on top and
    ``right`` zero columns on the left, nothing cut off (``down`` rows, ``right`` columns larger),
    so the net sees the image's bottom and right edges where the unshifted net sees them."""
    return F.pad(x, (right, 0, down, 0))


def same_size(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The coarse maps of the shifts brought to the largest one's size: a shift's map is a row or
    column short where its input (larger by the shift) is not, at samples past the image's bottom
    / right edge that no copy computes. Zeros there, which the upsampling adds as nothing: on a
    trunk whose maps stop at the edge (ResNet's same geometry: the last sample up to ``u - 1``
    pixels before it) the last pixels fade from the last sample computed, as a head's own
    upsampling fades past its last sample (a repeat of the copy's last row, a sample ``s`` pixels
    back, used to be drawn into them)."""
    h, w = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
    return [F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2])) for m in maps]


def interlace(maps: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """One map of ``f`` times the rows and columns from the coarse maps of the ``f * f`` shifts,
    ``maps[by * f + bx]`` for the input moved ``by`` steps down and ``bx`` right: its pixel
    ``(j, i)`` goes to ``(f * j + f - 1 - by, f * i + f - 1 - bx)``."""
    if len(maps) != f * f:
        raise ValueError(f"interlacing f={f} needs {f * f} maps, got {len(maps)}")
    n, c, h, w = maps[0].shape
    grid = torch.stack(list(maps)).reshape(f, f, n, c, h, w).flip(0, 1)
    return grid.permute(2, 3, 4, 0, 5, 1).reshape(n, c, h * f, w * f)


def stitched_grid(grid: tuple[int, float], f: int) -> tuple[int, float]:
    """(stride, origin) of the interlaced map of coarse maps on ``grid`` (stride, origin)."""
    stride, origin = grid
    step = stride // f
    return step, origin - (f - 1) * step


def upsample(
    score: torch.Tensor, grid: tuple[int, float], geometry: str, height: int, width: int
) -> torch.Tensor:
    """A fixed bilinear upsampling of factor ``grid[0]`` of a map on ``grid``, cropped to the
    input where the coordinate map says; padded as ``geometry`` pads it, or less where the crop
    needs the pixels that padding trims."""
    factor, origin = grid
    kernel = upsampling_kernel(factor, origin)  # odd on whole pixels, as the heads' own
    start = output_offset(factor, origin, 0, "the stitched output crop", kernel)  # padding 0
    full_h, full_w = ((n - 1) * factor + kernel for n in score.shape[-2:])
    fits = min(start, full_h - start - height, full_w - start - width)
    padding = max(0, min(Upsampling.plan(factor, origin, (1, 0.0), geometry, "").padding, fits))
    weight = bilinear_weight(score.shape[1], kernel, score.dtype, score.device)
    up = F.conv_transpose2d(score, weight, stride=factor, padding=padding)
    return crop(up, start - padding, height, width)


def forwards(net: SegmentationNet, f: int) -> int:
    """The forwards shift-and-stitch runs per input: ``f * f`` per stream."""
    return f * f * (len(net.streams) if isinstance(net, LateFusionFCN) else 1)


def ticker(progress: Progress, total: int) -> Callable[[], None]:
    """What to call after each of ``total`` forwards to tell ``progress`` (None: nothing)."""
    if progress is None:
        return lambda: None
    if hasattr(progress, "update"):
        return lambda: progress.update(1)
    done = itertools.count(1)
    return lambda: progress(next(done), total)


def stitch_fcn(
    net: FCN, x: torch.Tensor, f: int, progress: Progress = None
) -> dict[str, torch.Tensor]:
    """Shift-and-stitch of one FCN: per head, the scores (N, classes, H, W) at the input's size;
    ``progress`` hears of each of the ``f * f`` forwards."""
    check_factor(f, net)
    return _stitch_fcn(net, x, f, ticker(progress, f * f))


def _stitch_fcn(
    net: FCN, x: torch.Tensor, f: int, tick: Callable[[], None]
) -> dict[str, torch.Tensor]:
    (stride,) = output_strides(net)
    step, height, width = stride // f, x.shape[-2], x.shape[-1]
    coarse: dict[str, list[torch.Tensor]] = {name: [] for name in net.heads}
    for by in range(f):
        for bx in range(f):
            for name, score in net.coarse(shift(x, by * step, bx * step)).items():
                coarse[name].append(score)
            tick()

    def stitched(name: str, head: torch.nn.Module) -> torch.Tensor:
        if f == 1 and not isinstance(head, FCNHead):  # torchvision's: its own interpolation
            return head.upsample(coarse[name][0], height, width)
        grid = stitched_grid(head.grid, f)
        return upsample(interlace(same_size(coarse[name]), f), grid, head.geometry, height, width)

    return {name: stitched(name, head) for name, head in net.heads.items()}


def shift_and_stitch(
    net: SegmentationNet, x: torch.Tensor, f: int, progress: Progress = None
) -> dict[str, torch.Tensor]:
    """``net``'s scores per head for ``x`` by shift-and-stitch with ``f`` shifts per axis;
    ``progress`` hears of each of the :func:`forwards` (a tqdm-like object or a callable
    ``progress(done, total)``; None: nothing)."""
    check_factor(f, net)  # also refuses a net without coarse score maps, naming what it needs
    tick = ticker(progress, forwards(net, f))
    if isinstance(net, LateFusionFCN):
        parts = net.split(x)
        return net.average(
            [_stitch_fcn(s, p, f, tick) for s, p in zip(net.streams.values(), parts, strict=True)]
        )
    return _stitch_fcn(net, x, f, tick)


class ShiftAndStitch(SegmentationNet):
    """A net whose forward is shift-and-stitch with ``f`` shifts per axis, with the ``spec`` and
    ``normalization`` of ``net``: put it in place of ``module.model`` to evaluate or predict.
    ``progress`` (settable later): told of each forward, as :func:`shift_and_stitch` tells it."""

    def __init__(
        self, net: SegmentationNet, f: int, *, setting: str = SETTING, progress: Progress = None
    ) -> None:
        super().__init__()
        if isinstance(net, ShiftAndStitch):
            raise ValueError(f"the net is already shift-and-stitched (f={net.f})")
        self.f = check_factor(f, net, setting)
        self.net = net
        self.progress = progress
        self.spec = net.spec
        self.normalization = net.normalization
        self.training = net.training  # wrapped as it is (train() would set every layer alike)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return shift_and_stitch(self.net, x, self.f, self.progress)

    @property
    def forwards(self) -> int:
        """The net's forwards per input (:func:`forwards`)."""
        return forwards(self.net, self.f)

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
    """``net`` for ``f = 1`` (the plain forward), else ``ShiftAndStitch(net, f)``."""
    return net if check_factor(f, net, setting) == 1 else ShiftAndStitch(net, f, setting=setting)
