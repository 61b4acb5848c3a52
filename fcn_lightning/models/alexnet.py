"""AlexNet trunk (paper, Table 1): torchvision's AlexNet feature layers (its keys), fc6 (6x6) /
fc7 (1x1) as convolutions; fc8 is left to :func:`alexnet_fc8_as_conv`. Not the paper's Caffe
AlexNet: docs/TRUNKS.md."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from .trunk import (
    Trunk,
    check_trunk_args,
    convolutionalized,
    linear_as_conv,
    load_mapped_state_dict,
    scaled,
    tap_of,
)

# (conv1 padding, padding of each 3x3 pooling, fc6's zero padding left/top and right/bottom)
_GEOMETRY = {
    "paper": (100, 0, (0, 0)),  # the reference's FCN-AlexNet: conv1 padded by 100, fc6 valid
    "same": (6, 1, (2, 3)),  # pool1 at 8i - 1, pool2 at 16i - 1, fc7 at 32i + 15
}


def alexnet_fc8_as_conv(state: dict[str, torch.Tensor]) -> nn.Conv2d:
    """torchvision's 1000-way classifier (``classifier.6``) as the 1x1 convolution after fc7."""
    return linear_as_conv(state["classifier.6.weight"], state["classifier.6.bias"])


class AlexNetTrunk(Trunk):
    """AlexNet conv1 .. fc7; ``forward`` returns the taps pool3 (its pool1, stride 8), pool4 (its
    pool2, stride 16) and final (fc7 after ReLU and dropout, stride 32).

    Geometries (``_GEOMETRY``), and the taps on whole pixels that the heads upsample with odd
    kernels: docs/TRUNKS.md, Geometry and the half pixel.
    """

    def __init__(
        self,
        *,
        width: float = 1.0,
        geometry: str = "paper",
        in_channels: int = 3,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_trunk_args(geometry, width, in_channels)
        self.geometry, self.backbone = geometry, "alexnet"
        conv1_pad, pool_pad, fc6_pad = _GEOMETRY[geometry]
        layers: list[nn.Module] = []
        channels, pools = in_channels, []
        with torch.device("meta"):  # torchvision's layer shapes, no weights
            reference = torchvision.models.alexnet(weights=None).features
        for layer in reference:
            if isinstance(layer, nn.Conv2d):
                out = scaled(layer.out_channels, width)
                pad = conv1_pad if not layers else layer.padding
                layers.append(nn.Conv2d(channels, out, layer.kernel_size, layer.stride, pad))
                channels = out
            elif isinstance(layer, nn.MaxPool2d):  # Caffe rounds pooling up
                pools.append((len(layers), channels))
                layers.append(
                    nn.MaxPool2d(layer.kernel_size, layer.stride, pool_pad, ceil_mode=True)
                )
            else:
                layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)  # PyTorch's default initialisation, as torchvision's
        cfc = scaled(4096, width)
        self.pad6 = nn.ZeroPad2d((fc6_pad[0], fc6_pad[1], fc6_pad[0], fc6_pad[1]))
        self.fc6 = nn.Conv2d(channels, cfc, 6)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)  # element-wise, like Caffe's dropout
        self.fc7 = nn.Conv2d(cfc, cfc, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        (p1, c1), (p2, c2) = pools[:2]
        self.tap_at = {p1: "pool3", p2: "pool4"}  # feature index -> tap
        self.taps = {
            "pool3": tap_of(c1, self.features[: p1 + 1]),
            "pool4": tap_of(c2, self.features[: p2 + 1]),
            "final": tap_of(cfc, [*self.features, self.pad6, self.fc6, self.fc7]),
        }

    @property
    def conv1(self) -> nn.Conv2d:
        return self.features[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.tap_at:
                out[self.tap_at[i]] = x
        x = self.drop6(self.relu6(self.fc6(self.pad6(x))))
        out["final"] = self.drop7(self.relu7(self.fc7(x)))
        return out

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision AlexNet state dict, convolutionalising classifier.1 / classifier.4
        into fc6 (6x6) / fc7 (1x1); classifier.6 (the 1000-way fc8) is left out."""
        mapped = convolutionalized(state, "classifier.1.", "classifier.4.", 6)
        load_mapped_state_dict(self, mapped, what="AlexNet", first_conv="features.0.weight")
