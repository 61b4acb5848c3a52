"""Fixture writers: tiny datasets in each official on-disk format."""

from __future__ import annotations

import struct
import zlib
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


# --------------------------------------------------------------------------- varied, real-world files
# Colour of each class in the varied scenes (255: the void border), so image and label agree.
SCENE_COLOURS = 40 + 0.7 * np.array(voc_palette(), np.float32)
SCENE_COLOURS[0], SCENE_COLOURS[255] = (40, 60, 90), (230, 230, 230)


def scene(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An RGB picture of a label: each class a flat colour with a little noise."""
    image = SCENE_COLOURS[label] + rng.normal(0, 4, (*label.shape, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def save_varied_image(rgb: np.ndarray, path: Path, kind: str) -> Path:
    """Save an RGB picture as one of the formats found in the wild; returns the file written.

    kind: rgb_jpeg, gray_jpeg, cmyk_jpeg, rgba_png, la_png, gray16_png (16-bit greyscale, the
    grey levels times 257), palette_png, palette_alpha_png (palette with a transparent entry),
    bilevel_png (1-bit).
    """
    img = Image.fromarray(rgb)
    ext = ".jpg" if kind.endswith("jpeg") else ".png"
    path = path.with_suffix(ext)
    if kind == "rgb_jpeg":
        img.save(path, quality=92)
    elif kind == "gray_jpeg":
        img.convert("L").save(path, quality=92)
    elif kind == "cmyk_jpeg":
        img.convert("CMYK").save(path, quality=92)
    elif kind == "rgba_png":
        alpha = np.full(rgb.shape[:2], 128, np.uint8)
        Image.fromarray(np.dstack([rgb, alpha])).save(path)
    elif kind == "la_png":
        img.convert("LA").save(path)
    elif kind == "gray16_png":
        grey = np.asarray(img.convert("L")).astype(np.uint16) * 257
        Image.fromarray(grey).save(path)
    elif kind in ("palette_png", "palette_alpha_png"):
        pal = img.quantize(64, dither=Image.Dither.NONE)
        if kind == "palette_alpha_png":
            pal.save(path, transparency=0)
        else:
            pal.save(path)
    elif kind == "bilevel_png":
        img.convert("L").point(lambda v: 255 if v >= 128 else 0).convert("1").save(path)
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return path


def save_png16_rgb(rgb16: np.ndarray, path: Path) -> Path:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


VARIED_VOC = [  # (id, kind, (h, w)): what VOC's JPEGImages holds, in several sizes and orientations
    ("2012_000001", "rgb_jpeg", (30, 40)),
    ("2012_000002", "rgb_jpeg", (40, 30)),
    ("2012_000003", "gray_jpeg", (28, 36)),
    ("2012_000004", "cmyk_jpeg", (36, 28)),
    ("2012_000005", "rgb_jpeg", (32, 48)),
    ("2012_000006", "gray_jpeg", (40, 30)),
    ("2012_000007", "cmyk_jpeg", (30, 40)),
    ("2012_000008", "rgb_jpeg", (48, 36)),
]
VARIED_VOC_VAL = ["2012_000005", "2012_000006", "2012_000007", "2012_000008"]


def write_varied_voc(root: Path, year: int = 2012, seed: int = 0) -> Path:
    """VOC layout as varied as the real data but tiny: RGB, greyscale and CMYK JPEGs, landscape
    and portrait; palette labels with 255 borders, two as plain 'L' index PNGs; 4 val images of
    different widths."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for n, (i, kind, size) in enumerate(VARIED_VOC):
        label = make_label(*size, 21, rng)
        save_varied_image(scene(label, rng), voc / "JPEGImages" / i, kind)
        if n % 4 == 3:
            Image.fromarray(label).save(voc / "SegmentationClass" / f"{i}.png")  # mode 'L'
        else:
            save_palette_png(label, voc / "SegmentationClass" / f"{i}.png")
    lists = voc / "ImageSets" / "Segmentation"
    train = [i for i, _, _ in VARIED_VOC if i not in VARIED_VOC_VAL]
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in VARIED_VOC_VAL))
    return root


VARIED_FOLDER = [  # (id, kind, (h, w)): everything a user's own folder may hold
    ("rgb", "rgb_jpeg", (30, 40)),
    ("gray", "gray_jpeg", (40, 30)),
    ("cmyk", "cmyk_jpeg", (36, 28)),
    ("rgba", "rgba_png", (28, 36)),
    ("la", "la_png", (30, 40)),
    ("gray16", "gray16_png", (40, 30)),
    ("palette", "palette_png", (32, 48)),
    ("palette_alpha", "palette_alpha_png", (30, 40)),
    ("bilevel", "bilevel_png", (24, 32)),
]
VARIED_FOLDER_VAL = ["gray16", "rgba", "palette_alpha"]


def write_varied_folder(
    root: Path, classes: tuple[str, ...] = ("background", "cat", "dog", "car"), seed: int = 0
) -> Path:
    """A user's folder in VOC layout whose images come in every common format (.jpg and .png:
    greyscale, CMYK, RGBA, LA, 16-bit greyscale, palette with and without transparency, 1-bit),
    with palette and 'L' labels, classes.txt and train/val lists."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, (i, kind, size) in enumerate(VARIED_FOLDER):
        label = make_label(*size, len(classes), rng)
        save_varied_image(scene(label, rng), root / "JPEGImages" / i, kind)
        if n % 3 == 2:
            Image.fromarray(label).save(root / "SegmentationClass" / f"{i}.png")
        else:
            save_palette_png(label, root / "SegmentationClass" / f"{i}.png")
    lists = root / "ImageSets" / "Segmentation"
    train = [i for i, _, _ in VARIED_FOLDER if i not in VARIED_FOLDER_VAL]
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in VARIED_FOLDER_VAL))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def write_binary_masks_folder(
    root: Path, n_train: int = 4, n_val: int = 2, size=(30, 40), seed: int = 6
) -> Path:
    """The home-made binary format: JPEG photos and 'L' masks saved as 0 / 255 (object = 255),
    with classes.txt (background, object) and train/val lists."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    splits = {
        "train": [f"img_{k:03d}" for k in range(n_train)],
        "val": [f"img_{k:03d}" for k in range(n_train, n_train + n_val)],
    }
    for split, ids in splits.items():
        for i in ids:
            mask = np.zeros(size, np.uint8)
            cy, cx = rng.integers(5, size[0] - 5), rng.integers(5, size[1] - 5)
            yy, xx = np.mgrid[: size[0], : size[1]]
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(9, 40)] = 255
            save_varied_image(scene(np.minimum(mask, 1), rng), root / "JPEGImages" / i, "rgb_jpeg")
            Image.fromarray(mask).save(root / "SegmentationClass" / f"{i}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for i in ids)
        )
    (root / "classes.txt").write_text("background\nobject\n")
    return root


def one_head(sample):
    """(image, labels of the single head "out") of a sample or batch ``(image, {"out": labels})``."""
    return sample[0], sample[1]["out"]
