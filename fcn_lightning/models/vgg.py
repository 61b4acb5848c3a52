"""VGG16 trunk: torchvision's VGG16 feature layers (its keys), fc6 (7x7) / fc7 (1x1) as
convolutions (paper, section 3.1; docs/TRUNKS.md, Made convolutional)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from .trunk import (
    Trunk,
    check_trunk_args,
    convolutionalized,
    load_mapped_state_dict,
    scaled,
    tap_of,
)


class VGG16Trunk(Trunk):
    """VGG16 conv1_1 .. fc7; ``forward`` returns the taps pool3, pool4 and final (fc7).

    ``paper``: conv1_1 padding 100, fc6 unpadded; ``same``: conv1_1 padding 1, fc6 padded by 3;
    ceil-mode pooling in both (docs/PAPER.md, Network geometry).
    """

    def __init__(
        self,
        *,
        width: float = 1.0,
        batch_norm: bool = False,
        geometry: str = "paper",
        in_channels: int = 3,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_trunk_args(geometry, width, in_channels)
        self.geometry, self.backbone = geometry, "vgg16_bn" if batch_norm else "vgg16"
        cfg = [v if v == "M" else scaled(v, width) for v in cfgs["D"]]
        self.features = make_layers(cfg, batch_norm=batch_norm)
        first = self.features[0]
        self.features[0] = nn.Conv2d(
            in_channels, first.out_channels, 3, padding=100 if geometry == "paper" else 1
        )
        pools = []
        for i, layer in enumerate(self.features):
            if isinstance(layer, nn.MaxPool2d):
                layer.ceil_mode = True  # Caffe rounds pooling up
                pools.append(i)
        c5, cfc = scaled(512, width), scaled(4096, width)
        self.fc6 = nn.Conv2d(c5, cfc, 7, padding=0 if geometry == "paper" else 3)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)  # element-wise, like Caffe's dropout
        self.fc7 = nn.Conv2d(cfc, cfc, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.tap_at = {pools[2]: "pool3", pools[3]: "pool4"}  # feature index -> tap
        self.taps = {
            "pool3": tap_of(scaled(256, width), self.features[: pools[2] + 1]),
            "pool4": tap_of(scaled(512, width), self.features[: pools[3] + 1]),
            "final": tap_of(cfc, [*self.features, self.fc6, self.fc7]),
        }
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @property
    def conv1_1(self) -> nn.Conv2d:
        return self.features[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.tap_at:
                out[self.tap_at[i]] = x
        x = self.drop6(self.relu6(self.fc6(x)))
        out["final"] = self.drop7(self.relu7(self.fc7(x)))
        return out

    @torch.no_grad()
    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision VGG16 state dict, convolutionalizing classifier.0/3 into fc6/fc7."""
        mapped = convolutionalized(state, "classifier.0.", "classifier.3.", 7)
        load_mapped_state_dict(self, mapped, what="VGG16", first_conv="features.0.weight")
