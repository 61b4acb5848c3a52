"""Stage-to-stage weight transfer: FCN-32s -> FCN-16s -> FCN-8s (the paper's staged training,
section 4.2; docs/PAPER.md, Training recipes)."""

from __future__ import annotations

import torch
from torch import nn

from .base import FCNSpec, SegmentationNet
from .fcn import NEW_IN_STAGE, STAGE
from .fusion import LateFusionFCN
from .state import StateSource, model_state_dict
from .upsample import reset_bilinear_


@torch.no_grad()
def transfer_stage(
    source: StateSource, target: SegmentationNet, *, new_classes: bool = False
) -> SegmentationNet:
    """Copy every layer ``target`` shares with ``source`` (an earlier or the same stage); layers
    new in ``target`` keep their initial values (zero scores, bilinear kernels), fixed upsamplings
    get bilinear kernels again; a late-fusion target is filled stream by stream
    (docs/PAPER.md, Training recipes). ``new_classes``: heads of the same names may predict other
    classes, their layers sized by the classes keeping their initial values (fine-tuning a
    trained net on other data), as an auxiliary head the source lacks; ``target.fresh`` lists
    them."""
    target.fresh = []
    state = model_state_dict(source, target.anchor)
    if isinstance(target, LateFusionFCN):
        for name, stream in target.streams.items():
            pre = f"streams.{name}."
            sub = {k[len(pre) :]: v for k, v in state.items() if k.startswith(pre)}
            if not sub:
                raise ValueError(
                    f"source has no stream {name!r} (late fusion streams: {list(target.streams)})"
                )
            transfer_stage(sub, stream, new_classes=new_classes)
            target.fresh += [f"{pre}{key}" for key in stream.fresh]
        return target
    if state.get("_extra_state"):
        src = FCNSpec.from_dict(state["_extra_state"])
        for field in ("heads", "backbone", "geometry", "width", "in_channels", "output_stride"):
            a, b = getattr(src, field), getattr(target.spec, field)
            if field == "heads" and new_classes and [h for h, _ in a] == [h for h, _ in b]:
                continue
            if a != b:
                hint = f": set arch.{field}={a}" if field not in ("heads", "in_channels") else ""
                raise ValueError(
                    f"cannot transfer {src.arch} -> {target.spec.arch}: {field} differs (source "
                    f"{a!r}, target {b!r}){hint}"
                )
        if STAGE[src.arch] > STAGE[target.spec.arch]:
            raise ValueError(
                f"cannot transfer {src.arch} -> {target.spec.arch}: the source is a later stage"
            )
    own = target.state_dict()
    copied = 0
    for key, value in own.items():
        if key == "_extra_state":
            continue
        if key not in state:
            if key.split(".")[-2] in NEW_IN_STAGE and key.startswith("heads."):
                continue
            if new_classes and ".aux_classifier." in key:  # a source without the auxiliary head
                target.fresh.append(key)
                continue
            raise ValueError(
                f"source has no layer {key!r} (shape {tuple(value.shape)}) that the {target.spec.arch} target needs"
            )
        if state[key].shape != value.shape and new_classes and key.startswith("heads."):
            target.fresh.append(key)  # a score layer (or an upsampling of scores) of other classes
            continue
        if state[key].shape != value.shape:
            raise ValueError(
                f"layer {key!r}: source shape {tuple(state[key].shape)} vs target shape {tuple(value.shape)} "
                "(classes, width, heads or input channels differ)"
            )
        value.copy_(state[key])
        copied += 1
    if copied == 0:
        raise ValueError("no layer was copied: source and target share nothing")
    for m in target.modules():
        if isinstance(m, nn.ConvTranspose2d) and not m.weight.requires_grad:
            reset_bilinear_(m)
    return target
