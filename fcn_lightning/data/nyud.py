"""NYUDv2 as prepared for FCN (docs/PAPER.md, "Datasets on disk"): RGB, HHA, depth and their fusions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..contract import SINGLE_HEAD, DataContract, Head, InputGroup
from ..errors import DataError
from ..normalization import LOG_DEPTH_MEANS
from .base import SegmentationDataModule, check_files_exist, read_split_file
from .layout import LayoutReport, layout_text
from .readers import read_image, read_mat
from .sources import ARCHIVES

# Gupta et al.'s 40 classes, 1..40 in the .mat files
NYUD_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip

MODALITIES = {
    "rgb": ("images",), "hha": ("hha",), "depth": ("depth",), "rgbd": ("images", "depth"),
    "rgb+hha": ("images", "hha"),
}  # fmt: skip
SPLITS = ("train", "val", "test", "trainval")
OFFICIAL_COUNTS = {"train": 381, "val": 414, "test": 654, "trainval": 795}
LISTS = ("train.txt", "val.txt", "test.txt")
FOLDERS = {"images": "data/images", "hha": "data/hha", "depth": "data/depth"}
# where the reference keeps the split lists: in its repository, beside the extracted archive
LISTS_SOURCE = "https://github.com/shelhamer/fcn.berkeleyvision.org/tree/master/data/nyud"
MEAN_LOG_DEPTH = LOG_DEPTH_MEANS["nyud"]  # mean log(depth in mm), as the reference subtracts it

LAYOUT = """Expected layout of NYUDv2 as prepared for FCN under data.root{where}:
  train.txt, val.txt, test.txt            (one id per line, e.g. 5001)
  data/images/img_<id>.png                (RGB)
  data/hha/img_<id>.png                   (HHA: disparity, height, angle as 3 channels)
  data/depth/img_<id>.png                 (depth in millimetres, 16-bit)
  segmentation/img_<id>.mat               (key 'segmentation': uint8, 0 = void, 1..40 = classes)
Prepared data: {url} (fcn.berkeleyvision.org, data/nyud)
or: python -m fcn_lightning.prepare nyud --root {arg} (docs/DATA.md)"""


def layout(root: Path | None) -> str:
    return layout_text(LAYOUT, root, url=ARCHIVES["nyud"].url)


def load_nyud_label(path: Path) -> np.ndarray:
    """segmentation/img_<id>.mat -> class indices 0..39 with void (0) mapped to 255."""
    seg = np.asarray(read_mat(path, "segmentation", "NYUDv2 label")).astype(np.int64)
    return np.where(seg == 0, 255, seg - 1)  # 0 = void -> 255; classes 1..40 -> 0..39


def read_depth(path: Path) -> torch.Tensor:
    """Depth PNG (mm) -> (1, H, W) float: log depth minus the dataset mean (the reference)."""
    try:
        with Image.open(path) as img:
            depth = np.array(img, dtype=np.float32)
    except FileNotFoundError:
        raise DataError(f"depth file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot decode depth {path}: {err}") from err
    if depth.ndim != 2:
        raise DataError(
            f"depth {path} has {depth.shape[-1]} channels; expected a single-channel PNG"
        )
    return torch.from_numpy(np.log(np.maximum(depth, 1.0)) - MEAN_LOG_DEPTH).unsqueeze(0)


class NYUDDataModule(SegmentationDataModule):
    """NYUDv2, 40 classes; ``modality``: rgb, hha, depth, rgbd (early fusion), rgb+hha (late)."""

    class_names = NYUD_CLASSES

    def __init__(self, root: str | Path, *, modality: str = "rgb", **kwargs: Any) -> None:
        kwargs.setdefault("train_split", "trainval")  # the paper: train on trainval, report on test
        kwargs.setdefault("val_split", "test")
        super().__init__(root, **kwargs)
        if modality not in MODALITIES:
            raise ValueError(f"data.modality must be one of {sorted(MODALITIES)}, got {modality!r}")
        self.modality = modality
        for split in (self.train_split, self.val_split, self.test_split):
            if split not in SPLITS:
                raise ValueError(f"unknown NYUDv2 split {split!r}; expected one of {SPLITS}")

    @property
    def contract(self) -> DataContract:
        """40 classes; the modality decides the inputs and, for late fusion, the streams."""
        return DataContract(
            {SINGLE_HEAD: Head(NYUD_CLASSES)},
            [InputGroup("rgb" if f == "images" else f, "nyud") for f in MODALITIES[self.modality]],
            streams={"rgb": 3, "hha": 3} if self.modality == "rgb+hha" else None,
        )

    def _paths(self, i: str) -> list[Path]:
        images = [self.root / "data" / f / f"img_{i}.png" for f in MODALITIES[self.modality]]
        return [*images, self.label_folder / f"img_{i}.mat"]

    @property
    def label_folder(self) -> Path:
        return self.root / "segmentation"

    def split_ids(self, split: str) -> list[str]:
        if self.root is None or not self.root.is_dir():
            raise DataError(f"data.root {self.root} does not exist.\n{layout(self.root)}")
        for folder in MODALITIES[self.modality]:
            if not (self.root / "data" / folder).is_dir():
                raise DataError(
                    f"data.modality={self.modality} needs {self.root / 'data' / folder}, "
                    f"which does not exist.\n{layout(self.root)}"
                )
        if split == "trainval":
            return self.split_ids("train") + self.split_ids("val")
        return read_split_file(self.root / f"{split}.txt", f"NYUDv2 {split}")

    def check_layout(self) -> LayoutReport:
        """Per split, the images of each modality and the labels found, against the official
        counts; a missing modality folder or split list is named with where to get it."""
        present = {c: f for c, f in FOLDERS.items() if (self.root / f).is_dir()}
        columns = (*present, "labels")
        report = LayoutReport(f"NYUDv2 under {self.root}:", columns)
        for column, folder in FOLDERS.items():
            if column not in present:
                needed = [m for m, folders in MODALITIES.items() if column in folders]
                line = (
                    f"{self.root / folder} not found: data.modality={'/'.join(needed)} needs "
                    f"it; the reference's nyud.tar.gz ({ARCHIVES['nyud'].url}) is "
                    f"where it should come from: put its {folder}/ at {self.root / folder}"
                )
                (report.problems if column == "images" else report.cautions).append(line)
        absent = [n for n in LISTS if not (self.root / n).is_file()]
        if absent:
            report.problems.append(
                f"split list(s) {', '.join(absent)} not found in {self.root}: the reference "
                f"keeps them in its repository ({LISTS_SOURCE}); put them there, or pass "
                "--lists FOLDER to python -m fcn_lightning.prepare nyud"
            )
        if "images" not in present or absent:
            return report

        def files(i: str) -> dict[str, Path]:
            out = {c: self.root / f / f"img_{i}.png" for c, f in present.items()}
            return {**out, "labels": self.label_folder / f"img_{i}.mat"}

        report.count_splits(
            ("train", "val", "trainval", "test"), self.split_ids, files, OFFICIAL_COUNTS
        )
        return report

    def make_dataset(self, split: str, transforms: Callable) -> Dataset:
        ids = self.split_ids(split)
        check_files_exist(ids, self._paths, split)
        return self.dataset(ids, self._load, transforms, name=f"NYUDv2 split {split!r}")

    def label_files(self, split: str) -> list[dict[str, Path]]:
        return [{"out": self.label_folder / f"img_{i}.mat"} for i in self.split_ids(split)]

    @staticmethod
    def read_label(path: Path, head: str = "out") -> np.ndarray:
        return load_nyud_label(path)

    def _load(self, i: str):
        *inputs, label_path = self._paths(i)
        parts = [read_depth(p) if p.parent.name == "depth" else read_image(p) for p in inputs]
        if any(p.dtype != torch.uint8 for p in parts):  # with depth: all float, RGB in 0..1
            parts = [p.float() / 255 if p.dtype == torch.uint8 else p for p in parts]
        sizes = {tuple(p.shape[-2:]) for p in parts}
        if len(sizes) > 1:
            raise DataError(
                f"NYUDv2 id {i}: the {'/'.join(MODALITIES[self.modality])} images differ in size: {sorted(sizes)}"
            )
        return torch.cat(parts, dim=0), {"out": self.read_label(label_path)}, label_path
