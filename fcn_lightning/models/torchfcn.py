"""Import and export state dicts of the PyTorch port pytorch-fcn (``torchfcn``): keys are the
Caffe layer names (``conv1_1`` ... ``fc7``, ``score_*``, ``upscore*``); its released weights load
into our paper-geometry FCN with the Caffe normalisation and give the same outputs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import load_weights_only
from .build import build_fcn
from .fcn import FCN

_BLOCKS = (2, 2, 3, 3, 3)  # convs per VGG16 block
# the upsampling layer that tells the arch apart
_ARCH_BY_KEY = {
    "upscore8.weight": "fcn8s",
    "upscore16.weight": "fcn16s",
    "upscore.weight": "fcn32s",
}


def _key_map(model: FCN) -> dict[str, str]:
    """Our key -> torchfcn key, for a single-head model on the plain vgg16 trunk."""
    if model.spec.backbone != "vgg16":
        raise ValueError(
            f"torchfcn has no batch norm: backbone must be 'vgg16', got {model.spec.backbone!r}"
        )
    if len(model.spec.heads) != 1:
        raise ValueError(
            f"torchfcn models have one head; this model has {[h for h, _ in model.spec.heads]}"
        )
    conv_idx = [i for i, m in enumerate(model.trunk.features) if isinstance(m, nn.Conv2d)]
    mapping: dict[str, str] = {}
    names = [f"conv{b + 1}_{i + 1}" for b, n in enumerate(_BLOCKS) for i in range(n)]
    for name, i in zip(names, conv_idx, strict=True):
        for p in ("weight", "bias"):
            mapping[f"trunk.features.{i}.{p}"] = f"{name}.{p}"
    for key in model.state_dict():
        if key.startswith("trunk.fc"):
            mapping[key] = key[len("trunk.") :]
        elif key.startswith("heads."):
            mapping[key] = key.split(".", 2)[2]
    return mapping


def export_torchfcn(model: FCN) -> dict[str, torch.Tensor]:
    """Our FCN's weights under torchfcn's keys."""
    state = model.state_dict()
    return {theirs: state[ours].detach().clone() for ours, theirs in _key_map(model).items()}


def import_torchfcn(
    source: Mapping[str, torch.Tensor] | str | Path, *, at_once: bool = False
) -> FCN:
    """Build a paper-geometry FCN (width 1, Caffe normalisation) from a torchfcn state dict or
    file: the arch read from the upsampling keys, the classes from ``score_fr``."""
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"torchfcn weights not found: {path}")
        source = load_weights_only(path, what="torchfcn weights", archive=False)
        if isinstance(source, Mapping) and "model_state_dict" in source:  # torchfcn's checkpoints
            source = source["model_state_dict"]
    state = dict(source)
    arch = next((a for k, a in _ARCH_BY_KEY.items() if k in state), None)
    if arch is None:
        raise ValueError(f"not a torchfcn FCN state dict: none of {sorted(_ARCH_BY_KEY)} found")
    if at_once:
        if arch != "fcn8s":
            raise ValueError(f"at_once=True needs an FCN-8s state dict, this one is {arch}")
        arch = "fcn8s_atonce"
    if "score_fr.weight" not in state:
        raise ValueError("torchfcn state dict lacks 'score_fr.weight'")
    num_classes = state["score_fr.weight"].shape[0]
    model = build_fcn(arch, num_classes=num_classes, geometry="paper", normalization="caffe")
    mapping = _key_map(model)
    expected, have = set(mapping.values()), set(state)
    for what, keys in (("is missing", expected - have), ("has unexpected", have - expected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"torchfcn {arch} state dict {what} key {sorted(keys)[0]!r}{more}")
    own = model.state_dict()
    new_state = {"_extra_state": own["_extra_state"]}
    for ours, theirs in mapping.items():
        if tuple(state[theirs].shape) != tuple(own[ours].shape):
            raise ValueError(
                f"torchfcn key {theirs!r} has shape {tuple(state[theirs].shape)}, expected {tuple(own[ours].shape)}"
            )
        new_state[ours] = state[theirs]
    model.load_state_dict(new_state)
    return model
