"""Where each dataset's official archive lives: address, file name and published md5 (VOC and
SBD from torchvision's own tables). The layout messages name them; ``python -m
fcn_lightning.prepare`` downloads them."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torchvision.datasets import SBDataset
from torchvision.datasets.voc import DATASET_YEAR_DICT


@dataclass(frozen=True)
class Archive:
    """One downloadable archive: ``md5`` is None where no checksum is published."""

    name: str
    url: str
    filename: str
    md5: str | None
    inner: str = ""  # where the dataset sits inside the archive, as torchvision knows it

    def with_md5(self, md5: str | None) -> Archive:
        return replace(self, md5=md5.lower()) if md5 else self

    def with_url(self, url: str | None) -> Archive:
        return replace(self, url=url) if url else self


def _voc(year: str) -> Archive:
    entry = DATASET_YEAR_DICT[year]
    return Archive(f"VOC{year}", entry["url"], entry["filename"], entry["md5"], entry["base_dir"])


# The official archives. VOC and SBD: torchvision's table (url, file name, published md5).
# SIFT Flow and the reference's NYUDv2: no checksum is published, so the archive's own integrity
# (zip CRCs, a readable tar) and the finished layout's counts are checked instead.
ARCHIVES: dict[str, Archive] = {
    "voc2011": _voc("2011"),
    "voc2012": _voc("2012"),
    "sbd": Archive(
        "SBD", SBDataset.url, SBDataset.filename, SBDataset.md5, "benchmark_RELEASE/dataset"
    ),
    "siftflow": Archive(
        "SIFT Flow",
        "http://people.csail.mit.edu/celiu/LabelTransfer/SiftFlowDataset.zip",
        "SiftFlowDataset.zip",
        None,
    ),
    "nyud": Archive(
        "NYUDv2 (as prepared for FCN)",
        "http://dl.caffe.berkeleyvision.org/nyud.tar.gz",
        "nyud.tar.gz",
        None,
    ),
}
