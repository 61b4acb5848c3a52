"""Input normalisation: what pretrained weights expect of an RGB image in 0..1, both ways.

The weights and their normalisation travel together (as torchvision's weight enums do):
``imagenet`` is torchvision's ImageNet VGG16, fed RGB in 0..1 normalised by the ImageNet mean
and std; ``caffe`` is the authors' Caffe VGG16 (converted to a state dict), fed BGR 0..255 minus
the Caffe mean (docs/PAPER.md, "Input statistics"). The data transforms apply it, the image
panels undo it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation of an RGB 0..1 image tensor.

    ``x' = (x[order] * scale - mean) / std``; ``bgr`` reverses the channel order first.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0
    bgr: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def unit_mean(self) -> list[float]:
        """The mean on the 0..1 scale: ``(x * scale - mean) / std == (x - mean/scale) / (std/scale)``."""
        return [m / self.scale for m in self.mean]

    @property
    def unit_std(self) -> list[float]:
        return [s / self.scale for s in self.std]

    def to_rgb(self, image: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of a (3, H, W) model input: uint8 RGB for display."""
        x = image[:3].float()
        mean = torch.tensor(self.unit_mean).view(3, 1, 1)
        std = torch.tensor(self.unit_std).view(3, 1, 1)
        rgb = x * std + mean
        if self.bgr:
            rgb = rgb.flip(0)
        return rgb.clamp(0, 1).mul(255).to(torch.uint8)


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# The reference code's BGR mean on 0..255 pixel values (docs/PAPER.md, "Input statistics").
CAFFE = Normalization(
    mean=(104.00699, 116.66877, 122.67891), std=(1.0, 1.0, 1.0), scale=255.0, bgr=True
)
NORMALIZATIONS = {"imagenet": IMAGENET, "caffe": CAFFE}


def get_normalization(name: str | Normalization | dict) -> Normalization:
    """A normalisation by name (``imagenet`` | ``caffe``), or from its fields."""
    if isinstance(name, Normalization):
        return name
    if isinstance(name, dict):
        return Normalization(**{k: tuple(v) if isinstance(v, list) else v for k, v in name.items()})
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown normalization {name!r}; expected one of {sorted(NORMALIZATIONS)}"
        ) from None
