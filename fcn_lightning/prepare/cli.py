"""``python -m fcn_lightning.prepare``: the command line over ``datasets`` (docs/DATA.md).
SIGTERM and SIGHUP stop it as Ctrl+C does (the temporary folder removed, exit 128 + signal)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from ..data.layout import LayoutReport
from ..data.nyud import NYUDDataModule
from ..data.siftflow import SiftFlowDataModule
from ..data.sources import ARCHIVES
from ..data.voc import VOCDataModule
from ..errors import DataError
from . import datasets
from .archives import not_a_folder

ABOUT = {
    "voc": "PASCAL VOC segmentation (VOCdevkit/VOC<year>) from the trainval tar; md5 checked",
    "sbd": "SBD (benchmark_RELEASE/dataset) from benchmark.tgz; md5 checked",
    "siftflow": "SIFT Flow from its zip (no checksum published: its CRCs and layout checked)",
    "nyud": "NYUDv2 as the FCN reference prepared it (no checksum published: layout checked)",
}
EXAMPLES = """examples:
  python -m fcn_lightning.prepare voc --year 2011 --root /data/pascal
  python -m fcn_lightning.prepare sbd --root /data/pascal --url https://mirror.example/benchmark.tgz
  python -m fcn_lightning.prepare nyud --root /data/nyud --archive nyud.tar.gz --lists fcn/data/nyud
  python -m fcn_lightning.prepare check voc --year 2011 --root /data/pascal
Then train with data.root set to --root (e.g. data=voc data.root=/data/pascal data.year=2011)."""
YEAR = dict(choices=("2011", "2012"), default="2011", help="VOC release (default: %(default)s)")
STOPS = [s for n in ("SIGTERM", "SIGHUP") if (s := getattr(signal, n, None))]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m fcn_lightning.prepare",
        description="Fetch (or take with --archive), verify and extract a dataset into the "
        "layout its DataModule reads, then print the layout check. See docs/DATA.md.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, about in ABOUT.items():
        url = ARCHIVES["voc2011" if name == "voc" else name].url
        sub = commands.add_parser(name, help=about, description=f"{about}. Archive: {url}")
        sub.add_argument("--root", required=True, help="the folder: data.root")
        if name in ("voc", "sbd"):
            sub.add_argument("--year", **YEAR)
        source = sub.add_mutually_exclusive_group()
        source.add_argument("--archive", type=Path, help="a copy you have: nothing is downloaded")
        source.add_argument("--url", help="download from this mirror instead (md5 still checked)")
        sub.add_argument("--md5", metavar="HEX", help="the expected md5, replacing the published")
        if name == "nyud":
            sub.add_argument("--lists", type=Path, help="a folder of train.txt, val.txt, test.txt")
    check = commands.add_parser("check", help="only the layout check (exit status 1: missing)")
    check.add_argument("dataset", choices=("voc", "siftflow", "nyud"))
    check.add_argument("--root", required=True, help="data.root of the dataset")
    check.add_argument("--year", **YEAR)
    return top


def run(args: argparse.Namespace) -> LayoutReport:
    if not args.root:  # not Path(""), which is the current folder
        raise DataError(
            "--root is empty (an unset variable?): give the folder the dataset goes in (data.root)"
        )
    root = Path(args.root).expanduser()
    if args.command != "check":
        options = {k: v for k, v in vars(args).items() if k not in ("command", "root")}
        return getattr(datasets, f"prepare_{args.command}")(root, **options)
    if problem := not_a_folder(root):  # check: the layout as training reads it
        raise DataError(f"--root: {problem}")
    if not root.is_dir():
        raise DataError(f"{root} does not exist")
    if args.dataset == "voc":
        return VOCDataModule(root, year=args.year).check_layout(require_voc=True)
    module = SiftFlowDataModule if args.dataset == "siftflow" else NYUDDataModule
    return module(root).check_layout()


def stop(signum: int, frame: object) -> None:
    """SIGTERM, SIGHUP: KeyboardInterrupt(<name>), once (a second is ignored: the clean-up
    finishes)."""
    for s in STOPS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # signals are its own
    previous = {s: signal.signal(s, stop) for s in STOPS if main_thread}
    try:
        report = run(args)
    except DataError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGTERM / SIGHUP (named)
        how = f"Stopped by {err.args[0]}" if err.args else "Interrupted"
        print(f"{how}: nothing was moved into place (a download resumes)", file=sys.stderr)
        return 128 + (signal.Signals[err.args[0]] if err.args else signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler or signal.SIG_DFL)
    print(report.format())
    if not report.ok:
        print("Error: the layout is incomplete (see the errors above)", file=sys.stderr)
        return 1
    return 0
