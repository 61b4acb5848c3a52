"""Bilinear upsampling kernels for the FCN's transposed convolutions (paper, section 3.3;
docs/PAPER.md, Network geometry)."""

from __future__ import annotations

import torch
from torch import nn


def bilinear_kernel(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference's 2-D bilinear interpolation kernel of ``size`` x ``size`` (its
    ``upsample_filt``): for a factor ``f``, the tent of half-width ``f`` sampled at whole (size
    ``2f - 1``, centre ``f - 1``) or half (size ``2f``, centre ``f - 0.5``) distances."""
    if size < 1:
        raise ValueError(f"bilinear kernel size must be >= 1, got {size}")
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    return torch.outer(filt, filt).to(dtype)


def bilinear_weight(
    channels: int, size: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """A bilinear ``ConvTranspose2d`` weight: :func:`bilinear_kernel` on the channel diagonal."""
    eye = torch.eye(channels, dtype=dtype, device=device)
    return eye[:, :, None, None] * bilinear_kernel(size, dtype).to(device)[None, None]


def upsampler(
    channels: int,
    factor: int,
    *,
    kernel: int | None = None,
    padding: int = 0,
    output_padding: int = 0,
    learnable: bool,
) -> nn.ConvTranspose2d:
    """A ``ConvTranspose2d`` of stride ``factor``, no bias, bilinear initialised; ``kernel``:
    ``2 * factor`` (the default, for a map on half pixels of the output grid) or ``2 * factor - 1``
    (for a map on its whole pixels; docs/TRUNKS.md, Geometry and the half pixel)."""
    kernel = 2 * factor if kernel is None else kernel
    if kernel not in (2 * factor, 2 * factor - 1):
        raise ValueError(
            f"a factor-{factor} upsampling has a kernel {2 * factor} or {2 * factor - 1}, got {kernel}"
        )
    up = nn.ConvTranspose2d(
        channels, channels, kernel_size=kernel, stride=factor, padding=padding,
        output_padding=output_padding, bias=False,
    )  # fmt: skip
    reset_bilinear_(up)
    up.weight.requires_grad_(learnable)
    return up


@torch.no_grad()
def reset_bilinear_(up: nn.ConvTranspose2d) -> nn.ConvTranspose2d:
    """Set a square-kernel transposed convolution's weight to the diagonal bilinear kernel."""
    cin, cout, kh, kw = up.weight.shape
    if kh != kw or cin != cout or up.groups != 1:
        raise ValueError(
            f"bilinear init needs a square kernel and in == out channels, got {tuple(up.weight.shape)}"
        )
    up.weight.copy_(bilinear_weight(cin, kh, up.weight.dtype, up.weight.device))
    return up
