"""Reading a model's state dict out of a model, a state dict or a checkpoint file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import load_weights_only

StateSource = nn.Module | Mapping[str, torch.Tensor] | str | Path
# The key every model of this package saves (its spec); the default anchor.
EXTRA_STATE = "_extra_state"


def model_state_dict(source: StateSource, anchor: str = EXTRA_STATE) -> dict[str, torch.Tensor]:
    """The model state dict of a model, a state dict, or a file (a Lightning checkpoint or a
    saved state dict), with any prefix before ``anchor`` (a key of the model) stripped."""
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
