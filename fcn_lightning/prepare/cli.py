"""Fetch, verify and extract a dataset into the layout its DataModule reads (docs/DATA.md).

    python -m fcn_lightning.prepare voc --year 2011 --root /data/pascal
    python -m fcn_lightning.prepare sbd --root /data/pascal
    python -m fcn_lightning.prepare voc --root /data/pascal --url https://mirror.example/VOC2011.tar
    python -m fcn_lightning.prepare siftflow --root /data/SiftFlowDataset --archive ~/SiftFlowDataset.zip
    python -m fcn_lightning.prepare nyud --root /data/nyud --archive ~/nyud.tar.gz --lists ~/fcn/data/nyud
    python -m fcn_lightning.prepare check voc --year 2011 --root /data/pascal

The work is done by the data modules (``data/archives.py``, ``prepare_voc`` and ``prepare_sbd``
in ``data/voc.py``, ``prepare_siftflow``, ``prepare_nyud``), the same code that
``VOCDataModule(download=True)`` runs; this module is the command line. SIGTERM and SIGHUP
stop it as Ctrl+C does: the temporary extraction folder is removed, and it exits 128 + signal.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..data.layout import LayoutReport
from ..data.nyud import NYUDDataModule
from ..data.siftflow import SiftFlowDataModule
from ..data.sources import ARCHIVES
from ..data.voc import VOCDataModule
from ..errors import DataError, PrepareError
from .archives import not_a_folder
from .datasets import prepare_nyud, prepare_sbd, prepare_siftflow, prepare_voc

CHECKSUMS = {
    "voc": "its md5 is checked against the published one (torchvision's table)",
    "sbd": "its md5 is checked against the published one (torchvision's table)",
    "siftflow": "no checksum is published: the zip's CRCs and the finished layout are checked",
    "nyud": "no checksum is published: the tar must read to its end and the finished layout "
    "is checked",
}
ABOUT = {
    "voc": "PASCAL VOC segmentation (VOCdevkit/VOC<year>) from the trainval tar",
    "sbd": "SBD (benchmark_RELEASE/dataset) from benchmark.tgz; with VOC2011 it gives seg11valid",
    "siftflow": "SIFT Flow (Images/, SemanticLabels/, GeoLabels/, TestSet1.txt) from its zip",
    "nyud": "NYUDv2 as the FCN reference prepared it (data/, segmentation/, split lists)",
}

EXAMPLES = """examples:
  python -m fcn_lightning.prepare voc --year 2011 --root /data/pascal
  python -m fcn_lightning.prepare sbd --root /data/pascal       (with VOC2011: seg11valid)
  python -m fcn_lightning.prepare voc --year 2012 --root /data/pascal \\
      --archive ~/Downloads/VOCtrainval_11-May-2012.tar          (no network needed)
  python -m fcn_lightning.prepare sbd --root /data/pascal \\
      --url https://mirror.example/benchmark.tgz                 (a mirror; md5 still checked)
  python -m fcn_lightning.prepare siftflow --root /data/SiftFlowDataset --archive SiftFlowDataset.zip
  python -m fcn_lightning.prepare nyud --root /data/nyud --archive nyud.tar.gz --lists fcn/data/nyud
  python -m fcn_lightning.prepare check voc --year 2011 --root /data/pascal
Then train with data.root set to --root (e.g. data=voc data.root=/data/pascal data.year=2011)."""


DEFAULT_YEAR = "2011"  # as data=voc (conf/data/voc.yaml): the paper's, with seg11valid


def _archive_of(name: str, year: str) -> str:
    archive = ARCHIVES[f"voc{year}" if name == "voc" else name]
    return f"{archive.filename} from {archive.url}"


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that it unwinds as on Ctrl+C: the
    temporary extraction folder removed, the lock released."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Stopped` while the block runs (the main thread
    only: Python's rule); the previous handlers come back after it. A second signal while
    the first unwinds is ignored, so that the clean-up finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m fcn_lightning.prepare",
        description=(
            "Fetch (or take with --archive), verify and extract a dataset into the layout its "
            "DataModule reads, then print the layout check: per split, the images and labels "
            "found against the official counts. Extraction goes to a temporary folder beside "
            "the target and is moved into place only when complete; an existing complete "
            "dataset is left alone (running twice is harmless). See docs/DATA.md."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("voc", "sbd", "siftflow", "nyud"):
        sub = commands.add_parser(
            name,
            help=ABOUT[name],
            description=f"{ABOUT[name]}. The archive: "
            + (
                f"{_archive_of(name, '2011')} (VOC2012: {_archive_of(name, '2012')})"
                if name == "voc"
                else _archive_of(name, "")
            )
            + f"; {CHECKSUMS[name]}.",
        )
        sub.add_argument(
            "--root",
            required=True,
            type=Path,
            help="the folder to prepare: data.root of the training config"
            + (" (VOC and SBD share one)" if name in ("voc", "sbd") else ""),
        )
        if name in ("voc", "sbd"):
            sub.add_argument(
                "--year",
                choices=("2011", "2012"),
                default=DEFAULT_YEAR,
                help=(
                    "VOC release (seg11valid, the paper's validation set, needs 2011 + SBD; "
                    "data=voc's data.year is 2011 too)"
                    if name == "voc"
                    else "the VOC release the printed check includes, if present"
                )
                + " (default: %(default)s)",
            )
        source = sub.add_mutually_exclusive_group()
        source.add_argument(
            "--archive",
            type=Path,
            help="an archive you already have (no network needed): nothing is downloaded. "
            "Without it, the archive is downloaded into --root (resumable)",
        )
        source.add_argument(
            "--url",
            metavar="URL",
            help="download from this address (a mirror) instead of the official one above; "
            "the md5 check still applies unless --md5 replaces it",
        )
        sub.add_argument(
            "--md5",
            metavar="HEX",
            help="the archive's expected md5 (a mirror's copy, or a checksum you trust); "
            "replaces the published one",
        )
        if name == "nyud":
            sub.add_argument(
                "--lists",
                type=Path,
                metavar="FOLDER",
                help="a folder holding train.txt, val.txt, test.txt (the reference repository's "
                "data/nyud/), copied in where absent",
            )
    check = commands.add_parser(
        "check",
        help="only print the layout check of a prepared folder (exit status 1 if files are "
        "missing)",
        description="The layout check of a prepared folder: per split, images and labels "
        "found against the official counts. Count differences are warnings (a subset is "
        "fine); a file a split lists but that is absent is an error (exit status 1).",
    )
    check.add_argument("dataset", choices=("voc", "siftflow", "nyud"))
    check.add_argument("--root", required=True, type=Path, help="data.root of the dataset")
    check.add_argument(
        "--year",
        choices=("2011", "2012"),
        default=DEFAULT_YEAR,
        help="VOC release, as data.year (default: %(default)s)",
    )
    return top


def check(dataset: str, root: Path, year: str = DEFAULT_YEAR) -> LayoutReport:
    """The layout check of a prepared folder, through its DataModule: what training with
    that data.root reads (for VOC: VOC of ``year`` is required, SBD checked if present)."""
    if problem := not_a_folder(root):
        raise DataError(f"--root: {problem}")
    if not root.is_dir():
        raise DataError(f"{root} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dataset == "voc":
            return VOCDataModule(root, year=year).check_layout(require_voc=True)
        if dataset == "siftflow":
            return SiftFlowDataModule(root).check_layout()
        return NYUDDataModule(root).check_layout()


def run(args: argparse.Namespace) -> LayoutReport:
    if args.command == "check":
        return check(args.dataset, args.root.expanduser(), args.year)
    common = {"archive": args.archive, "md5": args.md5, "url": args.url}
    if args.command == "voc":
        return prepare_voc(args.root, args.year, **common)
    if args.command == "sbd":
        return prepare_sbd(args.root, year=args.year, **common)
    if args.command == "siftflow":
        return prepare_siftflow(args.root, **common)
    return prepare_nyud(args.root, lists=args.lists, **common)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with stop_on_signals():
            report = run(args)
    except (PrepareError, DataError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGTERM / SIGHUP (Stopped)
        signum = getattr(err, "signum", signal.SIGINT)
        how = "Interrupted" if signum == signal.SIGINT else f"Stopped by {err}"
        print(
            f"{how}: nothing was moved into place, no temporary folder is left (a download "
            "resumes)",
            file=sys.stderr,
        )
        return 128 + signum
    print(report.format())
    if not report.ok:
        print("Error: the layout is incomplete (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
