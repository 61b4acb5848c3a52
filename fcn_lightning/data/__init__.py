"""Segmentation DataModules: PASCAL VOC (+ SBD), VOC-layout folders, synthetic scenes."""

from .base import DataError, SegmentationDataModule, SegmentationDataset, pad_collate, voc_palette
from .folder import FolderDataModule
from .nyud import NYUD_CLASSES, NYUDDataModule
from .siftflow import GEOMETRIC_CLASSES, SEMANTIC_CLASSES, SiftFlowDataModule
from .synthetic import SyntheticDataModule, render_scene
from .transforms import IGNORE_INDEX, NormalizeImage, RandomScale, eval_transforms, train_transforms
from .voc import VOC_CLASSES, VOCDataModule

__all__ = [
    "GEOMETRIC_CLASSES",
    "IGNORE_INDEX",
    "NYUD_CLASSES",
    "SEMANTIC_CLASSES",
    "VOC_CLASSES",
    "DataError",
    "FolderDataModule",
    "NYUDDataModule",
    "NormalizeImage",
    "RandomScale",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SiftFlowDataModule",
    "SyntheticDataModule",
    "VOCDataModule",
    "eval_transforms",
    "pad_collate",
    "render_scene",
    "train_transforms",
    "voc_palette",
]
