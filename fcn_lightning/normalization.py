"""Input normalisation: what pretrained weights expect of an image in 0..1, both ways, and the
statistics of the authors' reference code per dataset and input kind (written only here; their
source is docs/PAPER.md, "Input statistics").

The weights and their normalisation travel together (as torchvision's weight enums do), as a
*scheme*:

- ``imagenet``: torchvision's ImageNet VGG16, fed RGB in 0..1 normalised by the ImageNet mean
  and std, the same for every dataset and every input kind (HHA too).
- ``caffe``: the authors' Caffe VGG16 (converted to a state dict), fed 0..255 minus the mean of
  the dataset, no std, as the reference code does: colour swapped to BGR, HHA (not a photo) in
  its file's own channel order.

A scheme is resolved per image group of an input (:func:`group_normalizations`): an RGB-HHA
input (two groups of 3 channels) under ``caffe`` subtracts the NYUDv2 colour mean from its colour
group and the HHA mean from its HHA group. The data transforms apply the result, the model
records it, the image panels undo it. A depth channel is not an image group: its reader
subtracts the mean log depth (:data:`LOG_DEPTH_MEANS`) under either scheme.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation of a 3-channel image tensor in 0..1.

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

    def describe(self) -> str:
        """In words, for messages: ``imagenet``, or the mean (and std) on the 0..255 scale."""
        if self == IMAGENET:
            return "imagenet (RGB 0..1, ImageNet mean and std)"
        order = "channels reversed (RGB -> BGR), " if self.bgr else "channels as stored, "
        std = "" if set(self.std) == {1.0} else f" / std {list(self.std)}"
        return f"{order}0..{self.scale:g} minus mean {list(self.mean)}{std}"

    def to_rgb(self, image: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of a (3, H, W) model input (an image group): uint8 in the
        channel order the input had before normalising (RGB for a photo; an HHA image in its
        own order), for display."""
        x = image[:3].float()
        mean = torch.tensor(self.unit_mean).view(3, 1, 1)
        std = torch.tensor(self.unit_std).view(3, 1, 1)
        rgb = x * std + mean
        if self.bgr:
            rgb = rgb.flip(0)
        return rgb.clamp(0, 1).mul(255).to(torch.uint8)


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

# --------------------------------------------------------------------------- the statistics
# The means the reference code subtracts (docs/PAPER.md, "Input statistics") on 0..255 values,
# by (whose statistics, input kind), in the order the network sees the channels: B, G, R for
# colour; the HHA file's own order for HHA. A user's folder and the synthetic scenes use VOC's.
CAFFE_MEANS: dict[tuple[str, str], tuple[float, float, float]] = {
    ("voc", "rgb"): (104.00699, 116.66877, 122.67891),
    ("nyud", "rgb"): (116.190, 97.203, 92.318),
    ("nyud", "hha"): (132.431, 94.076, 118.477),
    ("siftflow", "rgb"): (114.578, 115.294, 108.353),
}
# Whether an input kind is fed with its channels reversed under ``caffe``: a photo is (Caffe's
# BGR), an HHA image is not (its channels are disparity, height, angle, not colours).
CAFFE_BGR = {"rgb": True, "hha": False}
# The mean of log(depth in mm) that the reference subtracts from a depth channel (any scheme).
LOG_DEPTH_MEANS = {"nyud": 7.844}

SCHEMES = ("imagenet", "caffe")


def caffe_normalization(stats: str = "voc", kind: str = "rgb") -> Normalization:
    """The ``caffe`` scheme for a ``kind`` input (rgb | hha) with the statistics of ``stats``
    data (voc | nyud | siftflow)."""
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
        return Normalization(
            **{
                k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                for k, v in name.items()
            }
        )
    try:
        return NORMALIZATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown normalization {name!r}; expected one of {sorted(NORMALIZATIONS)}"
        ) from None


def normalization_for(
    setting: str | Normalization | Mapping[str, Any], kind: str = "rgb", stats: str = "voc"
) -> Normalization:
    """The normalisation of one image group: a scheme name resolved for a ``kind`` input with
    the statistics of ``stats`` data (``imagenet`` is the same for all); a normalisation given
    by its fields is taken as it is."""
    if setting == "caffe":
        return caffe_normalization(stats, kind)
    return get_normalization(setting)


def group_normalizations(
    setting: Any, groups: Sequence[tuple[str, str]]
) -> tuple[Normalization, ...]:
    """One normalisation per image group of an input, ``groups`` giving each group's (kind,
    stats) in input order. ``setting``: a scheme name (resolved per group), one normalisation
    (a :class:`Normalization` or its fields: every group alike), or a list of them, one per
    group (what a checkpoint records)."""
    if isinstance(setting, list | tuple):
        if len(setting) != len(groups):
            raise ValueError(
                f"{len(setting)} normalisations given for an input of {len(groups)} image "
                f"group(s) ({', '.join(k for k, _ in groups) or 'none'})"
            )
        return tuple(get_normalization(s) for s in setting)
    return tuple(normalization_for(setting, kind, stats) for kind, stats in groups)
