"""Image files to predict, decoded as a photo viewer shows them and batched by the size their
headers give; an undecodable file carries its error, a resized one its true size."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

from ..errors import DataError
from .readers import read_image

Size = tuple[int, int]


def displayed_size(path: Path) -> Size | None:
    """(H, W) of an image as shown (EXIF orientation applied), from the metadata before its
    pixel data; None where it does not open as an image (reading it then says why)."""
    try:
        with Image.open(path) as img:
            exif = Image.Image.getexif(img)  # the base method: a PNG's would decode the pixels
            turned = exif.get(0x0112) in (5, 6, 7, 8)  # a quarter turn: W and H swap
            return (img.width, img.height) if turned else (img.height, img.width)
    except Exception:  # any failure: reading the file will name it
        return None


class ImageFiles(Dataset):
    """Sample ``i``: ``{"index", "path", "size"}`` with ``"image"`` (normalised) and ``"rgb"``
    (for overlays), or ``"error"``, or ``"resized": True`` and the size decoded."""

    def __init__(self, files: Sequence[Path], transform: Callable[[Any], Any]) -> None:
        self.files, self.transform = list(files), transform
        self.sizes = [displayed_size(p) for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        sample: dict[str, Any] = {"index": index, "path": str(path), "size": self.sizes[index]}
        try:
            image = read_image(path, exif_transpose=True)  # as a photo viewer shows it
        except DataError as err:
            return {**sample, "error": str(err) if str(path) in str(err) else f"{path}: {err}"}
        if (size := tuple(image.shape[-2:])) != self.sizes[index]:
            return {**sample, "size": size, "resized": True}
        x = self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        return {**sample, "image": x, "rgb": image[:3].permute(1, 2, 0).numpy()}

    def read_unopened(self) -> dict[int, str]:
        """Read the files whose header did not open: their errors by index (or their size)."""
        errors = {}
        for i in [i for i, size in enumerate(self.sizes) if size is None]:
            sample = self[i]
            if "error" in sample:
                errors[i] = sample["error"]
            self.sizes[i] = sample["size"]
        return errors


class SizeBatches(Sampler[list[int]]):
    """Batches of up to ``size`` indices of one image size; unknown sizes (None) left out."""

    def __init__(self, sizes: Sequence[Size | None], size: int) -> None:
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {size}")
        groups: dict[Size, list[int]] = {}
        for i, s in enumerate(sizes):
            if s is not None:
                groups.setdefault(s, []).append(i)
        self.batches = [g[k : k + size] for g in groups.values() for k in range(0, len(g), size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def collate(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """(images (N, C, H, W) of the decoded samples, every sample without its tensor)."""
    good = [s.pop("image") for s in samples if "image" in s]
    return (torch.stack(good) if good else torch.empty(0, 3, *samples[0]["size"])), samples
