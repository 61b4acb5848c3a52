"""Reading dataset files: images of every common mode, label PNGs and .mat files, label maps
and range checks (docs/DATA.md). Every failure is a :class:`DataError` that names the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image, ImageOps

from ..contract import IGNORE_INDEX
from ..errors import DataError

# what decoding a file that is no readable image raises (UnidentifiedImageError is an OSError)
UNDECODABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
LABEL_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: Path, mode: str = "RGB", exif_transpose: bool = False) -> torch.Tensor:
    """An image file of any common mode (docs/CONFIG.md) as a uint8 (C, H, W) tensor, 'RGB' or
    'L'; ``exif_transpose`` for prediction (training reads the stored pixels)."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"read_image: mode must be 'RGB' or 'L', got {mode!r}")
    try:
        with Image.open(path) as img:
            array = _decode(ImageOps.exif_transpose(img) if exif_transpose else img)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except UNDECODABLE as err:
        raise DataError(f"cannot decode image {path}: {err}") from err
    if mode == "L" and array.ndim == 3:
        array = np.array(Image.fromarray(array).convert("L"))
    tensor = torch.from_numpy(np.atleast_3d(array)).permute(2, 0, 1)  # (C, H, W), C = 1 or 3
    return (tensor.expand(3, -1, -1) if mode == "RGB" else tensor).contiguous()


def _decode(img: Image.Image) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) pixels of any mode: wide modes scaled by their type's range, never
    per image ('I' as 16-bit, 'F' as 0..1 where they fit); alpha dropped."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img)
        peak = float(values.max(initial=0))
        top = {"F": 1.0 if peak <= 1 else 255.0, "I": 65535.0 if peak <= 65535 else 2**31 - 1.0}
        top = top.get(img.mode, 65535.0)
        return np.clip(np.rint(values.astype(np.float32) * (255 / top)), 0, 255).astype(np.uint8)
    if img.mode in ("1", "L", "LA", "La"):
        return np.array(img.convert("L"))  # '1' -> 0 / 255; alpha dropped
    if img.mode in ("P", "PA"):
        return np.array(img.convert("RGBA"))[..., :3]  # palette colours; transparency dropped
    return np.array(img.convert("RGB"))  # RGB, RGBA/RGBX (alpha dropped), CMYK, YCbCr


def read_label_png(path: Path) -> np.ndarray:
    """uint8 class indices of a palette, 8-bit, 1-bit or 16-bit label PNG; a 16-bit value above
    255 is refused, never wrapped, and so are colour (RGB) labels."""
    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MODES:
                raise DataError(_colour_label_message(path, img))
            label, mode = np.asarray(img), img.mode
    except FileNotFoundError:
        raise DataError(f"label file not found: {path}") from None
    except (OSError, SyntaxError) as err:
        raise DataError(f"cannot read label {path}: {err}") from err
    if label.dtype != np.uint8:
        wide = (label < 0) | (label > 255)
        if wide.any():
            found = np.unique(label[wide])[:8].tolist()
            raise DataError(
                f"label {path} is a {mode} image with values {found} above 255: class indices "
                "must be 0..254 (255 = ignore); with more classes than that, split the labels"
            )
    return label.astype(np.uint8, copy=False)


def _colour_label_message(path: Path, img: Image.Image) -> str:
    message = (
        f"label {path} is a {img.mode} image; labels must be palette (P) or single-channel index "
        "PNGs whose pixel values are class indices (255 = ignore). "
    )
    rgb = np.asarray(img.convert("RGB"))
    if (rgb == rgb[..., :1]).all():
        return message + "Its channels are equal: Image.open(p).convert('L').save(p) converts it"
    return message + (
        "To convert a colour-coded mask, give each colour its class: "
        "index[(rgb == colour).all(-1)] = class, then Image.fromarray(index).save(p) "
        "with index a uint8 array"
    )


def read_mat(path: Path, key: str, what: str) -> np.ndarray:
    """``scipy.io.loadmat(path)[key]``; a missing file, unreadable file or missing key names itself."""
    try:
        mat = scipy.io.loadmat(path)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except Exception as err:
        raise DataError(f"cannot read {what} {path}: {err}") from err
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} has no '{key}' key (found {found})")
    return mat[key]


def map_labels(label: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """``label`` with each value ``k`` of ``label_map`` replaced by ``label_map[k]``, all at once
    (so ``{1: 2, 2: 1}`` swaps); run before the range check, so a bad target still fails it."""
    arr = np.asarray(label)
    if not label_map:
        return arr
    if arr.dtype == np.uint8 and all(0 <= v <= 255 for v in label_map.values()):
        lut = np.arange(256, dtype=np.uint8)
        for src, dst in label_map.items():
            if 0 <= src <= 255:
                lut[src] = dst
        return lut[arr]
    out = arr.astype(np.int64)
    for src, dst in label_map.items():
        out[arr == src] = dst
    return out


def check_label(label: np.ndarray, num_classes: int, path: Path | str) -> torch.Tensor:
    """A uint8 label tensor after checking every value is in 0..num_classes-1 or 255."""
    arr = np.asarray(label)
    valid = (arr == IGNORE_INDEX) | ((arr >= 0) & (arr < num_classes))
    if not valid.all():
        found = np.unique(arr[~valid])[:8].tolist()
        raise DataError(
            f"label {path} has values {found} outside 0..{num_classes - 1} and {IGNORE_INDEX} "
            f"(num_classes={num_classes}: does the class count match the labels? "
            "data.label_map can map values, e.g. to 255 to ignore them)"
        )
    # uint8 through the transforms: nearest resizing and cropping stay cheap
    return torch.from_numpy(np.array(arr, dtype=np.uint8))
