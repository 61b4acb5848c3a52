"""Procedural scenes, each a pure function of (seed, split, index), so that ``python train.py``
runs with no download (docs/CONFIG.md): blobs, and fine structures a stride-32 net cannot draw."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..contract import SINGLE_HEAD, voc_palette
from .base import SegmentationDataModule
from .labelcheck import LabelReport

CLASSES = ("background", "blob", "bar", "dot", "ring")
# mean RGB of each foreground class; samples jitter around it
_COLOURS = np.array(
    [[0, 0, 0], [200, 60, 50], [50, 190, 70], [60, 80, 210], [210, 190, 50]], dtype=np.float32
)


def render_scene(
    seed: int, split: str, index: int, size: int | tuple[int, int] = 96, thickness: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 image (H, W, 3), uint8 label (H, W)). ``thickness`` scales the fine
    structures: 1.0 gives 2-4 px bars; larger values make every class coarse."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "test": 2}.get(split, 3), index])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: a random smooth gradient of dull colours
    c0, c1 = rng.uniform(70, 160, 3), rng.uniform(70, 160, 3)
    t = (np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy) / max(h, w)
    image = c0 + (c1 - c0) * t[..., None]
    label = np.zeros((h, w), np.uint8)
    s = min(h, w)

    def paint(mask: np.ndarray, cls: int) -> None:
        image[mask] = _COLOURS[cls] + rng.uniform(-35, 35, 3)
        label[mask] = cls

    for _ in range(rng.integers(1, 3)):  # blobs: large ellipses
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.12, 0.3, 2) * s
        paint(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1, 1)
    if rng.random() < 0.7:  # ring: thin annulus
        cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.1, 0.25) * s
        d = np.hypot(yy - cy, xx - cx)
        paint(np.abs(d - r) <= rng.uniform(1.0, 2.0) * thickness, 4)
    for _ in range(rng.integers(1, 4)):  # bars: thin lines at any angle
        cy, cx, angle = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, np.pi)
        half_len, half_width = rng.uniform(0.2, 0.5) * s, rng.uniform(1.0, 2.0) * thickness
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        paint((np.abs(u) <= half_len) & (np.abs(v) <= half_width), 2)
    for _ in range(rng.integers(2, 7)):  # dots: small squares
        r = max(1, round(rng.integers(2, 4) * thickness))
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        paint((np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r), 3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


# conf/data/synthetic.yaml's loader settings: batches of 8 small scenes, padded, mirrored
LOADER = {"batch_size": 8, "val_batch_size": 8, "num_workers": 0, "batching": "pad", "hflip": True}


class SyntheticDataModule(SegmentationDataModule):
    """Deterministic procedural scenes; :data:`LOADER`'s settings unless told otherwise."""

    class_names = CLASSES

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        image_size: int = 96,
        train_size: int = 512,
        val_size: int = 64,
        seed: int = 0,
        thickness: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **(LOADER | kwargs))
        if image_size < 8:
            raise ValueError(f"data.image_size must be >= 8, got {image_size}")
        if thickness <= 0:
            raise ValueError(f"data.thickness must be > 0, got {thickness}")
        self.image_size, self.seed, self.thickness = image_size, seed, thickness
        self.sizes = {"train": train_size, "val": val_size, "test": val_size}

    def make_dataset(self, split: str, transforms: Callable) -> Dataset:
        if split not in self.sizes:
            raise ValueError(f"synthetic data has splits {sorted(self.sizes)}, got {split!r}")
        ids = [str(i) for i in range(self.sizes[split])]
        load = partial(_load_scene, self.seed, split, self.image_size, self.thickness)
        return self.dataset(ids, load, transforms, f"synthetic {split}")

    def image_ids(self, split: str) -> set[str]:
        return {f"{split}/{i}" for i in super().image_ids(split)}  # each split draws its own

    def check_labels(
        self, splits: Sequence[str] | None = None, *, workers: int | None = None
    ) -> LabelReport:
        """Nothing to read: the scenes are generated with labels in range by construction."""
        names = list(dict.fromkeys(splits or (self.train_split, self.val_split, self.test_split)))
        counts = ", ".join(f"{s} {self.sizes.get(s, 0)}" for s in names)
        note = f"synthetic scenes ({counts} images), generated: no label files to check"
        return LabelReport(note=note)

    def write_voc(self, root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
        """Write the scenes in VOC layout, readable by the folder DataModule."""
        root = Path(root)
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        flat_palette = [v for c in voc_palette() for v in c]
        for split in splits:
            ids = [f"{split}_{i:05d}" for i in range(self.sizes[split])]
            for i, name in enumerate(ids):
                image, label = render_scene(self.seed, split, i, self.image_size, self.thickness)
                Image.fromarray(image).save(root / "JPEGImages" / f"{name}.png")
                lab = Image.fromarray(label, mode="P")
                lab.putpalette(flat_palette)
                lab.save(root / "SegmentationClass" / f"{name}.png")
            (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        (root / "classes.txt").write_text("\n".join(self.class_names) + "\n")
        return root


def _load_scene(seed: int, split: str, size: int, thickness: float, i: str):
    image, label = render_scene(seed, split, int(i), size, thickness)
    image = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    return image, {SINGLE_HEAD: label}, f"synthetic {split} #{i}"
