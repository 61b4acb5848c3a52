"""Stage-to-stage weight transfer: FCN-32s -> FCN-16s -> FCN-8s (the paper's staged training)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import load_weights_only
from .fcn import FCN, NEW_IN_STAGE, STAGE, FCNSpec

StateSource = FCN | nn.Module | Mapping[str, torch.Tensor] | str | Path


def model_state_dict(
    source: StateSource, anchor: str = "trunk.features.0.weight"
) -> dict[str, torch.Tensor]:
    """The FCN state dict of a model, a state dict, or a file (a Lightning checkpoint or a
    ``torch.save``'d state dict); any prefix before ``anchor`` (``model.`` in a
    LightningModule's checkpoint) is stripped."""
    if isinstance(source, nn.Module):
        state = source.state_dict()
    elif isinstance(source, str | Path):
        state = load_weights_only(source)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
    else:
        state = source
    if not isinstance(state, Mapping):
        raise ValueError(f"{source!r} does not hold a state dict")
    found = next((k for k in state if k.endswith(anchor)), None)
    if found is None:
        where = source if isinstance(source, str | Path) else "state dict"
        raise ValueError(f"{where} holds no FCN weights (no '...{anchor}' key)")
    prefix = found[: -len(anchor)]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def transfer_stage(source: StateSource, target: FCN) -> FCN:
    """Copy every layer ``target`` shares with ``source`` (an earlier or the same stage).

    Layers new in ``target`` (score_pool4, score_pool3 and their upsamplings) keep their initial
    values, zero scores and bilinear kernels, so the new stage starts from the previous stage's
    predictions. Raises ``ValueError`` naming the layer and both shapes when the two disagree.
    """
    from .fusion import LateFusionFCN

    if isinstance(target, LateFusionFCN):  # stream by stream, from a fused source
        state = model_state_dict(
            source, f"streams.{next(iter(target.streams))}.trunk.features.0.weight"
        )
        for name, stream in target.streams.items():
            sub = {
                k[len(f"streams.{name}.") :]: v
                for k, v in state.items()
                if k.startswith(f"streams.{name}.")
            }
            if not sub:
                raise ValueError(
                    f"source has no stream {name!r} (late fusion streams: {list(target.streams)})"
                )
            transfer_stage(sub, stream)
        return target
    state = model_state_dict(source)
    if state.get("_extra_state"):
        src = FCNSpec.from_dict(state["_extra_state"])
        for field in ("heads", "backbone", "geometry", "width", "in_channels"):
            a, b = getattr(src, field), getattr(target.spec, field)
            if a != b:
                raise ValueError(
                    f"cannot transfer {src.arch} -> {target.spec.arch}: {field} differs (source {a!r}, target {b!r})"
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
            raise ValueError(
                f"source has no layer {key!r} (shape {tuple(value.shape)}) that the {target.spec.arch} target needs"
            )
        if state[key].shape != value.shape:
            raise ValueError(
                f"layer {key!r}: source shape {tuple(state[key].shape)} vs target shape {tuple(value.shape)} "
                "(classes, width, heads or input channels differ)"
            )
        value.copy_(state[key])
        copied += 1
    if copied == 0:
        raise ValueError("no layer was copied: source and target share nothing")
    return target
