"""Pretrained VGG16 trunk weights (docs/PAPER.md, Network geometry).

The input normalisation each set of weights expects lives in :mod:`fcn_lightning.normalization`;
it is re-exported here for older imports.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.models import VGG16_BN_Weights, VGG16_Weights

from ..checkpoints import load_weights_only
from ..normalization import CAFFE, IMAGENET, Normalization, get_normalization  # noqa: F401


class PretrainedWeightsUnavailable(RuntimeError):
    """The ImageNet weights could be neither downloaded nor found on disk."""


def _torchvision_weights(backbone: str):
    return VGG16_BN_Weights.IMAGENET1K_V1 if backbone == "vgg16_bn" else VGG16_Weights.IMAGENET1K_V1


def load_trunk_state_dict(
    pretrained: str | Path, backbone: str = "vgg16", *, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Return a torchvision-layout VGG16 state dict (``features.*``, ``classifier.*``).

    ``pretrained`` is ``"imagenet"`` (torchvision's weights API: downloaded once into the torch
    hub cache, then read from there) or the path of a local file holding such a state dict
    (torchvision's ``vgg16-397923af.pth``, a Caffe conversion, or a dict with ``state_dict``).
    """
    if str(pretrained) == "imagenet":
        weights = _torchvision_weights(backbone)
        try:
            return weights.get_state_dict(progress=progress)
        except Exception as err:  # URLError, socket errors, SSL errors, ... all mean "offline"
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise PretrainedWeightsUnavailable(
                f"Could not download the ImageNet {backbone} weights from {weights.url} ({err}).\n"
                f"Either download that file on a machine with network access and put it at\n  {cache}\n"
                "(torchvision then reads it from there), or pass the path of a local VGG16 state dict:\n"
                "  arch.pretrained=/path/to/vgg16.pth\n"
                "or train from scratch with arch.pretrained=null (use backbone=vgg16_bn for that)."
            ) from err
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file not found: {path} (arch.pretrained must be 'imagenet', null, "
            "or the path of a VGG16 state dict saved with torch.save)"
        )
    obj = load_weights_only(path, what="arch.pretrained", archive=False)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not any(k.startswith("features.") for k in obj):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"{path} does not hold a torchvision-layout VGG16 state dict (keys 'features.N.weight', "
            f"'classifier.0.weight', ...); found {keys}"
        )
    return obj
