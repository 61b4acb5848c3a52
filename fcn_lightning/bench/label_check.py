"""Label check: its time on a VOC + SBD sized corpus, the first check and the cached re-check.
The corpus (temporary, or kept in ``--root`` and reused) has the real label files' sizes and
formats: VOC2012 train and val palette PNGs with 255 borders, SBD train cls/<id>.mat GTcls
structs; ``--n`` shrinks it in the same proportions (docs/PERFORMANCE.md).

    python -m fcn_lightning.bench.label_check [--n 11411] [--workers auto|N] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from ..data import VOCDataModule, voc_palette
from ..data.base import loader_workers

VOC, SBD = "VOCdevkit/VOC2012/", "benchmark_RELEASE/dataset/"
SPLITS = {  # split: (label files in the real corpus, its list, their folder)
    "voc_train": (1464, VOC + "ImageSets/Segmentation/train.txt", VOC + "SegmentationClass"),
    "voc_val": (1449, VOC + "ImageSets/Segmentation/val.txt", VOC + "SegmentationClass"),
    "sbd_train": (8498, SBD + "train.txt", SBD + "cls"),
}
TOTAL = sum(s[0] for s in SPLITS.values())
SIZES = [(375, 500)] * 7 + [(500, 375)] * 2 + [(333, 500)]  # (H, W), as VOC's mix


def make_label(index: int, void_border: bool) -> np.ndarray:
    """A few objects (ellipses) of random classes on background, a 5 px 255 border on VOC's."""
    rng = np.random.default_rng(index)
    h, w = SIZES[index % len(SIZES)]
    label = np.zeros((h, w), np.uint8)
    for cls in rng.integers(1, 21, rng.integers(1, 4)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(20, h / 2), rng.uniform(20, w / 2)
        y0, y1 = max(0, int(cy - ry - 6)), min(h, int(cy + ry + 7))
        x0, x1 = max(0, int(cx - rx - 6)), min(w, int(cx + rx + 7))
        yy, xx = np.ogrid[y0:y1, x0:x1]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        box = label[y0:y1, x0:x1]
        if void_border:
            box[(inside > 1) & (inside <= (1 + 5 / min(ry, rx)) ** 2)] = 255
        box[inside <= 1] = cls
    return label


def write_one(job: tuple[int, Path]) -> None:
    """A VOC palette PNG or an SBD GTcls .mat struct, as ``job``'s path ends."""
    index, path = job
    label = make_label(index, void_border=path.suffix == ".png")
    if path.suffix == ".png":
        img = Image.fromarray(label, mode="P")
        img.putpalette([v for c in voc_palette() for v in c])
        img.save(path)
        return
    present = np.unique(label[label > 0]).astype(np.uint8)[:, None]
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(1, 21):  # a thin outline of each object, as SBD's boundaries
        mask = label == c
        outline = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, 1, 1)) if c in present else mask
        boundaries[c - 1, 0] = scipy.sparse.csc_matrix(outline)
    gtcls = {"Segmentation": label, "Boundaries": boundaries, "CategoriesPresent": present}
    scipy.io.savemat(path, {"GTcls": gtcls}, do_compression=True)


def build(root: Path, n: int, workers: int) -> None:
    """The corpus of ``n`` label files; the split lists written last, once it is complete."""
    jobs, ids, index = [], {}, 0
    for split, (real, _, folder) in SPLITS.items():
        count = max(1, round(real * n / TOTAL))
        ids[split] = [f"{2008 + (index + k) // 3000}_{index + k:06d}" for k in range(count)]
        (root / folder).mkdir(parents=True, exist_ok=True)
        suffix = ".mat" if split.startswith("sbd") else ".png"
        jobs += [(index + k, root / folder / f"{i}{suffix}") for k, i in enumerate(ids[split])]
        index += count
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_one, jobs, chunksize=64))
    for split, (_, listed, _) in SPLITS.items():
        (root / listed).parent.mkdir(parents=True, exist_ok=True)
        (root / listed).write_text("".join(f"{i}\n" for i in ids[split]))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fcn_lightning.bench.label_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--n", type=int, default=TOTAL, help="label files")
    parser.add_argument("--workers", default="auto", help="loader processes (data.num_workers)")
    parser.add_argument("--root", type=Path, default=None, help="keep the corpus there")
    args = parser.parse_args(argv)
    workers = loader_workers(args.workers)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ):  # restored after
        cache = Path(tmp) / "cache"
        os.environ["FCN_LIGHTNING_CACHE"] = str(cache)  # a cold cache each run
        root = args.root or Path(tmp) / "data"
        reused = (root / SPLITS["sbd_train"][1]).is_file()
        _, built = _timed(lambda: reused or build(root, args.n, max(1, workers)))
        counts = {k: len((root / s[1]).read_text().split()) for k, s in SPLITS.items()}
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        dm = VOCDataModule(
            root, year=2012, train_split="sbd_train+voc_train", val_split="val", num_workers=workers
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # classes absent from a shrunk corpus
            (first, cold), (again, warm) = _timed(dm.check_labels), _timed(dm.check_labels)
        assert again.from_cache and not first.from_cache
        (cache_file,) = cache.glob("*.json")
        files = sum(counts.values())
        print(
            f"corpus: {files} label files ({counts['voc_train'] + counts['voc_val']} VOC PNGs, "
            f"{counts['sbd_train']} SBD .mat), {size / 2**20:.0f} MiB, "
            + (f"reused from {root}" if reused else f"written in {built:.1f} s")
        )
        print(f"first check:  {cold:6.2f} s  ({files / cold:.0f} files/s, {workers} workers)")
        cache_mib = cache_file.stat().st_size / 2**20
        print(f"cached check: {warm:6.2f} s  (cache file {cache_mib:.1f} MiB)")
        print(first.format())


if __name__ == "__main__":
    main()
