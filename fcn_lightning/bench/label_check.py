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
from unittest import mock

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from ..data import LabelReport, VOCDataModule, voc_palette
from ..data.base import loader_workers

SPLITS = {"voc_train": 1464, "voc_val": 1449, "sbd_train": 8498}
SIZES = [(375, 500)] * 7 + [(500, 375)] * 2 + [(333, 500)]  # (H, W), as VOC's mix
FOLDERS = {"voc": "VOCdevkit/VOC2012/SegmentationClass", "sbd": "benchmark_RELEASE/dataset/cls"}
FLAT_PALETTE = [v for c in voc_palette() for v in c]


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


def write_one(job: tuple[str, int, Path]) -> None:
    kind, index, path = job
    label = make_label(index, void_border=kind != "sbd")
    if kind == "sbd":
        boundaries = np.empty((20, 1), dtype=object)
        present = np.unique(label[label > 0]).astype(np.uint8)[:, None]
        for c in range(20):
            boundaries[c, 0] = scipy.sparse.csc_matrix(label.shape, dtype=bool)
        for c in present[:, 0]:  # a thin outline of each object, as SBD's boundaries
            mask = label == c
            boundaries[c - 1, 0] = scipy.sparse.csc_matrix(
                mask & ~(np.roll(mask, 1, 0) & np.roll(mask, 1, 1))
            )
        gtcls = {"Segmentation": label, "Boundaries": boundaries, "CategoriesPresent": present}
        scipy.io.savemat(path, {"GTcls": gtcls}, do_compression=True)
    else:
        img = Image.fromarray(label, mode="P")
        img.putpalette(FLAT_PALETTE)
        img.save(path)


def lists(root: Path) -> dict[str, Path]:
    voc = root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    sbd = root / "benchmark_RELEASE/dataset/train.txt"
    return {"voc_train": voc / "train.txt", "voc_val": voc / "val.txt", "sbd_train": sbd}


def build(root: Path, n: int, workers: int) -> dict[str, int]:
    counts = {k: max(1, round(v * n / sum(SPLITS.values()))) for k, v in SPLITS.items()}
    jobs, ids, index = [], {}, 0
    for split, count in counts.items():
        kind, folder = split[:3], root / FOLDERS[split[:3]]
        ids[split] = [f"{2008 + (index + k) // 3000}_{index + k:06d}" for k in range(count)]
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".mat" if kind == "sbd" else ".png"
        jobs += [(kind, index + k, folder / f"{i}{suffix}") for k, i in enumerate(ids[split])]
        index += count
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_one, jobs, chunksize=64))
    for split, path in lists(root).items():  # written last: a corpus with its lists is complete
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{i}\n" for i in ids[split]))
    return counts


def _timed(check: Callable[[], LabelReport]) -> tuple[LabelReport, float]:
    t0 = time.perf_counter()
    return check(), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fcn_lightning.bench.label_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--n", type=int, default=sum(SPLITS.values()), help="label files")
    parser.add_argument("--workers", default="auto", help="loader processes (data.num_workers)")
    parser.add_argument("--root", type=Path, default=None, help="keep the corpus there")
    args = parser.parse_args(argv)
    workers = loader_workers(args.workers)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ):  # restored after
        cache = Path(tmp) / "cache"
        os.environ["FCN_LIGHTNING_CACHE"] = str(cache)  # a cold cache each run
        root = args.root or Path(tmp) / "data"
        t0 = time.perf_counter()
        reused = lists(root)["sbd_train"].is_file()
        if reused:
            counts = {k: len(v.read_text().split()) for k, v in lists(root).items()}
        else:
            counts = build(root, args.n, max(1, workers))
        built = time.perf_counter() - t0
        files = sum(counts.values())
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        dm = VOCDataModule(
            root, year=2012, train_split="sbd_train+voc_train", val_split="val", num_workers=workers
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # classes absent from a shrunk corpus
            (first, cold), (again, warm) = _timed(dm.check_labels), _timed(dm.check_labels)
        assert again.from_cache and not first.from_cache
        (cache_file,) = cache.glob("*.json")
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
