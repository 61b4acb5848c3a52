"""Input normalisation, both ways: ``imagenet`` (torchvision's weights) or ``caffe`` (the
authors' weights: 0..255 minus the dataset's mean, photos as BGR), resolved per image group;
a depth channel's mean log depth (docs/PAPER.md, "Input statistics")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation of a 3-channel image in 0..1:
    ``x' = (x[order] * scale - mean) / std``; ``bgr`` reverses the channel order first."""

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

    def describe(self) -> str:
        """In words, for messages: ``imagenet``, or the mean (and std) on the 0..255 scale."""
        if self == IMAGENET:
            return "imagenet (RGB 0..1, ImageNet mean and std)"
        order = "channels reversed (RGB -> BGR), " if self.bgr else "channels as stored, "
        std = "" if set(self.std) == {1.0} else f" / std {list(self.std)}"
        return f"{order}0..{self.scale:g} minus mean {list(self.mean)}{std}"

    def to_rgb(self, image: torch.Tensor) -> torch.Tensor:
        """Undo it on a (3, H, W) image group, for display: uint8 in the order the input had
        (RGB for a photo, HHA as stored)."""
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (self.unit_mean, self.unit_std))
        rgb = image[:3].float() * std + mean
        return (rgb.flip(0) if self.bgr else rgb).clamp(0, 1).mul(255).to(torch.uint8)


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

# The reference code's means on 0..255 values by (statistics, kind), in the order the network
# sees the channels (B, G, R for colour; HHA as stored). Folders and synthetic scenes use VOC's.
CAFFE_MEANS: dict[tuple[str, str], tuple[float, float, float]] = {
    ("voc", "rgb"): (104.00699, 116.66877, 122.67891),
    ("nyud", "rgb"): (116.190, 97.203, 92.318),
    ("nyud", "hha"): (132.431, 94.076, 118.477),
    ("siftflow", "rgb"): (114.578, 115.294, 108.353),
}
# Channels reversed under ``caffe``: a photo's (Caffe's BGR), not an HHA image's.
CAFFE_BGR = {"rgb": True, "hha": False}
# The mean of log(depth in mm) that the reference subtracts from a depth channel (any scheme).
LOG_DEPTH_MEANS = {"nyud": 7.844}


def caffe_normalization(stats: str = "voc", kind: str = "rgb") -> Normalization:
    """The ``caffe`` scheme for a ``kind`` input (rgb | hha) of ``stats`` data."""
    try:
        mean = CAFFE_MEANS[(stats, kind)]
    except KeyError:
        known = ", ".join(f"{k} of {s}" for s, k in CAFFE_MEANS)
        raise ValueError(
            f"normalization=caffe has no mean for {kind} input of {stats!r} data (known: {known})"
        ) from None
    return Normalization(mean=mean, std=(1.0, 1.0, 1.0), scale=255.0, bgr=CAFFE_BGR[kind])


# Caffe's ImageNet VGG16 on a photo: the VOC mean (what ``caffe`` means without a dataset).
CAFFE = caffe_normalization("voc", "rgb")
NORMALIZATIONS = {"imagenet": IMAGENET, "caffe": CAFFE}


def get_normalization(name: str | Normalization | Mapping[str, Any]) -> Normalization:
    """A normalisation by scheme name (``imagenet`` | ``caffe``, for a photo with VOC's
    statistics), or from its fields."""
    if isinstance(name, Normalization):
        return name
    if isinstance(name, Mapping):
        fields = {
            k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
            for k, v in name.items()
        }
        return Normalization(**fields)
    try:
        return NORMALIZATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown normalization {name!r}; expected one of {sorted(NORMALIZATIONS)}"
        ) from None


def normalization_for(
    setting: str | Normalization | Mapping[str, Any], kind: str = "rgb", stats: str = "voc"
) -> Normalization:
    """One image group's normalisation: a scheme name resolved for its ``kind`` and ``stats``;
    a normalisation (or its fields) as it is."""
    if setting == "caffe":
        return caffe_normalization(stats, kind)
    return get_normalization(setting)


def group_normalizations(
    setting: Any, groups: Sequence[tuple[str, str]]
) -> tuple[Normalization, ...]:
    """One normalisation per image group (``groups``: each one's (kind, stats)); ``setting``: a
    scheme name, one normalisation for all, or a list, one per group (as checkpoints record)."""
    if isinstance(setting, list | tuple):
        if len(setting) != len(groups):
            raise ValueError(
                f"{len(setting)} normalisations given for an input of {len(groups)} image "
                f"group(s) ({', '.join(k for k, _ in groups) or 'none'})"
            )
        return tuple(get_normalization(s) for s in setting)
    return tuple(normalization_for(setting, kind, stats) for kind, stats in groups)


# trunks with torchvision's ImageNet weights alone
TORCHVISION_ONLY = ("alexnet", "googlenet", "resnet50", "resnet101")


def check_trunk_normalization(backbone: str, scheme: Any) -> None:
    """Refuse ``caffe`` for a trunk whose only weights are torchvision's (they expect RGB in 0..1
    minus ImageNet's mean, over its std: ``imagenet``)."""
    schemes = (
        list(scheme) if isinstance(scheme, Sequence) and not isinstance(scheme, str) else [scheme]
    )
    if "caffe" in [str(s) for s in schemes] and backbone in TORCHVISION_ONLY:
        raise ValueError(
            f"arch.normalization=caffe is for Caffe-converted VGG16 weights; arch.backbone="
            f"{backbone} has torchvision's ImageNet weights only, which expect "
            "arch.normalization=imagenet"
        )
