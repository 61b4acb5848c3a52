"""Pretrained trunk weights: torchvision's ImageNet classifiers, or a local state dict file
(docs/PAPER.md, Network geometry and Other trunks; docs/TRUNKS.md); the normalisation each
expects lives in :mod:`fcn_lightning.normalization`."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.models import (
    AlexNet_Weights,
    GoogLeNet_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    VGG16_BN_Weights,
    VGG16_Weights,
    WeightsEnum,
)

from ..checkpoints import load_weights_only
from ..errors import PretrainedWeightsUnavailable

# backbone -> torchvision's ImageNet weights, the key prefix its state dict always has, its name
TORCHVISION_WEIGHTS = {
    "vgg16": VGG16_Weights.IMAGENET1K_V1,
    "vgg16_bn": VGG16_BN_Weights.IMAGENET1K_V1,
    "alexnet": AlexNet_Weights.IMAGENET1K_V1,
    "googlenet": GoogLeNet_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,  # the ones torchvision's FCNs were trained from
    "resnet101": ResNet101_Weights.IMAGENET1K_V1,
}
_LAYOUT = {"vgg16": ("features.", "VGG16"), "vgg16_bn": ("features.", "VGG16-BN"),
           "alexnet": ("features.", "AlexNet"), "googlenet": ("conv1.", "GoogLeNet"),
           "resnet50": ("layer1.", "ResNet-50"), "resnet101": ("layer1.", "ResNet-101")}  # fmt: skip


def downloaded(
    weights: WeightsEnum, what: str, otherwise: str, *, progress: bool = True
) -> dict[str, torch.Tensor]:
    """``weights``' state dict through torchvision (cached in the torch hub folder); offline, a
    :class:`PretrainedWeightsUnavailable` naming the file, where to put it, and ``otherwise``."""
    try:
        return weights.get_state_dict(progress=progress)
    except Exception as err:  # URLError, socket errors, SSL errors, ... all mean "offline"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise PretrainedWeightsUnavailable(
            f"Could not download {what} from {weights.url} ({err}).\n"
            f"Either download that file on a machine with network access and put it at\n  {cache}\n"
            f"(torchvision then reads it from there), or {otherwise}"
        ) from err


def state_dict_file(path: Path, what: str, missing: str) -> dict[str, torch.Tensor]:
    """The state dict in a ``torch.save`` file, also where it is wrapped in a dict under
    ``state_dict`` or ``model`` (torchvision's reference scripts); ``missing``: the message for a
    file that is not there (``{path}`` filled in)."""
    if not path.is_file():
        raise FileNotFoundError(missing.format(path=path))
    obj = load_weights_only(path, what=what, archive=False)
    wrapped = next((k for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
    return obj[wrapped] if wrapped else obj


def load_trunk_state_dict(
    pretrained: str | Path, backbone: str = "vgg16", *, progress: bool = True
) -> dict[str, torch.Tensor]:
    """A torchvision-layout state dict of ``backbone``, from ``"imagenet"`` (torchvision's weights
    API, cached in the torch hub folder) or a local file (such a state dict, or a dict holding
    one under ``state_dict``)."""
    if backbone not in TORCHVISION_WEIGHTS:
        raise ValueError(f"no pretrained weights for backbone {backbone!r}")
    prefix, name = _LAYOUT[backbone]
    if str(pretrained) == "imagenet":
        scratch = (
            f"train this {name} from random weights (its batch norm lets it learn, slowly): "
            "arch.pretrained=null"
            if backbone.startswith("resnet")
            else "train from scratch as the quickstart does: recipe=scratch "
            "(conf/recipe/scratch.yaml: VGG16 with batch norm, AdamW, no ImageNet weights)"
        )
        return downloaded(
            TORCHVISION_WEIGHTS[backbone], f"the ImageNet {backbone} weights",
            f"pass the path of a local {name} state dict:\n  arch.pretrained=/path/to/{backbone}"
            f".pth\nor {scratch}", progress=progress,
        )  # fmt: skip
    path = Path(pretrained).expanduser()
    obj = state_dict_file(
        path, "arch.pretrained", "pretrained weights file not found: {path} (arch.pretrained must "
        f"be 'imagenet', null, or the path of a {name} state dict saved with torch.save)",
    )  # fmt: skip
    if not any(k.startswith(prefix) for k in obj):
        keys = list(obj)[:5]
        raise ValueError(
            f"{path} does not hold a torchvision-layout {name} state dict (keys starting "
            f"{prefix!r}, as torchvision's {backbone} has); found {keys}"
        )
    return obj
