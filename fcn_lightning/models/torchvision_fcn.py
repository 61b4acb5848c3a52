"""Import torchvision's FCNs (``fcn_resnet50``, ``fcn_resnet101``): their state dicts, or their
released weights (COCO images with the 20 VOC classes), as an ``fcn_torchvision`` FCN whose
outputs are torchvision's (docs/TRUNKS.md, ResNet)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torchvision.models.segmentation import FCN_ResNet50_Weights, FCN_ResNet101_Weights

from .build import build_fcn
from .fcn import FCN
from .resnet import BLOCKS
from .weights import downloaded, state_dict_file

RELEASED = {
    "fcn_resnet50": FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    "fcn_resnet101": FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
}
# their key prefix -> ours (the single head, "out")
_PREFIXES = {"backbone.": "trunk.", "classifier.": "heads.out.classifier.",
             "aux_classifier.": "heads.out.aux_classifier."}  # fmt: skip


def released_state_dict(name: str, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """The released weights of torchvision's ``name`` through its weights API (cached in the
    torch hub folder), or :class:`PretrainedWeightsUnavailable` saying how to get them offline."""
    return downloaded(
        RELEASED[name],
        f"torchvision's {name} weights",
        "give its path instead of the name.",
        progress=progress,
    )


def _state_of(source: Mapping[str, torch.Tensor] | str | Path, progress: bool) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    if str(source) in RELEASED:
        return released_state_dict(str(source), progress=progress)
    path = Path(source).expanduser()
    state = state_dict_file(
        path, "torchvision FCN weights", "torchvision FCN weights not found: {path} (give a "
        f"file, a state dict, or one of {', '.join(RELEASED)})",
    )  # fmt: skip
    return dict(state)


def import_torchvision_fcn(
    source: Mapping[str, torch.Tensor] | str | Path, *, progress: bool = True
) -> FCN:
    """An ``fcn_torchvision`` FCN (ResNet trunk at output stride 8, ImageNet normalisation) with the
    weights of a torchvision ``fcn_resnet50`` / ``fcn_resnet101``: a state dict, a file holding one,
    or the name of the released weights; the depth is read from layer3's blocks, the classes from
    the classifier, the auxiliary head kept where the state dict has one."""
    state = _state_of(source, progress)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    backbone = next((b for b, n in BLOCKS.items() if len(blocks) == n[2]), None)
    if backbone is None or "classifier.4.weight" not in state:
        raise ValueError(
            "not a torchvision fcn_resnet50 / fcn_resnet101 state dict (keys 'backbone.layer3.*' "
            f"with 6 or 23 blocks and 'classifier.4.weight'); found {list(state)[:4]}"
        )
    model = build_fcn(
        "fcn_torchvision", num_classes=state["classifier.4.weight"].shape[0], backbone=backbone,
        geometry="same", output_stride=8, in_channels=state["backbone.conv1.weight"].shape[1],
        width=state["backbone.conv1.weight"].shape[0] / 64, dropout=0.0,
        aux=any(k.startswith("aux_classifier.") for k in state), normalization="imagenet",
    )  # fmt: skip
    own = model.state_dict()
    mapped = {"_extra_state": own["_extra_state"]}
    for key, value in state.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        ours = _PREFIXES[prefix] + key[len(prefix) :] if prefix else key
        if ours not in own:
            raise ValueError(f"torchvision {backbone} FCN state dict has unexpected key {key!r}")
        if tuple(value.shape) != tuple(own[ours].shape):
            raise ValueError(
                f"torchvision key {key!r} has shape {tuple(value.shape)}, expected {tuple(own[ours].shape)}"
            )
        mapped[ours] = value
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ValueError(f"torchvision {backbone} FCN state dict lacks {missing[:4]}")
    model.load_state_dict(mapped)
    return model
