"""What every model of this package is: a :class:`SegmentationNet` built from an :class:`FCNSpec`.

Forward contract: ``model(x)`` with ``x`` of shape (N, C, H, W) returns a dict from head name
to logits of shape (N, classes, H, W); a single-head model has the one head ``SINGLE_HEAD``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ..contract import SINGLE_HEAD
from ..normalization import Normalization
from .trunk import GEOMETRIES
from .trunks import BACKBONES, DILATABLE, OUTPUT_STRIDES

# the paper's four, and torchvision's FCN head (a 3x3 conv + BN + ReLU + dropout before the score
# layer, bilinear interpolation to the input, an optional auxiliary head on the pool4 tap)
ARCHS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce", "fcn_torchvision")


@dataclass(frozen=True)
class FCNSpec:
    """What fixes a model's layers and their shapes; saved in its state dict (``_extra_state``)."""

    arch: str = "fcn8s"
    heads: tuple[tuple[str, int], ...] = ((SINGLE_HEAD, 21),)
    backbone: str = "vgg16"
    geometry: str = "paper"
    width: float = 1.0
    in_channels: int = 3
    output_stride: int = 32  # 16 or 8: the trunk dilated (DILATABLE trunks)
    aux: bool = False  # fcn_torchvision's auxiliary head on the pool4 tap

    def __post_init__(self) -> None:
        for field, known in (("arch", ARCHS), ("backbone", BACKBONES), ("geometry", GEOMETRIES)):
            if getattr(self, field) not in known:
                raise ValueError(f"{field} must be one of {known}, got {getattr(self, field)!r}")
        if not self.heads:
            raise ValueError("a model needs at least one head")
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride must be one of {OUTPUT_STRIDES}, got {self.output_stride!r}"
            )
        if self.output_stride != 32 and self.backbone not in DILATABLE:
            raise ValueError(
                f"output_stride={self.output_stride} dilates a ResNet trunk ({', '.join(DILATABLE)}); "
                f"backbone {self.backbone!r} has output stride 32 only"
            )
        if self.aux and self.arch != "fcn_torchvision":
            raise ValueError(
                f"the auxiliary head is fcn_torchvision's; arch {self.arch!r} has none"
            )
        for name, n in self.heads:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"head {name!r} needs a positive number of classes, got {n!r}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heads"] = {name: n for name, n in self.heads}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FCNSpec:
        d = dict(d)
        d["heads"] = tuple((str(k), int(v)) for k, v in dict(d["heads"]).items())
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class SegmentationNet(nn.Module, ABC):
    """The interface the training code relies on: ``spec`` (how the model was built; in its
    state dict) and ``normalization`` (what its input must be normalised by)."""

    spec: FCNSpec
    normalization: Normalization

    @abstractmethod
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (N, classes, H, W) per head, for an input (N, ``spec.in_channels``, H, W)."""

    @abstractmethod
    def get_extra_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def set_extra_state(self, state: Any) -> None: ...

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.spec.heads)

    @property
    def anchor(self) -> str:
        """The key of the first parameter: where this model's keys start in a larger state dict."""
        return next(name for name, _ in self.named_parameters())

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split as the paper's solver treats them: weights and biases
        (docs/PAPER.md, Training recipes)."""
        groups: dict[str, list[nn.Parameter]] = {"weight": [], "bias": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups["bias" if name.endswith("bias") else "weight"].append(p)
        return groups
