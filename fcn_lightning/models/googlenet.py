"""GoogLeNet trunk (paper, Table 1): torchvision's GoogLeNet (its keys) up to its last
Inception module, without the auxiliary classifiers and the final average pooling, then dropout;
``fc`` is left to :func:`googlenet_fc_as_conv`. Not the paper's Caffe GoogLeNet: docs/TRUNKS.md."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.googlenet import BasicConv2d, GoogLeNet, Inception

from .trunk import (
    Trunk,
    check_trunk_args,
    linear_as_conv,
    load_mapped_state_dict,
    scaled,
    tap_of,
)

STEM = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2")
INCEPTIONS = ("inception3a", "inception3b", "maxpool3", "inception4a", "inception4b",
              "inception4c", "inception4d", "inception4e", "maxpool4", "inception5a",
              "inception5b")  # fmt: skip
# conv1's padding and the paddings of maxpool1 .. maxpool4
_GEOMETRY = {
    "paper": (100, (0, 0, 0, 0)),  # the reference's margin: the first convolution padded by 100
    "same": (4, (1, 1, 0, 0)),  # inception3b at 8i - 1, 4e at 16i + 7, 5b at 32i + 15
}
# torchvision's GoogLeNet expects input normalised by (x - 0.5) / 0.5 where its weights came
# from; with transform_input it maps ImageNet-normalised input to that (GoogLeNet_Weights).
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _inception_channels(m: Inception) -> tuple[int, ...]:
    """(ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) of an Inception module."""
    convs = [m.branch1, *m.branch2, *m.branch3, m.branch4[1]]
    return tuple(c.conv.out_channels for c in convs)


def _branches(m: nn.Module) -> nn.Module | tuple[nn.Module, ...]:
    """An Inception module as its parallel branches (for :func:`tap_of`), other layers as they are."""
    if isinstance(m, Inception):
        return (m.branch1, m.branch2, m.branch3, m.branch4)
    return m


def googlenet_fc_as_conv(state: dict[str, torch.Tensor]) -> nn.Conv2d:
    """torchvision's 1000-way classifier (``fc``) as the 1x1 convolution on the ``final`` tap
    (averaged over a 224x224 input's 7x7 map: torchvision's logits)."""
    return linear_as_conv(state["fc.weight"], state["fc.bias"])


class GoogLeNetTrunk(Trunk):
    """GoogLeNet conv1 .. inception5b; ``forward`` returns the taps pool3 (inception3b, stride
    8), pool4 (inception4e, stride 16) and final (inception5b and dropout, stride 32).

    Geometries (``_GEOMETRY``), and the taps on whole pixels that the heads upsample with odd
    kernels (but for the 2x2 maxpool4's step): docs/TRUNKS.md, Geometry and the half pixel. ``transform_input`` (as torchvision's pretrained GoogLeNet) maps ImageNet-normalised
    RGB to the (x - 0.5) / 0.5 its weights were trained on.
    """

    def __init__(
        self,
        *,
        width: float = 1.0,
        geometry: str = "paper",
        in_channels: int = 3,
        dropout: float = 0.5,
        transform_input: bool = True,
    ) -> None:
        super().__init__()
        check_trunk_args(geometry, width, in_channels)
        self.geometry, self.backbone, self.transform_input = geometry, "googlenet", transform_input
        conv1_pad, pool_pads = _GEOMETRY[geometry]
        with torch.device("meta"):  # torchvision's layer shapes, no weights
            ref, pools = GoogLeNet(aux_logits=False, init_weights=False), iter(pool_pads)
        channels, outputs = in_channels, {}
        for name in STEM + INCEPTIONS:
            layer = getattr(ref, name)
            if isinstance(layer, nn.MaxPool2d):
                layer = nn.MaxPool2d(layer.kernel_size, layer.stride, next(pools), ceil_mode=True)
            elif isinstance(layer, BasicConv2d):
                c = layer.conv
                pad = conv1_pad if name == "conv1" else c.padding
                out = scaled(c.out_channels, width)
                layer = BasicConv2d(
                    channels, out, kernel_size=c.kernel_size, stride=c.stride, padding=pad
                )
                channels = out
            else:
                cfg = [scaled(c, width) for c in _inception_channels(layer)]
                layer = Inception(channels, *cfg)
                channels = cfg[0] + cfg[2] + cfg[4] + cfg[5]  # the branches' concatenation
            setattr(self, name, layer)
            outputs[name] = channels
        self.dropout = nn.Dropout(dropout)
        layers = [_branches(getattr(self, name)) for name in STEM + INCEPTIONS]
        upto = {name: layers[: (STEM + INCEPTIONS).index(name) + 1] for name in INCEPTIONS}
        self.taps = {
            "pool3": tap_of(outputs["inception3b"], upto["inception3b"]),
            "pool4": tap_of(outputs["inception4e"], upto["inception4e"]),
            "final": tap_of(outputs["inception5b"], upto["inception5b"]),
        }
        for m in self.modules():  # torchvision's GoogLeNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's ``transform_input`` on the first three channels (the rest as they are)."""
        if not self.transform_input or x.shape[1] < 3:
            return x
        rgb = [
            x[:, c : c + 1] * (std / 0.5) + (mean - 0.5) / 0.5
            for c, (mean, std) in enumerate(zip(_IMAGENET_MEAN, _IMAGENET_STD, strict=True))
        ]
        return torch.cat([*rgb, x[:, 3:]], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.transform(x)
        out: dict[str, torch.Tensor] = {}
        for name in STEM + INCEPTIONS:
            x = getattr(self, name)(x)
            if name == "inception3b":
                out["pool3"] = x
            elif name == "inception4e":
                out["pool4"] = x
        out["final"] = self.dropout(x)
        return out

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision GoogLeNet state dict; its auxiliary classifiers (``aux1``,
        ``aux2``) and its 1000-way ``fc`` are left out."""
        keep = tuple(f"{name}." for name in STEM + INCEPTIONS)
        mapped = {k: v for k, v in state.items() if k.startswith(keep)}
        load_mapped_state_dict(self, mapped, what="GoogLeNet", first_conv="conv1.conv.weight")
