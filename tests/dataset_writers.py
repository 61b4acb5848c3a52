"""Fixture writers: tiny datasets in each official on-disk format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from fcn_lightning.data import voc_palette

FLAT_PALETTE = [v for c in voc_palette() for v in c]


def make_label(
    h: int, w: int, classes: int, rng: np.random.Generator, border: bool = True
) -> np.ndarray:
    """Blocks of random classes; a 255 'void' border around each block, as in VOC."""
    label = np.zeros((h, w), np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        y1, x1 = rng.integers(y0 + 3, h + 1), rng.integers(x0 + 3, w + 1)
        label[y0:y1, x0:x1] = rng.integers(1, classes)
        if border:
            label[y0:y1, x0] = label[y0:y1, x1 - 1] = 255
            label[y0, x0:x1] = label[y1 - 1, x0:x1] = 255
    return label


def save_palette_png(label: np.ndarray, path: Path) -> None:
    img = Image.fromarray(label, mode="P")
    img.putpalette(FLAT_PALETTE)
    img.save(path)


def save_jpeg(path: Path, h: int, w: int, rng: np.random.Generator) -> None:
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def write_voc(
    root: Path, year: int, splits: dict[str, list[str]], size=(30, 40), seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for i in ids)
        )
        for i in ids:
            save_jpeg(voc / "JPEGImages" / f"{i}.jpg", *size, rng)
            save_palette_png(make_label(*size, 21, rng), voc / "SegmentationClass" / f"{i}.png")
    return root


def write_sbd(root: Path, splits: dict[str, list[str]], size=(30, 40), seed: int = 1) -> Path:
    """benchmark_RELEASE/dataset with cls/<id>.mat holding the GTcls struct, as SBD ships it."""
    rng = np.random.default_rng(seed)
    ds = root / "benchmark_RELEASE" / "dataset"
    (ds / "img").mkdir(parents=True, exist_ok=True)
    (ds / "cls").mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (ds / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for i in ids:
            save_jpeg(ds / "img" / f"{i}.jpg", *size, rng)
            seg = make_label(*size, 21, rng, border=False)  # SBD has no void border
            boundaries = np.empty((20, 1), dtype=object)  # one sparse boundary map per class
            for c in range(20):
                boundaries[c, 0] = scipy.sparse.csc_matrix(seg == c + 1)
            gtcls = {
                "Segmentation": seg,
                "Boundaries": boundaries,
                "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8)[:, None],
            }
            scipy.io.savemat(ds / "cls" / f"{i}.mat", {"GTcls": gtcls})
    return root


def write_folder(
    root: Path,
    ids: list[str],
    classes: list[str] | None,
    splits: dict[str, list[str]] | None = None,
    size=(24, 32),
    seed: int = 2,
    ext: str = ".jpg",
    palette: bool = True,
) -> Path:
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    n = len(classes) if classes else 3
    for i in ids:
        save_jpeg(root / "JPEGImages" / f"{i}{ext}", *size, rng)
        label = make_label(*size, n, rng)
        if palette:
            save_palette_png(label, root / "SegmentationClass" / f"{i}.png")
        else:
            Image.fromarray(label, mode="L").save(root / "SegmentationClass" / f"{i}.png")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    if splits:
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        for split, s_ids in splits.items():
            (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
                "\n".join(s_ids) + "\n"
            )
    return root


def write_nyud(root: Path, splits: dict[str, list[str]], size=(30, 40), seed: int = 4) -> Path:
    """NYUDv2 as prepared for FCN: <split>.txt, data/{images,hha,depth}/img_<id>.png,
    segmentation/img_<id>.mat with key 'segmentation' (uint8, 0 = void, 1..40)."""
    rng = np.random.default_rng(seed)
    for sub in ("data/images", "data/hha", "data/depth", "segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for i in ids:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                root / "data/images" / f"img_{i}.png"
            )
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                root / "data/hha" / f"img_{i}.png"
            )
            depth = rng.integers(500, 8000, size, dtype=np.uint16)  # millimetres
            Image.fromarray(depth).save(root / "data/depth" / f"img_{i}.png")
            seg = rng.integers(0, 41, size).astype(np.uint8)
            scipy.io.savemat(root / "segmentation" / f"img_{i}.mat", {"segmentation": seg})
    return root


SIFT_SUBDIR = "spatial_envelope_256x256_static_8outdoorcategories"


def write_siftflow(
    root: Path,
    train: list[str],
    test: list[str],
    unlabelled: list[str] = (),
    size=(32, 32),
    seed: int = 5,
) -> Path:
    """The SIFT Flow layout: Images/, SemanticLabels/, GeoLabels/ (.mat key 'S'; -1 in GeoLabels
    for unlabeled) and TestSet1.txt in its Windows form."""
    rng = np.random.default_rng(seed)
    for sub in ("Images", "SemanticLabels", "GeoLabels"):
        (root / sub / SIFT_SUBDIR).mkdir(parents=True, exist_ok=True)
    for i in [*train, *test, *unlabelled]:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            root / "Images" / SIFT_SUBDIR / f"{i}.jpg"
        )
        if i in unlabelled:
            continue
        sem = rng.integers(0, 34, size).astype(np.int32)  # 0 = unlabeled, 1..33
        geo = rng.integers(1, 4, size).astype(np.int32)
        geo[0, :] = -1  # unlabeled
        scipy.io.savemat(root / "SemanticLabels" / SIFT_SUBDIR / f"{i}.mat", {"S": sem})
        scipy.io.savemat(root / "GeoLabels" / SIFT_SUBDIR / f"{i}.mat", {"S": geo})
    (root / "TestSet1.txt").write_text("".join(f"{SIFT_SUBDIR}\\{i}.jpg\r\n" for i in test))
    return root
