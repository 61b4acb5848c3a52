"""ResNet-50 / 101 trunks: torchvision's ResNet layers (its keys, its ``_make_layer``), with
strides turned into dilation for an output stride of 16 or 8 as its ``replace_stride_with_dilation``
does (docs/TRUNKS.md, ResNet)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from .trunk import Trunk, check_trunk_args, load_mapped_state_dict, scaled, tap_of

BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}  # bottlenecks per layer1..4
# output stride -> layer2..4 dilated instead of strided (torchvision's replace_stride_with_dilation)
DILATE = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
OUTPUT_STRIDES = tuple(DILATE)
# the first convolution's padding: the reference's margin of 100, or torchvision's 3
_CONV1_PADDING = {"paper": 100, "same": 3}


def _paths(block: nn.Module) -> nn.Module | tuple:
    """A bottleneck as its two parallel paths (for :func:`tap_of`), other layers as they are."""
    if isinstance(block, Bottleneck):
        return ([block.conv1, block.conv2, block.conv3], [block.downsample or nn.Identity()])
    return block


class ResNetTrunk(Trunk):
    """ResNet conv1 .. layer4; ``forward`` returns the taps pool3 (layer2, stride 8), pool4
    (layer3, stride 16) and final (layer4, stride 32, then dropout); at ``output_stride`` 16
    layer4, at 8 layer3 and layer4 too, keep the stride of the layer before and are dilated.

    Every tap lies on whole input pixels (pixel ``i`` at ``stride * i`` in the same geometry), so
    the FCN heads upsample it with odd kernels (docs/TRUNKS.md, Geometry and the half pixel)."""

    _make_layer = ResNet._make_layer  # reads inplanes, dilation, groups, base_width, _norm_layer

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        width: float = 1.0,
        geometry: str = "paper",
        in_channels: int = 3,
        dropout: float = 0.5,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        check_trunk_args(geometry, width, in_channels)
        if backbone not in BLOCKS:
            raise ValueError(f"ResNet backbone must be one of {tuple(BLOCKS)}, got {backbone!r}")
        if output_stride not in DILATE:
            raise ValueError(
                f"output_stride must be one of {OUTPUT_STRIDES} for {backbone}, got {output_stride!r}"
            )
        self.geometry, self.backbone, self.output_stride = geometry, backbone, output_stride
        self._norm_layer, self.groups, self.base_width, self.dilation = nn.BatchNorm2d, 1, 64, 1
        self.inplanes = scaled(64, width)
        self.conv1 = nn.Conv2d(
            in_channels, self.inplanes, 7, 2, padding=_CONV1_PADDING[geometry], bias=False
        )
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        blocks, dilate = BLOCKS[backbone], DILATE[output_stride]
        self.layer1 = self._make_layer(Bottleneck, scaled(64, width), blocks[0])
        self.layer2 = self._make_layer(Bottleneck, scaled(128, width), blocks[1], 2, dilate[0])
        self.layer3 = self._make_layer(Bottleneck, scaled(256, width), blocks[2], 2, dilate[1])
        self.layer4 = self._make_layer(Bottleneck, scaled(512, width), blocks[3], 2, dilate[2])
        self.dropout = nn.Dropout(dropout)
        stem = [self.conv1, self.maxpool]
        upto = [stem]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            upto.append([*upto[-1], *map(_paths, layer)])
        self.taps = {
            name: tap_of(layer[-1].conv3.out_channels, path)
            for name, layer, path in zip(
                ("pool3", "pool4", "final"), (self.layer2, self.layer3, self.layer4), upto[2:],
                strict=True,
            )
        }  # fmt: skip
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        pool3 = self.layer2(x)
        pool4 = self.layer3(pool3)
        return {"pool3": pool3, "pool4": pool4, "final": self.dropout(self.layer4(pool4))}

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet state dict; its 1000-way ``fc`` is left out."""
        mapped = {k: v for k, v in state.items() if not k.startswith("fc.")}
        load_mapped_state_dict(self, mapped, what=self.backbone, first_conv="conv1.weight")
