"""AlexNet trunk for the FCN (paper, Table 1: FCN-AlexNet): torchvision's AlexNet feature
layers, its classifier's fc6 / fc7 as convolutions (fc6 6x6 over pool5's 256 channels, fc7 1x1).

Keys follow torchvision (``features.N.*``) so that its ImageNet state dict loads as it is. The
1000-way fc8 is not part of the trunk (the FCN's zero-initialised score_fr takes its place);
:func:`alexnet_fc8_as_conv` gives it as a 1x1 convolution, to show the convolutionalised net
computes torchvision's classifier. torchvision's AlexNet is not the Caffe AlexNet of the paper
(64 / 192 filters in conv1 / conv2, not 96 / 256; no LRN; no filter groups): docs/TRUNKS.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from .trunk import (
    HALF_PIXEL,
    Trunk,
    check_trunk_args,
    half_pixel_resampler,
    load_mapped_state_dict,
    scaled,
    tap_of,
)
from .weights import load_trunk_state_dict

# (conv1 padding, padding of each 3x3 pooling, fc6's zero padding left/top and right/bottom)
_GEOMETRY = {
    "paper": (100, 0, (0, 0)),  # the reference's FCN-AlexNet: conv1 padded by 100, fc6 valid
    "same": (6, 1, (2, 3)),  # pixel i of a stride-s tap at s * i + s / 2 - 1 (+ HALF_PIXEL)
}


def _torchvision_features() -> nn.Sequential:
    """torchvision's AlexNet feature layers (on the meta device: their shapes, no weights)."""
    with torch.device("meta"):
        return torchvision.models.alexnet(weights=None).features


def alexnet_fc8_as_conv(state: dict[str, torch.Tensor]) -> nn.Conv2d:
    """torchvision's 1000-way classifier (``classifier.6``) as the 1x1 convolution that follows
    fc7 in the convolutionalised net (the FCN discards it)."""
    weight, bias = state["classifier.6.weight"], state["classifier.6.bias"]
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.copy_(bias)
    return conv


class AlexNetTrunk(Trunk):
    """AlexNet conv1 .. fc7; ``forward`` returns the taps pool3 (its pool1, stride 8), pool4 (its
    pool2, stride 16) and final (fc7 after ReLU and dropout, stride 32).

    ``geometry="paper"``: conv1 padding 100, ceil-mode pooling, fc6 unpadded, as the
    reference's FCN-AlexNet. ``geometry="same"``: conv1 padding 6, each pooling padded by 1, fc6
    zero-padded by 2 before and 3 after, so every tap covers the input with no margin and every
    crop offset is 0.

    AlexNet's kernels are all odd, so its maps sit on whole pixels: the taps are declared
    :data:`HALF_PIXEL` further on (the output is registered to within half a pixel), and the
    skip taps (pool1, pool2) are resampled half their own pixel further on
    (:func:`half_pixel_resampler`), where the heads' 2x upsamplings expect them.
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
        for layer in _torchvision_features():
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
        self.align3, self.align4 = half_pixel_resampler(), half_pixel_resampler()
        (p1, c1), (p2, c2) = pools[:2]
        self.tap_at = {p1: "pool3", p2: "pool4"}  # feature index -> tap
        self.taps = {
            "pool3": tap_of(c1, [*self.features[: p1 + 1], self.align3], shift=HALF_PIXEL),
            "pool4": tap_of(c2, [*self.features[: p2 + 1], self.align4], shift=HALF_PIXEL),
            "final": tap_of(cfc, [*self.features, self.pad6, self.fc6, self.fc7], shift=HALF_PIXEL),
        }

    @property
    def conv1(self) -> nn.Conv2d:
        return self.features[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.tap_at:
                tap = self.tap_at[i]
                out[tap] = (self.align3 if tap == "pool3" else self.align4)(x)
        x = self.drop6(self.relu6(self.fc6(self.pad6(x))))
        out["final"] = self.drop7(self.relu7(self.fc7(x)))
        return out

    def load_pretrained(self, source: str | Path, *, progress: bool = True) -> None:
        """Load ``"imagenet"`` (torchvision's AlexNet_Weights.IMAGENET1K_V1) or a
        torchvision-layout AlexNet file."""
        self.load_torchvision_state_dict(
            load_trunk_state_dict(source, "alexnet", progress=progress)
        )

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision AlexNet state dict, convolutionalising classifier.1 / classifier.4
        into fc6 (6x6) / fc7 (1x1); classifier.6 (the 1000-way fc8) is left out."""
        mapped: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith("features."):
                mapped[key] = value
            elif key.startswith("classifier.1."):
                mapped["fc6." + key.split(".")[-1]] = value
            elif key.startswith("classifier.4."):
                mapped["fc7." + key.split(".")[-1]] = value
        if "fc6.weight" in mapped:
            w = mapped["fc6.weight"]
            mapped["fc6.weight"] = w.reshape(w.shape[0], -1, 6, 6)
        if "fc7.weight" in mapped:
            mapped["fc7.weight"] = mapped["fc7.weight"].reshape(*mapped["fc7.weight"].shape, 1, 1)
        load_mapped_state_dict(self, mapped, what="AlexNet", first_conv="features.0.weight")
