"""Joint image/label transforms on torchvision.transforms.v2: labels are ``tv_tensors.Mask``
(resized with nearest interpolation, padded with the ignore index 255)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import query_size

from ..contract import IGNORE_INDEX
from ..normalization import Normalization, get_normalization

FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
# a normalisation: a scheme name, a Normalization or its fields; or one of them per image group
NormalizationSetting = str | Normalization | Mapping[str, Any] | Sequence[Any]


class RandomScale(v2.Transform):
    """Rescale image and label by one factor drawn uniformly from ``scale_range``; with
    ``short_side``, a factor of that size for the shorter side (torchvision's segmentation
    reference: 0.5-2.0 of 520) instead of the image's own."""

    def __init__(
        self, scale_range: Sequence[float] = (0.5, 2.0), short_side: int | None = None
    ) -> None:
        super().__init__()
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        if short_side is not None and short_side < 1:
            raise ValueError(f"data.scale_short_side must be a size >= 1, got {short_side}")
        self.scale_range, self.short_side = (lo, hi), short_side

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        s = float(torch.empty(1).uniform_(*self.scale_range))
        s *= self.short_side / min(h, w) if self.short_side else 1.0
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.resize(inpt, params["size"], antialias=True)


class NormalizeImage(v2.Transform):
    """Float image in 0..1 -> the model's normalisation, for the first ``image_groups`` groups of
    3 channels, each by its own (a list) or all by one; further channels (depth) pass."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(
        self, normalization: NormalizationSetting = "imagenet", image_groups: int = 1
    ) -> None:
        super().__init__()
        if isinstance(normalization, list | tuple):
            if len(normalization) != image_groups:
                raise ValueError(
                    f"{len(normalization)} normalisations for {image_groups} image group(s)"
                )
            self.norms = tuple(get_normalization(n) for n in normalization)
        else:
            self.norms = (get_normalization(normalization),) * image_groups
        self.image_groups = image_groups

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        x = inpt.as_subclass(torch.Tensor)
        parts = []
        for g, norm in enumerate(self.norms):
            image = x[..., 3 * g : 3 * g + 3, :, :]
            if norm.bgr:
                image = image.flip(-3)
            parts.append(TF.normalize(image, mean=norm.unit_mean, std=norm.unit_std))
        parts.append(x[..., 3 * self.image_groups :, :, :])
        return tv_tensors.wrap(torch.cat(parts, dim=-3), like=inpt)


def train_transforms(
    *,
    crop_size: int | Sequence[int] | None,
    scale_range: Sequence[float] | None = (0.5, 2.0),
    scale_short_side: int | None = None,
    hflip: bool = True,
    normalization: NormalizationSetting = "imagenet",
    image_groups: int = 1,
) -> v2.Compose:
    """Random scale, random crop (padded with 0 / 255 when the image is smaller) and flip."""
    ops: list[v2.Transform] = []
    if scale_range is not None:
        ops.append(RandomScale(scale_range, scale_short_side))
    if crop_size:
        ops.append(v2.RandomCrop(crop_size, pad_if_needed=True, fill=FILL))
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += eval_transforms(normalization=normalization, image_groups=image_groups).transforms
    return v2.Compose(ops)


def eval_transforms(
    *, normalization: NormalizationSetting = "imagenet", image_groups: int = 1
) -> v2.Compose:
    """Whole images: only the dtype conversion (uint8 -> 0..1; float passes) and normalisation
    (one for every image group, or a list of them, one per group)."""
    to_float = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
    return v2.Compose([to_float, NormalizeImage(normalization, image_groups)])
