"""Segmentation DataModules (VOC + SBD, VOC-layout folders, NYUDv2, SIFT Flow, synthetic
scenes), their readers, label check, archives and layout check (docs/DATA.md)."""

from ..contract import IGNORE_INDEX, voc_palette
from ..errors import DataError, PrepareError
from .base import SegmentationDataModule, SegmentationDataset, pad_collate
from .folder import FolderDataModule
from .labelcheck import LabelReport, SplitLabels
from .layout import LayoutReport
from .nyud import NYUD_CLASSES, NYUDDataModule
from .readers import read_image, read_label_png
from .siftflow import GEOMETRIC_CLASSES, SEMANTIC_CLASSES, SiftFlowDataModule
from .sources import ARCHIVES
from .synthetic import SyntheticDataModule, render_scene
from .transforms import NormalizeImage, RandomScale, eval_transforms, train_transforms
from .voc import VOC_CLASSES, VOCDataModule

__all__ = [
    "ARCHIVES", "GEOMETRIC_CLASSES", "IGNORE_INDEX", "NYUD_CLASSES", "SEMANTIC_CLASSES",
    "VOC_CLASSES", "DataError", "FolderDataModule", "LabelReport", "LayoutReport", "NYUDDataModule",
    "NormalizeImage", "PrepareError", "RandomScale", "SegmentationDataModule",
    "SegmentationDataset", "SiftFlowDataModule", "SplitLabels", "SyntheticDataModule",
    "VOCDataModule", "eval_transforms", "pad_collate", "read_image", "read_label_png",
    "render_scene", "train_transforms", "voc_palette"
]  # fmt: skip
