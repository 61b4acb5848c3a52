"""Joint image/label transforms on torchvision.transforms.v2 and tv_tensors.

Images are ``tv_tensors.Image`` (uint8 until ``ToDtype``), labels ``tv_tensors.Mask``: v2 resizes
masks with nearest interpolation, and every padding fills labels with the ignore index 255.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import query_size

from ..models.weights import Normalization, get_normalization

IGNORE_INDEX = 255
FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


class RandomScale(v2.Transform):
    """Rescale image and label by one factor drawn uniformly from ``scale_range``."""

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0)) -> None:
        super().__init__()
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.scale_range = (lo, hi)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        s = float(torch.empty(1).uniform_(*self.scale_range))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.resize(inpt, params["size"], antialias=True)


class NormalizeImage(v2.Transform):
    """Float image in 0..1 -> the normalisation the model's weights expect (RGB or BGR)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, normalization: str | Normalization | dict = "imagenet") -> None:
        super().__init__()
        self.norm = get_normalization(normalization)
        n = self.norm
        # (x * scale - mean) / std == (x - mean / scale) / (std / scale)
        self.mean = [m / n.scale for m in n.mean]
        self.std = [s / n.scale for s in n.std]

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if self.norm.bgr:
            inpt = tv_tensors.wrap(inpt[..., [2, 1, 0, *range(3, inpt.shape[-3])], :, :], like=inpt)
        channels = inpt.shape[-3]
        mean = (self.mean + [0.0] * channels)[:channels]  # extra channels (depth, ...) pass as is
        std = (self.std + [1.0] * channels)[:channels]
        return TF.normalize(inpt, mean=mean, std=std)


def train_transforms(
    *,
    crop_size: int | Sequence[int] | None,
    scale_range: Sequence[float] | None = (0.5, 2.0),
    hflip: bool = True,
    normalization: str | Normalization | dict = "imagenet",
) -> v2.Compose:
    """Random scale, random crop (padded with 0 / 255 when the image is smaller) and flip."""
    ops: list[v2.Transform] = []
    if scale_range is not None:
        ops.append(RandomScale(scale_range))
    if crop_size:
        ops.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill=FILL))
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose([*ops, *eval_transforms(normalization=normalization).transforms])


def eval_transforms(*, normalization: str | Normalization | dict = "imagenet") -> v2.Compose:
    """Whole images: only the dtype conversion and normalisation."""
    return v2.Compose(
        [
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            NormalizeImage(normalization),
        ]
    )
