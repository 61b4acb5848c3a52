"""Where each dataset's official archive lives: address, file name and published md5 (VOC and
SBD from torchvision's tables; SIFT Flow and NYUDv2 publish none); docs/DATA.md."""

from __future__ import annotations

from dataclasses import dataclass

from torchvision.datasets import SBDataset
from torchvision.datasets.voc import DATASET_YEAR_DICT


@dataclass(frozen=True)
class Archive:
    url: str
    filename: str
    md5: str | None  # None: no checksum published


KEYS = ("url", "filename", "md5")
ARCHIVES: dict[str, Archive] = {
    **{f"voc{y}": Archive(*map(DATASET_YEAR_DICT[y].get, KEYS)) for y in ("2011", "2012")},
    "sbd": Archive(SBDataset.url, SBDataset.filename, SBDataset.md5),
    "siftflow": Archive(
        "http://people.csail.mit.edu/celiu/LabelTransfer/SiftFlowDataset.zip",
        "SiftFlowDataset.zip",
        None,
    ),
    "nyud": Archive("http://dl.caffe.berkeleyvision.org/nyud.tar.gz", "nyud.tar.gz", None),
}
