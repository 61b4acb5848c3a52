"""Reading checkpoints safely: every load in the project goes through :func:`load_weights_only`.

``torch.load(weights_only=True)`` unpickles tensors, plain containers and numbers only, so a
planted checkpoint cannot run code, whatever torch's own default is. An empty, truncated or
foreign file gets an error that names it and says what to do.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .contract import DataContract


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


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
    """Hyper-parameters of a checkpoint written before the data contract (class names and
    palette beside the model's heads) in today's form."""
    h = dict(hparams)
    if "contract" in h:
        return h
    for key in ("panel_size", "log_images_every_n_epochs"):  # now the image callback's settings
        h.pop(key, None)
    names, palette = h.pop("class_names", None), h.pop("palette", None)
    contract = DataContract.from_model_settings(h["model"], names, palette)
    model = {
        k: v
        for k, v in h["model"].items()
        if k not in ("heads", "num_classes", "in_channels", "streams")
    }
    return {**h, "model": model, "contract": contract.as_dict()}


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
