"""Reading checkpoints safely (``weights_only``: a planted file runs no code; a broken file named),
refusing a starting checkpoint trained on other inputs, and the random state."""

from __future__ import annotations

import pickle
import random
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .contract import DataContract, modality_of
from .errors import CheckpointError
from .normalization import Normalization, get_normalization


def check_readable(path: str | Path, what: str = "checkpoint", archive: bool = True) -> Path:
    """The file exists, is not empty and (``archive``; not for old torch files) is a whole zip."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what}: checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{what}: {path} is empty (0 bytes): it was never written, e.g. the disk was full "
            "or the run was killed while saving. Use the other checkpoint of that stage "
            "(best.ckpt / last.ckpt) or train that stage again."
        )
    if archive and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{what}: {path} ({size} bytes) is truncated or is not a torch checkpoint (no zip "
            "index at its end). A copy or a save that did not finish leaves such a file: copy it "
            "again, or use the other checkpoint of that stage (best.ckpt / last.ckpt)."
        )
    return path


def load_weights_only(
    path: str | Path, map_location: Any = "cpu", what: str = "checkpoint", archive: bool = True
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = check_readable(path, what, archive)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{what}: {path} holds objects other than tensors and plain values, which are not "
            f"loaded (weights_only=True; a checkpoint could otherwise run code): {err}"
        ) from None
    except Exception as err:  # a file torch.save did not write fails in many ways
        raise CheckpointError(
            f"{what}: cannot read {path} ({type(err).__name__}: {err}): not a file torch.save wrote"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: {path} holds a {type(obj).__name__}, not a checkpoint")
    return obj


def recorded_inputs(
    path: str | Path, what: str = "checkpoint"
) -> tuple[DataContract, tuple[Normalization, ...]] | None:
    """The contract and input normalisations a checkpoint was trained with; None for a file
    without hyper-parameters (converted weights)."""
    hparams = load_weights_only(path, what=what).get("hyper_parameters")
    if not isinstance(hparams, Mapping) or "model" not in hparams:
        return None
    return (
        DataContract.from_dict(hparams["contract"]),
        tuple(get_normalization(n) for n in hparams["input_normalization"]),
    )


def check_stream_checkpoints(
    sources: Mapping[str, str | Path],
    contract: DataContract,
    normalizations: Sequence[Normalization] | None = None,
    what: str = "arch.init_streams",
) -> None:
    """Refuse a late-fusion stream's checkpoint (``sources``: name -> file) trained on another
    kind of input or normalisation than its stream of ``contract`` takes (a file without
    hyper-parameters passes; names the model lacks are left to the caller)."""
    spans = contract.stream_channels()
    for name, path in sources.items():
        found = recorded_inputs(path, f"{what}.{name}") if name in spans else None
        if found is None:
            continue
        (source, used), stream = found, contract.stream_contract(name)
        at, takes = f"{what}.{name}: {path}", f"the {name} stream"
        others = [o for o in spans if o != name]
        others = [o for o in others if contract.stream_contract(o).modality == source.modality]
        hint = f" (the {others[0]} stream's checkpoint? are the two swapped?)" if others else ""
        if [g.kind for g in source.inputs] != [g.kind for g in stream.inputs]:
            raise CheckpointError(
                f"{at} was trained on {modality_of(source)}, but {takes} takes "
                f"{modality_of(stream)}{hint}"
            )
        groups = contract.image_groups_in(*spans[name])
        norms = [normalizations[g] for g in groups] if normalizations is not None else []
        pairs = enumerate(zip(used, norms, strict=True)) if len(used) == len(norms) else ()
        for g, (a, b) in pairs:
            if a != b:
                kind = stream.image_inputs[g][0] if g < stream.image_groups else "image"
                raise CheckpointError(
                    f"{at} expects its {kind} input normalised as {a.describe()}, but {takes} is "
                    f"fed {b.describe()}: train it with this run's arch.normalization, or run "
                    f"with the one it was trained with{hint}"
                )


def random_state() -> dict[str, Any]:
    """torch's and Python's random states as plain values."""
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }


def set_random_state(states: Mapping[str, Any] | None) -> None:
    """Restore what :func:`random_state` saved (nothing when ``states`` is empty)."""
    if states:
        torch.set_rng_state(states["torch"])
        py = states["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
