"""The recipes of ``python -m fcn_lightning.prepare`` and ``data.download=true``: which archive,
which of its folders goes where, and the layout check that must pass first (docs/DATA.md).
Each takes ``archive``, ``md5``, ``url`` and ``say`` (see ``archives.prepare_once``) and
returns the layout check of the root."""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.layout import LayoutReport
from ..data.nyud import FOLDERS, LISTS, LISTS_SOURCE, NYUDDataModule
from ..data.siftflow import ENTRIES, SiftFlowDataModule
from ..data.sources import ARCHIVES
from ..data.voc import OFFICIAL_COUNTS, SBD_SPLITS, VOC_SPLITS, VOCDataModule
from ..errors import DataError, PrepareError
from .archives import Hint, prepare_command, prepare_once

log = logging.getLogger("fcn_lightning")


def _other_release(year: str) -> Hint:
    """What a VOC archive without VOCdevkit/VOC<year> holds instead, if it is another VOC."""

    def hint(names: Sequence[str]) -> str | None:
        years = sorted({m[1] for n in names if (m := re.match(r"(?:.*/)?VOCdevkit/VOC(\d{4})", n))})
        usable = [y for y in years if y in OFFICIAL_COUNTS and y != year]
        held = ", ".join(f"VOCdevkit/VOC{y}" for y in years)
        return (
            f"it holds {held}" + (f": pass --year {usable[0]}" if usable else "") if years else None
        )

    return hint


def _check(dm: VOCDataModule, splits: Sequence[str]) -> LayoutReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dm.check_layout(splits)


def prepare_voc(root: str | Path, year: int | str = 2011, **options: Any) -> LayoutReport:
    """``root/VOCdevkit/VOC<year>`` from the official trainval tar, md5 checked."""
    root, year = Path(root).expanduser(), str(year)
    dm, info = VOCDataModule(root, year=year), ARCHIVES[f"voc{year}"]
    prepare_once(
        root,
        info,
        targets=[dm.voc_dir],
        check=lambda: _check(dm, VOC_SPLITS),
        what=f"VOC{year}",
        wanted=f"VOCdevkit/VOC{year}",
        command=prepare_command("voc", root, info, year),
        pattern=rf"^(?P<prefix>(?:.*/)?VOCdevkit/VOC{year})/ImageSets/Segmentation/",
        moves=[(".", f"VOCdevkit/VOC{year}")],
        verify_staged=lambda staged: _check(
            VOCDataModule(staged.parent.parent, year=year), VOC_SPLITS
        ).raise_for_errors(),
        hint=_other_release(year),
        **options,
    )
    return dm.check_layout(require_voc=True)


def prepare_sbd(root: str | Path, *, year: int | str = 2011, **options: Any) -> LayoutReport:
    """``root/benchmark_RELEASE/dataset`` from benchmark.tgz, md5 checked; the check returned
    includes VOC of ``year`` if present."""
    root = Path(root).expanduser()
    dm, info = VOCDataModule(root, year=year), ARCHIVES["sbd"]
    prepare_once(
        root,
        info,
        targets=[dm.sbd_dir],
        check=lambda: _check(dm, SBD_SPLITS),
        what="SBD",
        wanted="benchmark_RELEASE/dataset",
        command=prepare_command("sbd", root, info),
        pattern=r"^(?P<prefix>(?:.*/)?benchmark_RELEASE/dataset)/(train|val)\.txt$",
        moves=[(".", "benchmark_RELEASE/dataset")],
        verify_staged=lambda staged: _check(
            VOCDataModule(staged.parent.parent), SBD_SPLITS
        ).raise_for_errors(),
        **options,
    )
    return dm.check_layout()


def prepare_nyud(
    root: str | Path, *, lists: str | Path | None = None, **options: Any
) -> LayoutReport:
    """``root`` as NYUDv2's data.root from the reference's nyud.tar.gz (no checksum published:
    the tar must read to its end). The split lists come from the archive, else from ``lists``
    (a folder of train.txt, val.txt, test.txt, copied in where absent), else the check names
    them."""
    root, say = Path(root).expanduser(), options.get("say", print)
    lists = Path(lists).expanduser() if lists is not None else None
    for name in LISTS if lists is not None else ():  # refused even where nothing needs doing
        if not (lists / name).is_file():
            raise PrepareError(f"--lists {lists}: {name} not found there (see {LISTS_SOURCE})")
    targets = [root / "data", root / "segmentation"]

    def copy_lists(into: Path) -> None:
        for name in LISTS if lists is not None else ():
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

    def before() -> None:  # lists added to an extracted copy (under the lock): never replaced
        if any(t.exists() for t in targets):
            copy_lists(root)

    to_copy = lists is not None and not all((root / n).is_file() for n in LISTS)
    prepare_once(
        root,
        ARCHIVES["nyud"],
        targets=targets,
        check=NYUDDataModule(root).check_layout,
        what="NYUDv2",
        wanted="NYUDv2 (the folder of segmentation/ and data/)",
        command=prepare_command("nyud", root, ARCHIVES["nyud"]),
        pattern=r"^(?P<prefix>(?:.*/)?)segmentation/img_[^/]+\.mat$",
        moves=[("data", "data"), *((n, n) for n in LISTS), ("segmentation", "segmentation")],
        verify_staged=verify_staged,
        before=before if to_copy else None,
        **options,
    )
    return NYUDDataModule(root).check_layout()


def prepare_siftflow(root: str | Path, **options: Any) -> LayoutReport:
    """``root`` as SIFT Flow's data.root from SiftFlowDataset.zip (no checksum published: the
    zip's CRCs and the layout are checked)."""
    root = Path(root).expanduser()
    prepare_once(
        root,
        ARCHIVES["siftflow"],
        targets=[root / e for e in ENTRIES],
        check=SiftFlowDataModule(root).check_layout,
        what="SIFT Flow",
        wanted="the SIFT Flow dataset (the folder of TestSet1.txt)",
        command=prepare_command("siftflow", root, ARCHIVES["siftflow"]),
        pattern=r"^(?P<prefix>(?:.*/)?)TestSet1\.txt$",
        moves=[(e, e) for e in ENTRIES],  # TestSet1.txt, which completes the layout, last
        verify_staged=lambda staged: SiftFlowDataModule(staged).check_layout().raise_for_errors(),
        **options,
    )
    return SiftFlowDataModule(root).check_layout()


def download(dm: VOCDataModule) -> None:
    """What ``data.download=true`` runs from ``VOCDataModule.prepare_data``: VOC of its year,
    and SBD where its splits read SBD, into its root where they are missing."""
    voc, sbd = dm.needed()
    if voc:
        prepare_voc(dm.root, dm.year, say=log.info)
    if sbd:
        prepare_sbd(dm.root, year=dm.year, say=log.info)
