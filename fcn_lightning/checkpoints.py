"""Reading checkpoints safely: every load in the project goes through :func:`load_weights_only`.

``torch.load(weights_only=True)`` unpickles tensors, plain containers and numbers only, so a
planted checkpoint cannot run code, whatever torch's own default is. An empty, truncated or
foreign file gets an error that names it and says what to do.

Older checkpoints' hyper-parameters are brought to today's form by :func:`upgrade_hparams`;
:func:`check_init_checkpoint` and :func:`check_stream_checkpoints` refuse a checkpoint that a
model would start from but that was trained on other inputs (an HHA net for the RGB stream).
"""

from __future__ import annotations

import pickle
import random
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .contract import DataContract, modality_of, plain
from .errors import CheckpointError
from .normalization import Normalization, get_normalization


def check_readable(path: str | Path, what: str = "checkpoint", archive: bool = True) -> Path:
    """Cheap checks before any work: the file exists, is not empty and (``archive``) is a whole
    torch zip archive (a truncated one has lost its index at the end). Reads the index, not the
    data. Weights saved by old torch versions (torchvision's VGG16 file) are not zip archives:
    pass ``archive=False`` for them."""
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
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{what}: cannot read {path}: {err}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: {path} holds a {type(obj).__name__}, not a checkpoint")
    return obj


def upgrade_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of an older checkpoint in today's form.

    - Written before the data contract (class names and palette beside the model's heads): the
      contract follows from the model's settings; its inputs (kind, statistics) are unknown.
    - Written before the input normalisation was recorded per image group
      (``input_normalization``): every image group had the normalisation that the model's
      ``normalization`` names (``caffe``: the VOC mean, channels reversed, HHA included), and
      keeps it, so that eval.py and predict.py feed it what it was trained on.
    """
    h = dict(hparams)
    if "contract" not in h:
        for key in ("panel_size", "log_images_every_n_epochs"):  # now the image callback's
            h.pop(key, None)
        names, palette = h.pop("class_names", None), h.pop("palette", None)
        contract = DataContract.from_model_settings(h["model"], names, palette)
        contract = DataContract(
            heads=contract.heads,
            in_channels=contract.in_channels,
            streams=contract.streams,
            image_groups=_legacy_image_groups(contract.in_channels, contract.streams),
        )
        model = {
            k: v
            for k, v in h["model"].items()
            if k not in ("heads", "num_classes", "in_channels", "streams")
        }
        h = {**h, "model": model, "contract": contract.as_dict()}
    if h.get("input_normalization") is None:
        groups = DataContract.from_dict(h["contract"]).image_groups
        scheme = get_normalization(h["model"].get("normalization") or "imagenet")
        h["input_normalization"] = [plain(scheme.as_dict()) for _ in range(groups)]
    return h


def _legacy_image_groups(in_channels: int, streams: Mapping[str, int] | None) -> int:
    """Image groups (leading 3-channel groups) of an input known by its channels alone: one per
    late-fusion stream of 3 channels; one for RGB or RGB-D; none for depth alone."""
    if streams:
        return sum(1 for c in streams.values() if int(c) == 3)
    return 1 if in_channels >= 3 else 0


def recorded_inputs(
    path: str | Path, what: str = "checkpoint"
) -> tuple[DataContract, tuple[Normalization, ...]] | None:
    """The data contract and the per-image-group input normalisation a checkpoint was trained
    with (older checkpoints upgraded); None for a file without hyper-parameters (a plain state
    dict, e.g. converted weights)."""
    ckpt = load_weights_only(path, what=what)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or "model" not in hparams:
        return None
    h = upgrade_hparams(hparams)
    return (
        DataContract.from_dict(h["contract"]),
        tuple(get_normalization(n) for n in h["input_normalization"]),
    )


def check_init_checkpoint(
    path: str | Path,
    contract: DataContract | Mapping[str, Any],
    normalizations: Sequence[Normalization] | None = None,
    what: str = "checkpoint",
    takes: str = "the model",
) -> None:
    """Refuse to start a model of ``contract`` (and ``normalizations``, one per image group)
    from the checkpoint at ``path`` when the checkpoint was trained on another kind of input
    (HHA images for an RGB net) or with another input normalisation; the message names both.
    What a checkpoint does not record (written before its inputs were recorded, or no
    hyper-parameters at all) is not compared."""
    contract = DataContract.coerce(contract)
    found = recorded_inputs(path, what)
    if found is None:
        return
    source, used = found
    if source.inputs is not None and contract.inputs is not None:
        if [g.kind for g in source.inputs] != [g.kind for g in contract.inputs]:
            raise CheckpointError(
                f"{what}: {path} was trained on {modality_of(source)}, but {takes} takes "
                f"{modality_of(contract)}"
            )
    if normalizations is not None and len(used) == len(normalizations):
        for g, (a, b) in enumerate(zip(used, normalizations, strict=True)):
            if a != b:
                kind = contract.image_inputs[g][0] if g < contract.image_groups else "image"
                raise CheckpointError(
                    f"{what}: {path} expects its {kind} input normalised as {a.describe()}, "
                    f"but {takes} is fed {b.describe()}: train it with this run's "
                    "arch.normalization, or run with the one it was trained with"
                )


def check_stream_checkpoints(
    sources: Mapping[str, str | Path],
    contract: DataContract | Mapping[str, Any],
    normalizations: Sequence[Normalization] | None = None,
    what: str = "arch.init_streams",
) -> None:
    """Refuse a single-modality checkpoint for a late-fusion stream (``sources``: stream name
    -> checkpoint, e.g. ``{"rgb": ..., "hha": ...}``) that was trained on another input than
    its stream takes (e.g. the two checkpoints swapped), or with another normalisation;
    ``contract`` and ``normalizations`` (one per image group) are the late-fusion model's (an
    FCNModule's ``contract`` and ``input_normalizations``). Raises :class:`CheckpointError`
    naming the stream, the file and both inputs. Stream names the model lacks are left to the
    caller."""
    contract = DataContract.coerce(contract)
    spans = contract.stream_channels()
    for name, path in sources.items():
        if name not in spans:
            continue
        stream = contract.stream_contract(name)
        groups = contract.image_groups_in(*spans[name])
        norms = [normalizations[g] for g in groups] if normalizations is not None else None
        try:
            check_init_checkpoint(path, stream, norms, f"{what}.{name}", f"the {name} stream")
        except CheckpointError as err:
            trained = _trained_on(path)
            others = [
                other
                for other in spans
                if other != name and trained and contract.stream_contract(other).modality == trained
            ]
            hint = f" (the {others[0]} stream's checkpoint? are the two swapped?)" if others else ""
            raise CheckpointError(f"{err}{hint}") from None


def _trained_on(path: str | Path) -> str | None:
    found = recorded_inputs(path)
    return found[0].modality if found else None


def random_state() -> dict[str, Any]:
    """torch's and Python's random states as plain values, for a checkpoint."""
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
