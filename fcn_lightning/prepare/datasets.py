"""The per-dataset recipes of ``python -m fcn_lightning.prepare``: which archive, where its
folders go, and the layout check that must pass before they are moved into place
(docs/DATA.md)."""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..data.layout import LayoutReport
from ..data.nyud import FOLDERS, LISTS, LISTS_SOURCE, NYUDDataModule
from ..data.siftflow import ENTRIES, SiftFlowDataModule
from ..data.sources import ARCHIVES
from ..data.voc import OFFICIAL_COUNTS, SBD_SPLITS, VOC_SPLITS, VOCDataModule
from ..errors import PrepareError
from .archives import install, prepare_command, prepare_once

log = logging.getLogger("fcn_lightning")


# --------------------------------------------------------------------------- preparation
def _other_release(year: str) -> Callable[[Sequence[Any]], str | None]:
    """What a VOC archive without VOCdevkit/VOC<year> holds instead, if it is another VOC."""

    def hint(members: Sequence[Any]) -> str | None:
        pattern = re.compile(r"^(?:.*/)?VOCdevkit/VOC(\d{4})(?:/|$)")
        years = sorted({m.group(1) for x in members if (m := pattern.match(x.name))})
        if not years:
            return None
        held = ", ".join(f"VOCdevkit/VOC{y}" for y in years)
        usable = [y for y in years if y in OFFICIAL_COUNTS and y != year]
        return f"it holds {held}" + (f": pass --year {usable[0]}" if usable else "")

    return hint


def _quiet_check(dm: VOCDataModule, splits: Sequence[str]) -> LayoutReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dm.check_layout(splits)


def prepare_voc(
    root: str | Path,
    year: int | str = 2011,
    *,
    archive: str | Path | None = None,
    md5: str | None = None,
    url: str | None = None,
    say: Callable[[str], None] = print,
) -> LayoutReport:
    """``root/VOCdevkit/VOC<year>`` from the official trainval archive (``archive``: a copy on
    disk; else downloaded into ``root``, from ``url`` if given: a mirror), its md5 checked
    (torchvision's table, or ``md5``). Returns the layout check of ``root``, VOC of ``year``
    required. A complete one is left alone, writing nothing (a read-only root is fine)."""
    root, year = Path(root).expanduser(), str(year)
    dm = VOCDataModule(root, year=year)
    info = ARCHIVES[f"voc{year}"]

    def install_from(path: Path) -> None:
        install(
            path,
            root,
            pattern=rf"^(?P<prefix>(?:.*/)?VOCdevkit/VOC{year})/ImageSets/Segmentation/",
            what=f"VOCdevkit/VOC{year}",
            moves=[(".", f"VOCdevkit/VOC{year}")],
            verify_staged=lambda staged: _quiet_check(
                VOCDataModule(staged.parent.parent, year=year), VOC_SPLITS
            ).raise_for_errors(),
            say=say,
            hint=_other_release(year),
        )
        say(f"VOC{year} is in {dm.voc_dir}")

    prepare_once(
        root,
        info,
        targets=[dm.voc_dir],
        check=lambda: _quiet_check(dm, VOC_SPLITS),
        what=f"VOC{year}",
        command=prepare_command("voc", root, info, year),
        install_from=install_from,
        archive=archive,
        md5=md5,
        url=url,
        say=say,
    )
    return dm.check_layout(require_voc=True)


def prepare_sbd(
    root: str | Path,
    *,
    archive: str | Path | None = None,
    md5: str | None = None,
    url: str | None = None,
    year: int | str = 2011,
    say: Callable[[str], None] = print,
) -> LayoutReport:
    """``root/benchmark_RELEASE/dataset`` from SBD's benchmark.tgz (``archive`` or downloaded,
    from ``url`` if given), its md5 checked. Returns the layout check of ``root`` (with VOC of
    ``year`` if present)."""
    root = Path(root).expanduser()
    dm = VOCDataModule(root, year=year)
    info = ARCHIVES["sbd"]

    def install_from(path: Path) -> None:
        install(
            path,
            root,
            pattern=r"^(?P<prefix>(?:.*/)?benchmark_RELEASE/dataset)/(train|val)\.txt$",
            what="benchmark_RELEASE/dataset",
            moves=[(".", "benchmark_RELEASE/dataset")],
            verify_staged=lambda staged: _quiet_check(
                VOCDataModule(staged.parent.parent), SBD_SPLITS
            ).raise_for_errors(),
            say=say,
        )
        say(f"SBD is in {dm.sbd_dir}")

    prepare_once(
        root,
        info,
        targets=[dm.sbd_dir],
        check=lambda: _quiet_check(dm, SBD_SPLITS),
        what="SBD",
        command=prepare_command("sbd", root, info),
        install_from=install_from,
        archive=archive,
        md5=md5,
        url=url,
        say=say,
    )
    return dm.check_layout()


def _check_lists(lists: Path | None) -> None:
    """``lists`` (if given) holds the three split lists."""
    if lists is None:
        return
    lists = Path(lists).expanduser()
    for name in LISTS:
        if not (lists / name).is_file():
            raise PrepareError(
                f"--lists {lists}: {name} not found there (the reference's lists: {LISTS_SOURCE})"
            )


def _copy_lists(lists: Path | None, into: Path, say: Callable[[str], None]) -> None:
    """Copy the split lists from ``lists`` into ``into`` where they are absent there."""
    if lists is None:
        return
    _check_lists(lists)
    lists = Path(lists).expanduser()
    for name in LISTS:
        if not (into / name).exists():
            shutil.copyfile(lists / name, into / name)
            say(f"{name} copied from {lists}")


def prepare_nyud(
    root: str | Path,
    *,
    archive: str | Path | None = None,
    md5: str | None = None,
    url: str | None = None,
    lists: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> LayoutReport:
    """``root`` as NYUDv2's data.root (data/{images,hha,depth}/, segmentation/, the split lists)
    from the reference's nyud.tar.gz (``archive``, or downloaded into ``root``, from ``url``
    if given): the folder in
    it that holds ``segmentation/img_<id>.mat`` and ``data/``. No checksum is published: the tar
    must read to its end, and the finished layout is checked (``md5`` if you have one). The
    split lists come from the archive if it has them, else from ``lists`` (a folder holding
    train.txt, val.txt, test.txt), else the check names what to fetch."""
    root = Path(root).expanduser()
    dm = NYUDDataModule(root)
    info = ARCHIVES["nyud"]
    _check_lists(lists)  # named but wrong: refused even where nothing needs doing
    targets = [root / "data", root / "segmentation"]

    def copy_lists() -> None:  # lists added to an extracted copy: never replaced
        if any(t.exists() for t in targets):
            _copy_lists(lists, root, say)

    def install_from(path: Path) -> None:
        def verify_staged(staged: Path) -> None:
            _copy_lists(lists, staged, say)
            report = NYUDDataModule(staged).check_layout()
            if all((staged / n).is_file() for n in LISTS):
                report.raise_for_errors()
            elif not any((staged / "segmentation").glob("img_*.mat")):
                raise PrepareError(f"{path} holds no segmentation/img_<id>.mat labels")
            elif not (staged / FOLDERS["images"]).is_dir():
                raise PrepareError(f"{path} holds no {FOLDERS['images']}/ folder")

        install(
            path,
            root,
            pattern=r"^(?P<prefix>(?:.*/)?)segmentation/img_[^/]+\.mat$",
            what="NYUDv2 (the folder of segmentation/ and data/)",
            moves=[
                ("data", "data"),
                *((n, n) for n in LISTS),
                ("segmentation", "segmentation"),
            ],
            verify_staged=verify_staged,
            say=say,
        )
        say(f"NYUDv2 is in {root}")

    # lists to copy in: under the lock, before the check (else a read-only root is fine)
    to_copy = lists is not None and not all((root / n).is_file() for n in LISTS)
    prepare_once(
        root,
        info,
        targets=targets,
        check=dm.check_layout,
        what="NYUDv2",
        command=prepare_command("nyud", root, info),
        install_from=install_from,
        archive=archive,
        md5=md5,
        url=url,
        say=say,
        before=copy_lists if to_copy else None,
    )
    return dm.check_layout()


def prepare_siftflow(
    root: str | Path,
    *,
    archive: str | Path | None = None,
    md5: str | None = None,
    url: str | None = None,
    say: Callable[[str], None] = print,
) -> LayoutReport:
    """``root`` as SIFT Flow's data.root (Images/, SemanticLabels/, GeoLabels/, TestSet1.txt)
    from SiftFlowDataset.zip (``archive``, or downloaded into ``root``, from ``url`` if given).
    No checksum is published: the zip's CRCs and the finished layout are checked (``md5`` if
    you have one). A complete one is left alone, writing nothing."""
    root = Path(root).expanduser()
    dm = SiftFlowDataModule(root)
    info = ARCHIVES["siftflow"]

    def install_from(path: Path) -> None:
        install(
            path,
            root,
            pattern=r"^(?P<prefix>(?:.*/)?)TestSet1\.txt$",
            what="the SIFT Flow dataset (the folder of TestSet1.txt)",
            moves=[(e, e) for e in ENTRIES],
            verify_staged=lambda staged: (
                SiftFlowDataModule(staged).check_layout().raise_for_errors()
            ),
            say=say,
        )
        say(f"SIFT Flow is in {root}")

    prepare_once(
        root,
        info,
        targets=[root / e for e in ENTRIES],
        check=dm.check_layout,
        what="SIFT Flow",
        command=prepare_command("siftflow", root, info),
        install_from=install_from,
        archive=archive,
        md5=md5,
        url=url,
        say=say,
    )
    return dm.check_layout()


def download(dm: VOCDataModule) -> None:
    """What ``data.download=true`` runs from ``VOCDataModule.prepare_data``: VOC of its year,
    and SBD where its splits read SBD, into its root where they are missing."""
    voc, sbd = dm.needed()
    if voc:
        prepare_voc(dm.root, dm.year, say=log.info)
    if sbd:
        prepare_sbd(dm.root, year=dm.year, say=log.info)
