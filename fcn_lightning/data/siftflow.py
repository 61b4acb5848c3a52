"""SIFT Flow (docs/PAPER.md, "Datasets on disk"): 33 semantic and 3 geometric classes, learned by two heads."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..contract import DataContract, Head, InputGroup
from ..errors import DataError
from .base import SegmentationDataModule, read_lines
from .layout import LayoutReport, Listing, SplitCount, count_split, layout_text
from .readers import read_image, read_mat
from .sources import ARCHIVES

SEMANTIC_CLASSES = (
    "awning", "balcony", "bird", "boat", "bridge", "building", "bus", "car", "cow", "crosswalk",
    "desert", "door", "fence", "field", "grass", "moon", "mountain", "person", "plant", "pole",
    "river", "road", "rock", "sand", "sea", "sidewalk", "sign", "sky", "staircase", "streetlight",
    "sun", "tree", "window",
)  # fmt: skip
GEOMETRIC_CLASSES = ("sky", "horizontal", "vertical")
SUBDIR = "spatial_envelope_256x256_static_8outdoorcategories"
# docs/PAPER.md: 2,688 images, the 200 of TestSet1.txt for test, the other 2,488 for training,
# two of which (highway_bost181, street_urb506) have no annotation and are left out
OFFICIAL_COUNTS = {"all": 2688, "train": 2486, "test": 200}
UNANNOTATED = ("highway_bost181", "street_urb506")
ENTRIES = ("Images", "SemanticLabels", "GeoLabels", "TestSet1.txt")  # TestSet1.txt last

LAYOUT = f"""Expected layout of the SIFT Flow dataset under data.root{{where}}:
  Images/{SUBDIR}/<id>.jpg
  SemanticLabels/{SUBDIR}/<id>.mat     (key 'S': 0 = unlabeled, 1..33 = classes)
  GeoLabels/{SUBDIR}/<id>.mat          (key 'S': -1 = unlabeled, 1..3 = sky, horizontal, vertical)
  TestSet1.txt                         (the 200 test images, one '{SUBDIR}\\<id>.jpg' a line)
Download: {{url}}
or: python -m fcn_lightning.prepare siftflow --root {{arg}} (docs/DATA.md)"""


def layout(root: Path | None) -> str:
    return layout_text(LAYOUT, root, url=ARCHIVES["siftflow"].url)


def load_siftflow_label(path: Path, geometric: bool) -> np.ndarray:
    """A label .mat (key 'S') -> 0-based classes with unlabeled = 255."""
    s = np.asarray(read_mat(path, "S", "SIFT Flow label")).astype(np.int64)
    if geometric:
        s[s == -1] = 0  # the geometric labels mark unlabeled with -1
    return np.where(s == 0, 255, s - 1)


class SiftFlowDataModule(SegmentationDataModule):
    """SIFT Flow with two heads, ``sem`` (33 classes) and ``geo`` (3); ``test`` is TestSet1.txt,
    ``train`` the rest, images without both annotations left out with a warning."""

    contract = DataContract(
        {"sem": Head(SEMANTIC_CLASSES), "geo": Head(GEOMETRIC_CLASSES)},
        [InputGroup("rgb", "siftflow")],  # photos, normalised with SIFT Flow's statistics
    )

    def __init__(self, root: str | Path, **kwargs: Any) -> None:
        kwargs.setdefault("val_split", "test")
        super().__init__(root, **kwargs)
        for split in (self.train_split, self.val_split, self.test_split):
            if split not in ("train", "test"):
                raise ValueError(f"unknown SIFT Flow split {split!r}; expected 'train' or 'test'")

    def _paths(self, i: str) -> tuple[Path, Path, Path]:
        return (
            self.root / "Images" / SUBDIR / f"{i}.jpg",
            self.root / "SemanticLabels" / SUBDIR / f"{i}.mat",
            self.root / "GeoLabels" / SUBDIR / f"{i}.mat",
        )

    def split_ids(self, split: str) -> list[str]:
        if self.root is None or not self.root.is_dir():
            raise DataError(f"data.root {self.root} does not exist.\n{layout(self.root)}")
        images = self.root / "Images" / SUBDIR
        if not images.is_dir():
            raise DataError(f"{images} not found.\n{layout(self.root)}")
        test_file = self.root / "TestSet1.txt"
        if not test_file.is_file():
            raise DataError(
                f"{test_file} not found: it defines the test split.\n{layout(self.root)}"
            )
        # lines look like 'spatial_envelope_256x256_static_8outdoorcategories\coast_arnat59.jpg'
        test = [Path(line.replace("\\", "/")).stem for line in read_lines(test_file)]
        if split == "test":
            ids = test
            if missing := [i for i in ids if not self._paths(i)[0].is_file()]:
                raise DataError(
                    f"TestSet1.txt lists '{missing[0]}' but {self._paths(missing[0])[0]} does not exist"
                )
        else:
            test_set = set(test)
            ids = sorted(p.stem for p in images.glob("*.jpg") if p.stem not in test_set)
        unlabelled = [i for i in ids if not all(p.is_file() for p in self._paths(i)[1:])]
        if unlabelled:
            self.warn_once(
                f"SIFT Flow {split}: {len(unlabelled)} image(s) without annotation left out: "
                + ", ".join(unlabelled[:5])
            )
            ids = [i for i in ids if i not in set(unlabelled)]
        if not ids:
            raise DataError(f"SIFT Flow split '{split}' is empty under {self.root}")
        return ids

    def check_layout(self) -> LayoutReport:
        """Every image with its two labels, then the train and test splits, against the counts."""
        columns = ("images", "sem", "geo")
        report = LayoutReport(f"SIFT Flow under {self.root}:", columns)
        listing = Listing()

        def files(i: str) -> dict[str, Path]:
            return dict(zip(columns, self._paths(i), strict=True))

        images = self.root / "Images" / SUBDIR
        every = sorted(p.stem for p in images.glob("*.jpg")) if images.is_dir() else []
        counted = count_split("all", every, files, OFFICIAL_COUNTS["all"], listing)
        report.splits.append(SplitCount("all", len(every), counted.found, counted.official))
        bare = sorted({p.stem for p in counted.missing})  # no annotation: left out, not an error
        if bare:
            known = " (as in the official release)" if tuple(bare) == UNANNOTATED else ""
            report.notes.append(
                f"{len(bare)} image(s) without annotation, left out of training{known}: "
                + ", ".join(bare[:5])
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unannotated images: in the note
            report.count_splits(("train", "test"), self.split_ids, files, OFFICIAL_COUNTS, listing)
        return report

    def make_dataset(self, split: str, transforms: Callable) -> Dataset:
        return self.dataset(self.split_ids(split), self._load, transforms, f"SIFT Flow {split}")

    def label_files(self, split: str) -> list[dict[str, Path]]:
        return [{"sem": sem, "geo": geo} for _, sem, geo in map(self._paths, self.split_ids(split))]

    @staticmethod
    def read_label(path: Path, head: str = "sem") -> np.ndarray:
        return load_siftflow_label(path, geometric=head == "geo")

    def _load(self, i: str):
        image, sem, geo = self._paths(i)
        labels = {"sem": self.read_label(sem, "sem"), "geo": self.read_label(geo, "geo")}
        return read_image(image), labels, sem
