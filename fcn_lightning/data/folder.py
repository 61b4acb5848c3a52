"""A user's own dataset in VOC layout (docs/DATA.md; the settings: docs/CONFIG.md)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..contract import SINGLE_HEAD, voc_palette
from ..errors import DataError
from .base import SegmentationDataModule, check_files_exist, read_lines, read_split_file
from .readers import read_image, read_label_png

LAYOUT = """Expected layout under data.root (VOC layout):
  JPEGImages/<id>.jpg or <id>.png       (RGB images)
  SegmentationClass/<id>.png            (palette or single-channel PNG; value = class, 255 = ignore)
  ImageSets/Segmentation/<split>.txt    (optional: one id per line; without it every image is used)
  classes.txt                           (optional: one class name per line, or set data.num_classes)"""

# conf/data/folder.yaml's training batches: random 320 px crops, scaled 0.5-2x and mirrored
TRAINING = dict(batch_size=8, batching="crop", crop_size=320, scale_range=(0.5, 2.0), hflip=True)


class FolderDataModule(SegmentationDataModule):
    """Any dataset in VOC layout; classes from ``num_classes``/``class_names`` or ``classes.txt``.
    Trains on :data:`TRAINING`'s batches unless told otherwise, as ``conf/data/folder.yaml``."""

    def __init__(
        self,
        root: str | Path,
        *,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **(TRAINING | kwargs))
        self._num_classes_cfg = num_classes
        self._class_names_cfg = list(class_names) if class_names else None

    @cached_property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        names, n = self._class_names_cfg, self._num_classes_cfg
        classes_txt = self.root / "classes.txt" if self.root else None
        if names is None and classes_txt is not None and classes_txt.is_file():
            if not (names := read_lines(classes_txt)):
                raise DataError(f"{classes_txt} lists no class names")
        if names is None and n is None:
            self.check_layout()  # a wrong data.root is named as such, not as a missing classes.txt
            raise DataError(
                f"the number of classes is unknown: set data.num_classes or write {classes_txt} "
                "(one class name per line, index 0 first)"
            )
        if names is not None and n is not None and len(names) != n:
            source = "data.class_names" if self._class_names_cfg else str(classes_txt)
            raise DataError(
                f"data.num_classes={n} disagrees with the {len(names)} classes in {source}"
            )
        return tuple(names) if names is not None else tuple(f"class_{i}" for i in range(n))

    @cached_property
    def palette(self) -> list[tuple[int, int, int]]:  # type: ignore[override]
        """The palette of the first palette-PNG label (the VOC palette if there is none)."""
        labels = sorted((self.root / "SegmentationClass").glob("*.png")) if self.root else []
        if labels:
            with Image.open(labels[0]) as img:
                if img.mode == "P" and (flat := img.getpalette()):
                    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]
        return voc_palette()

    IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")

    def image_path(self, i: str) -> Path:
        """``JPEGImages/<id>.jpg|.png|.jpeg``; two of them for one id are refused, not guessed."""
        folder = self.root / "JPEGImages"
        found = [p for ext in self.IMAGE_EXTENSIONS if (p := folder / f"{i}{ext}").is_file()]
        if len(found) > 1:
            raise DataError(
                f"image id '{i}' has {len(found)} files: {', '.join(map(str, found))}; its label "
                f"{self.label_path(i).name} can belong to one only: rename or move the others"
            )
        return found[0] if found else folder / f"{i}.jpg"

    def check_layout(self) -> None:
        """data.root and its two folders; a missing one named with the expected layout."""
        if self.root is None or not self.root.is_dir():
            raise DataError(f"data.root {self.root} does not exist.\n{LAYOUT}")
        for sub in ("JPEGImages", "SegmentationClass"):
            if not (self.root / sub).is_dir():
                raise DataError(f"{self.root / sub} not found.\n{LAYOUT}")

    def split_ids(self, split: str) -> list[str]:
        self.check_layout()
        lists = self.root / "ImageSets" / "Segmentation"
        if lists.is_dir():
            return read_split_file(lists / f"{split}.txt", f"data split '{split}'")
        ids = sorted(p.stem for p in (self.root / "SegmentationClass").glob("*.png"))
        if not ids:
            raise DataError(f"no label PNGs in {self.root / 'SegmentationClass'}.\n{LAYOUT}")
        images = {p.stem for p in (self.root / "JPEGImages").iterdir() if p.is_file()}
        unlabelled = sorted(images - set(ids))
        left = f"; {len(unlabelled)} image(s) without a label left out: {', '.join(unlabelled[:5])}"
        self.warn_once(
            f"{lists} not found: split '{split}' uses all {len(ids)} labelled images (so "
            "validation scores the training images: write ImageSets/Segmentation/train.txt and "
            f"val.txt for a held-out score){left * bool(unlabelled)}"
        )
        return ids

    def label_path(self, i: str) -> Path:
        return self.root / "SegmentationClass" / f"{i}.png"

    def make_dataset(self, split: str, transforms: Callable) -> Dataset:
        ids = self.split_ids(split)
        check_files_exist(ids, lambda i: (self.image_path(i), self.label_path(i)), split)
        return self.dataset(ids, self._load, transforms, f"split {split!r} of {self.root}")

    def label_files(self, split: str) -> list[dict[str, Path]]:
        folder = self.root / "SegmentationClass"  # what label_path gives, joined once
        return [{SINGLE_HEAD: folder / f"{i}.png"} for i in self.split_ids(split)]

    @staticmethod
    def read_label(path: Path, head: str = SINGLE_HEAD) -> np.ndarray:
        return read_label_png(path)

    def _load(self, i: str):
        label = self.label_path(i)
        return read_image(self.image_path(i)), {SINGLE_HEAD: self.read_label(label)}, label
