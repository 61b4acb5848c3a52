"""Data loader: images per second of one loader worker, on one CPU thread, decoding alone and
decoding + checks + the training transforms, on synthetic 500x375 JPEGs in VOC's layout; the best
of ``--repeat`` passes (docs/PERFORMANCE.md).

    python -m fcn_lightning.bench.data_loader [--images 64] [--crop 320] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from ..data import FolderDataModule, SyntheticDataModule, read_image, read_label_png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fcn_lightning.bench.data_loader", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--crop", type=int, default=320)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        syn = SyntheticDataModule(train_size=args.images, val_size=1, image_size=375)
        syn.write_voc(root, splits=("train",))
        for png in (root / "JPEGImages").glob("*.png"):  # 500x375 JPEGs, as in VOC
            Image.open(png).resize((500, 375)).save(png.with_suffix(".jpg"), quality=90)
            png.unlink()
        for png in (seg := root / "SegmentationClass").glob("*.png"):
            Image.open(png).resize((500, 375), Image.NEAREST).save(png)
        dm = FolderDataModule(root, train_split="train", crop_size=args.crop)
        ds = dm.make_dataset("train", dm.train_transforms())

        def rate(read: Callable[[int], object]) -> float:  # img/s of the best pass
            each = range(len(ds))
            passes = timeit.repeat(lambda: [read(i) for i in each], number=1, repeat=args.repeat)
            return len(ds) / min(passes)

        def decode(i: int) -> tuple:
            return read_image(dm.image_path(ds.ids[i])), read_label_png(seg / f"{ds.ids[i]}.png")

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one loader worker = one core
        try:
            decoded, full = rate(decode), rate(ds.__getitem__)
        finally:
            torch.set_num_threads(threads)
    print(f"{args.images} JPEGs 500x375, 1 thread, best of {args.repeat}")
    print(f"decode image + label:              {decoded:8.1f} img/s")
    print(f"decode + check + train transforms: {full:8.1f} img/s  (crop {args.crop})")


if __name__ == "__main__":
    main()
