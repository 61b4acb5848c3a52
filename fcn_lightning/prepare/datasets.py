"""The recipes of ``python -m fcn_lightning.prepare`` and ``data.download=true``: which folder of
an archive goes where, and the layout check that must pass first (docs/DATA.md). Each takes the
options of ``archives.prepare_once`` (``archive``, ``md5``, ``url``, ``say``)."""

from __future__ import annotations

import logging
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any

from ..data.layout import LayoutReport
from ..data.nyud import FOLDERS, LISTS, LISTS_SOURCE, NYUDDataModule
from ..data.siftflow import ENTRIES, SiftFlowDataModule
from ..data.voc import OFFICIAL_COUNTS, SBD_SPLITS, VOC_SPLITS, VOCDataModule
from ..errors import DataError, PrepareError
from .archives import prepare_once

log = logging.getLogger("fcn_lightning")


def _pascal(kind: str, root: str | Path, year: int | str = 2011, **options: Any) -> LayoutReport:
    """``voc``: ``root/VOCdevkit/VOC<year>`` from the official trainval tar; ``sbd``:
    ``root/benchmark_RELEASE/dataset`` from benchmark.tgz; md5 checked."""
    root, year, voc = Path(root).expanduser(), str(year), kind == "voc"
    wanted = f"VOCdevkit/VOC{year}" if voc else "benchmark_RELEASE/dataset"
    tail = "ImageSets/Segmentation/" if voc else r"(train|val)\.txt$"

    def check(at: Path) -> LayoutReport:
        return VOCDataModule(at, year=year).check_layout(VOC_SPLITS if voc else SBD_SPLITS)

    def hint(names: list[str]) -> str | None:  # another VOC release instead?
        held = sorted({m[1] for n in names if (m := re.match(r"(?:.*/)?VOCdevkit/VOC(\d{4})", n))})
        usable = [y for y in held if y in OFFICIAL_COUNTS and y != year]
        if usable:
            told = "it holds " + ", ".join(f"VOCdevkit/VOC{y}" for y in held)
            return f"{told}: pass --year {usable[0]}" if voc else None
        return "what it holds of it is incomplete" if voc and held else None

    prepare_once(
        root,
        kind,
        year if voc else "",
        targets=[root / wanted],
        check=lambda: check(root),
        what=f"VOC{year}" if voc else "SBD",
        wanted=wanted,
        pattern=rf"^(?P<prefix>(?:.*/)?{wanted})/{tail}",
        moves=[(".", wanted)],
        verify_staged=lambda at: check(at.parent.parent).raise_for_errors(),
        hint=hint,
        **options,
    )
    return VOCDataModule(root, year=year).check_layout(require_voc=voc)


prepare_voc, prepare_sbd = partial(_pascal, "voc"), partial(_pascal, "sbd")


def prepare_nyud(
    root: str | Path, *, lists: str | Path | None = None, **options: Any
) -> LayoutReport:
    """``root`` as NYUDv2's data.root from the reference's nyud.tar.gz; the split lists from
    the archive, else from the folder ``lists`` (copied in where absent), else named missing."""
    root, say = Path(root).expanduser(), options.get("say", print)
    lists = Path(lists).expanduser() if lists is not None else None
    copied = LISTS if lists is not None else ()
    for name in copied:  # refused even where nothing needs doing
        if not (lists / name).is_file():
            raise PrepareError(f"--lists {lists}: {name} not found there (see {LISTS_SOURCE})")
    targets = [root / "data", root / "segmentation"]

    def copy_lists(into: Path) -> None:  # never replaces a list
        for name in copied:
            if not (into / name).exists():
                shutil.copyfile(lists / name, into / name)
                say(f"{name} copied from {lists}")

    def verify_staged(staged: Path) -> None:
        copy_lists(staged)
        if all((staged / n).is_file() for n in LISTS):
            NYUDDataModule(staged).check_layout().raise_for_errors()
        elif not any((staged / "segmentation").glob("img_*.mat")):
            raise DataError("no segmentation/img_<id>.mat labels")
        elif not (staged / FOLDERS["images"]).is_dir():
            raise DataError(f"no {FOLDERS['images']}/ folder")

    to_copy = not all((root / n).is_file() for n in copied)
    prepare_once(
        root,
        "nyud",
        targets=targets,
        check=NYUDDataModule(root).check_layout,
        what="NYUDv2",
        wanted="NYUDv2 (the folder of segmentation/ and data/)",
        pattern=r"^(?P<prefix>(?:.*/)?)segmentation/img_[^/]+\.mat$",
        moves=[("data", "data"), *((n, n) for n in LISTS), ("segmentation", "segmentation")],
        verify_staged=verify_staged,
        before=(lambda: any(t.exists() for t in targets) and copy_lists(root)) if to_copy else None,
        **options,
    )
    return NYUDDataModule(root).check_layout()


def prepare_siftflow(root: str | Path, **options: Any) -> LayoutReport:
    """``root`` as SIFT Flow's data.root from SiftFlowDataset.zip."""
    root = Path(root).expanduser()
    prepare_once(
        root,
        "siftflow",
        targets=[root / e for e in ENTRIES],
        check=SiftFlowDataModule(root).check_layout,
        what="SIFT Flow",
        wanted="the SIFT Flow dataset (the folder of TestSet1.txt)",
        pattern=r"^(?P<prefix>(?:.*/)?)TestSet1\.txt$",
        moves=[(e, e) for e in ENTRIES],  # TestSet1.txt, which completes the layout, last
        verify_staged=lambda at: SiftFlowDataModule(at).check_layout().raise_for_errors(),
        **options,
    )
    return SiftFlowDataModule(root).check_layout()


def download(dm: VOCDataModule) -> None:
    """``data.download=true``: VOC of ``dm``'s year, and SBD where its splits read SBD."""
    voc, sbd = dm.needed()
    if voc:
        prepare_voc(dm.root, dm.year, say=log.info)
    if sbd:
        prepare_sbd(dm.root, year=dm.year, say=log.info)
