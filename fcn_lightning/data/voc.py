"""PASCAL VOC 2011/2012 segmentation and the SBD extra annotations (docs/DATA.md, "PASCAL VOC
and SBD"; docs/PAPER.md, "Datasets on disk")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .base import SegmentationDataModule, check_files_exist, read_split_file
from .layout import LayoutReport, layout_text
from .readers import read_image, read_label_png, read_mat
from .sources import ARCHIVES

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

VOC_SPLITS = ("train", "val", "trainval")
SBD_SPLITS = ("sbd_train", "sbd_val")
SPLITS = (*VOC_SPLITS, *SBD_SPLITS, "seg11valid", "sbd_train+voc_train")
# The official size of each split (docs/PAPER.md, docs/DATA.md): what the layout check compares
OFFICIAL_COUNTS = {
    "2012": {"train": 1464, "val": 1449, "trainval": 2913},
    "2011": {"train": 1112, "val": 1111, "trainval": 2223, "seg11valid": 736},
    "sbd": {"sbd_train": 8498, "sbd_val": 2857},
}

LAYOUT = """Expected layout under data.root{where}:
  VOCdevkit/VOC{year}/JPEGImages/<id>.jpg
  VOCdevkit/VOC{year}/SegmentationClass/<id>.png          (palette PNG; 255 = void)
  VOCdevkit/VOC{year}/ImageSets/Segmentation/{{train,val,trainval}}.txt
and, for the SBD splits (sbd_train, sbd_val, seg11valid):
  benchmark_RELEASE/dataset/{{img/<id>.jpg, cls/<id>.mat, train.txt, val.txt}}
VOC{year}: {voc.url}
SBD: {sbd.url}
To fetch, check and extract them: python -m fcn_lightning.prepare voc --year {year} --root {arg}
(and ... prepare sbd --root {arg}), or data.download=true; see docs/DATA.md."""


def layout(year: str, root: Path | None) -> str:
    return layout_text(LAYOUT, root, year=year, voc=ARCHIVES[f"voc{year}"], sbd=ARCHIVES["sbd"])


def load_sbd_label(path: Path) -> Any:
    """SBD label: loadmat(cls/<id>.mat)['GTcls'][0]['Segmentation'][0] (uint8 class indices)."""
    gtcls = read_mat(path, "GTcls", "SBD label")
    try:
        return gtcls[0]["Segmentation"][0]
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(f"{path} has no GTcls.Segmentation: is it an SBD cls/<id>.mat?") from err


class VOCDataModule(SegmentationDataModule):
    """PASCAL VOC segmentation with the SBD extra annotations; splits: :data:`SPLITS`
    (docs/DATA.md). The paper trains on ``sbd_train``, validates on ``seg11valid``."""

    class_names = VOC_CLASSES

    def __init__(
        self,
        root: str | Path,
        *,
        year: int | str = 2012,
        download: bool | Callable[[VOCDataModule], Any] = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        self.year, self._prepared = str(year), False
        self.download = download if callable(download) else bool(download)
        if self.year not in ("2011", "2012"):
            raise ValueError(f"data.year must be 2011 or 2012, got {year!r}")
        for split in (self.train_split, self.val_split, self.test_split):
            self._check_split(split)

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown VOC split {split!r}; expected one of {SPLITS}")
        if split == "seg11valid" and self.year != "2011":
            raise ValueError("seg11valid is VOC2011 val minus SBD train: set data.year=2011")

    @property
    def voc_dir(self) -> Path:
        return self.root / "VOCdevkit" / f"VOC{self.year}"

    @property
    def sbd_dir(self) -> Path:
        return self.root / "benchmark_RELEASE" / "dataset"

    def _require(self, path: Path, what: str) -> None:
        if self.root is None or not self.root.is_dir():
            file = self.root is not None and self.root.exists()
            state = "is a file, not a folder" if file else "does not exist"
            raise DataError(f"data.root {self.root} {state}.\n" + layout(self.year, self.root))
        if not path.exists():
            raise DataError(f"{what} not found: {path}\n" + layout(self.year, self.root))

    def _voc_ids(self, split: str) -> list[str]:
        self._require(self.voc_dir, f"VOC{self.year}")
        lists = self.voc_dir / "ImageSets" / "Segmentation"
        return read_split_file(lists / f"{split}.txt", f"VOC{self.year} {split}")

    def _sbd_ids(self, split: str) -> list[str]:
        self._require(self.sbd_dir, "SBD (benchmark_RELEASE/dataset)")
        return read_split_file(self.sbd_dir / f"{split}.txt", f"SBD {split}")

    def needed(self) -> tuple[bool, bool]:
        """Whether the configured splits read VOC of ``year``, and whether they read SBD."""
        splits = {self.train_split, self.val_split, self.test_split}
        return bool(splits - set(SBD_SPLITS)), bool(splits - set(VOC_SPLITS))

    def prepare_data(self) -> None:
        """With ``download``: fetch what the splits read where it is missing (docs/DATA.md)."""
        if not self.download or self._prepared:
            return
        if self.root is None:
            raise DataError("data.download=true needs data.root: the folder to download into")
        if not callable(self.download):
            raise DataError(
                "download=True needs the function that downloads: pass "
                "download=fcn_lightning.prepare.datasets.download (data.download=true does)"
            )
        self.download(self)
        self._prepared = True

    def check_layout(
        self, splits: Sequence[str] | None = None, *, require_voc: bool = False
    ) -> LayoutReport:
        """Per split (default: every split on disk) the ids of :meth:`split_ids`, the files found
        and the official count. ``require_voc``: VOC of ``year`` absent is an error."""
        voc, sbd, listed = self.voc_dir.is_dir(), self.sbd_dir.is_dir(), splits is not None
        if not listed:  # every split whose folders are on disk
            both = voc and sbd and self.year == "2011"
            splits = [*VOC_SPLITS * voc, *SBD_SPLITS * sbd, *("seg11valid",) * both]
        parts = [f"VOC{self.year}"] * voc + ["SBD"] * sbd
        title = f"{' + '.join(parts) or 'PASCAL VOC'} under {self.root}:"
        report = LayoutReport(title, ("images", "labels"))
        official = {**OFFICIAL_COUNTS[self.year], **OFFICIAL_COUNTS["sbd"]}

        def files(pair: tuple[str, str]) -> dict[str, Path]:
            return dict(zip(("images", "labels"), self._paths(pair), strict=True))

        report.count_splits(list(splits), self.split_ids, files, official)
        other = "2012" if self.year == "2011" else "2011"
        there = self.root / "VOCdevkit" / f"VOC{other}"
        also = f" ({there} is there: that is --year {other}, data.year={other})"
        also *= not voc and there.is_dir()
        if require_voc and not voc:
            report.problems.append(f"VOC{self.year} not found: {self.voc_dir} does not exist{also}")
        elif not splits and not listed:
            report.problems.append(f"neither {self.voc_dir} nor {self.sbd_dir} exists{also}")
        elif also and not listed:
            report.notes.append(f"VOC{self.year}: {self.voc_dir} does not exist{also}")
        return report

    def split_ids(self, split: str) -> list[tuple[str, str]]:
        """(source, id) pairs of a split; source is ``voc`` or ``sbd``."""
        self._check_split(split)
        if split in VOC_SPLITS:
            return [("voc", i) for i in self._voc_ids(split)]
        if split in SBD_SPLITS:
            return [("sbd", i) for i in self._sbd_ids(split.removeprefix("sbd_"))]
        sbd = self._sbd_ids("train")  # and the VOC ids not in it: of val, or of train after it
        seen, val = set(sbd), split == "seg11valid"
        voc = [("voc", i) for i in self._voc_ids("val" if val else "train") if i not in seen]
        return voc if val else [("sbd", i) for i in sbd] + voc

    def _paths(self, pair: tuple[str, str]) -> tuple[Path, Path]:
        """Image and label file of a (source, id) pair."""
        source, i = pair
        if source == "sbd":
            return self.sbd_dir / "img" / f"{i}.jpg", self.sbd_dir / "cls" / f"{i}.mat"
        voc = self.voc_dir
        return voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png"

    def make_dataset(self, split: str, transforms: Callable) -> Dataset:
        pairs = self.split_ids(split)
        check_files_exist(pairs, self._paths, split)
        return self.dataset(pairs, self._load, transforms, f"VOC split {split!r}")

    def label_files(self, split: str) -> list[dict[str, Path]]:
        return [{"out": self._paths(pair)[1]} for pair in self.split_ids(split)]

    @staticmethod
    def read_label(path: Path, head: str = "out") -> np.ndarray:
        """A VOC palette PNG or an SBD cls/<id>.mat, by its suffix."""
        return load_sbd_label(path) if path.suffix == ".mat" else read_label_png(path)

    def _load(self, pair: tuple[str, str]):
        image_path, label_path = self._paths(pair)
        return read_image(image_path), {"out": self.read_label(label_path)}, label_path
