"""Late fusion (the paper's RGB-HHA net, section 5): one FCN stream per channel group, scores
averaged (docs/PAPER.md, Datasets on disk)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .base import SegmentationNet
from .fcn import FCN
from .state import model_state_dict


class LateFusionFCN(SegmentationNet):
    """FCN streams that each see their own channels of one input (e.g. RGB = channels 0-2, HHA =
    3-5); the output is the average of the streams' score maps, per head."""

    def __init__(self, streams: Mapping[str, FCN]) -> None:
        super().__init__()
        if len(streams) < 2:
            raise ValueError("late fusion needs at least two streams")
        first_name, first = next(iter(streams.items()))
        for name, stream in streams.items():
            for field in ("arch", "heads", "geometry"):
                a, b = getattr(first.spec, field), getattr(stream.spec, field)
                if a != b:
                    raise ValueError(
                        f"late fusion streams disagree on {field}: {first_name!r} has {a!r}, {name!r} has {b!r}"
                    )
        self.streams = nn.ModuleDict(streams)
        self.channels = [s.spec.in_channels for s in streams.values()]
        self.spec = replace(first.spec, in_channels=sum(self.channels))
        self.normalization = first.normalization

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stream's channels of ``x``, in the streams' order."""
        if x.dim() != 4 or x.shape[1] != sum(self.channels):
            names = ", ".join(f"{n}: {c}" for n, c in zip(self.streams, self.channels, strict=True))
            raise ValueError(
                f"expected input (N, {sum(self.channels)}, H, W) ({names}), got {tuple(x.shape)}"
            )
        return list(torch.split(x, self.channels, dim=1))

    @staticmethod
    def average(outs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {head: torch.stack([o[head] for o in outs]).mean(0) for head in outs[0]}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = zip(self.streams.values(), self.split(x), strict=True)
        return self.average([stream(part) for stream, part in parts])

    def get_extra_state(self) -> dict[str, Any]:
        return {"fusion": "late", "streams": {n: s.spec.as_dict() for n, s in self.streams.items()}}

    def set_extra_state(self, state: Any) -> None:
        if state and list(state.get("streams", {})) != list(self.streams):
            raise ValueError(
                f"state dict was saved from streams {list(state.get('streams', {}))}, this model has {list(self.streams)}"
            )


def compose_late_fusion(sources: Mapping[str, Any]) -> LateFusionFCN:
    """A late-fusion net from trained single-modality FCNs (models, state dicts or checkpoints),
    as the paper composed RGB-HHA from its RGB and HHA nets: ``{"rgb": ..., "hha": ...}``."""
    return LateFusionFCN(
        {name: FCN.from_state_dict(model_state_dict(src)) for name, src in sources.items()}
    )
