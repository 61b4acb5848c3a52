"""Dataset archives: where they come from, their checksums, a resumable download, and an
extraction that never leaves a half-written dataset behind (``python -m fcn_lightning.prepare``,
``VOCDataModule(download=True)``; docs/DATA.md).

Extraction goes into a temporary folder beside the target (same file system), the layout is
checked there, and only then is each finished folder moved into place with a rename. The
archive's index (tar or zip) gives the space needed, checked before any byte is written.
torchvision's ``extract_archive`` does not fit here: it extracts every member with no member
filter (path traversal), no index and no control over a full disk, so only its checksum helpers
are reused.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from torchvision.datasets import SBDataset
from torchvision.datasets.utils import calculate_md5
from torchvision.datasets.voc import DATASET_YEAR_DICT
from tqdm.auto import tqdm

from .readers import DataError

try:  # POSIX: a lock that dies with its process
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock between concurrent preparations
    fcntl = None

LOCK_NAME = ".fcn_lightning-prepare.lock"
STAGING_PREFIX = ".prepare-tmp-"
CHUNK = 1 << 20


class PrepareError(DataError):
    """An archive could not be fetched, verified or extracted; the message says what to do."""


@dataclass(frozen=True)
class Archive:
    """One downloadable archive: ``md5`` is None where no checksum is published."""

    name: str
    url: str
    filename: str
    md5: str | None
    inner: str = ""  # where the dataset sits inside the archive, as torchvision knows it

    def with_md5(self, md5: str | None) -> Archive:
        return replace(self, md5=md5.lower()) if md5 else self


def _voc(year: str) -> Archive:
    entry = DATASET_YEAR_DICT[year]
    return Archive(f"VOC{year}", entry["url"], entry["filename"], entry["md5"], entry["base_dir"])


# The official archives. VOC and SBD: torchvision's table (url, file name, published md5).
# SIFT Flow and the reference's NYUDv2: no checksum is published, so the archive's own integrity
# (zip CRCs, a readable tar) and the finished layout's counts are checked instead.
ARCHIVES: dict[str, Archive] = {
    "voc2011": _voc("2011"),
    "voc2012": _voc("2012"),
    "sbd": Archive(
        "SBD", SBDataset.url, SBDataset.filename, SBDataset.md5, "benchmark_RELEASE/dataset"
    ),
    "siftflow": Archive(
        "SIFT Flow",
        "http://people.csail.mit.edu/celiu/LabelTransfer/SiftFlowDataset.zip",
        "SiftFlowDataset.zip",
        None,
    ),
    "nyud": Archive(
        "NYUDv2 (as prepared for FCN)",
        "http://dl.caffe.berkeleyvision.org/nyud.tar.gz",
        "nyud.tar.gz",
        None,
    ),
}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


# --------------------------------------------------------------------------- fetching
def verify(path: Path, md5: str | None, *, downloaded: bool = False) -> None:
    """Compare the file's md5 with ``md5`` (nothing to compare when None)."""
    if not md5:
        return
    actual = calculate_md5(path)
    if actual.lower() != md5.lower():
        if downloaded:
            todo = (
                f"The download is damaged or the server sent another file: delete {path} and "
                "run again to download it afresh"
            )
        else:
            todo = (
                f"Download it again (the copy may be damaged or incomplete); if it is a mirror's "
                f"copy you trust, pass its checksum: --md5 {actual}"
            )
        raise PrepareError(
            f"checksum mismatch for {path}: expected md5 {md5.lower()}, got {actual}. {todo}"
        )


def no_network(archive: Archive, dest: Path, reason: object, command: str) -> PrepareError:
    return PrepareError(
        f"cannot download {archive.url} ({reason}).\n"
        f"Without network access here, fetch that file ({archive.filename}) on a machine that "
        f"has it, copy it to this machine, e.g. to {dest}, and run:\n  {command}"
    )


def fetch(
    archive: Archive,
    folder: Path,
    *,
    path: Path | None = None,
    command: str = "python -m fcn_lightning.prepare ... --archive PATH",
    say: Callable[[str], None] = print,
    attempts: int = 3,
) -> Path:
    """The archive on disk, its checksum verified: ``path`` (the user's copy: never downloads),
    else ``folder/<filename>`` if present, else downloaded there (resuming ``<filename>.part``)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise PrepareError(f"--archive {path}: no such file")
        say(f"Using {path}" + (" (verifying its md5)" if archive.md5 else ""))
        verify(path, archive.md5)
        return path
    dest = folder / archive.filename
    if dest.is_file():
        say(f"Using {dest}, downloaded before" + (" (verifying its md5)" if archive.md5 else ""))
        verify(dest, archive.md5)
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(attempts):
        try:
            _download(archive.url, part, say)
            break
        except urllib.error.HTTPError as err:
            if err.code == 416:  # the .part already holds the whole file
                break
            raise no_network(archive, dest, f"HTTP {err.code} {err.reason}", command) from None
        except urllib.error.URLError as err:
            raise no_network(archive, dest, err.reason, command) from None
        except (OSError, http.client.HTTPException) as err:  # cut off: resume from the .part
            if getattr(err, "errno", None) == errno.ENOSPC:
                raise PrepareError(
                    f"the disk holding {folder} filled up while downloading {archive.url}; "
                    f"{part} keeps what arrived: free some space and run again to resume"
                ) from None
            if attempt == attempts - 1:
                raise PrepareError(
                    f"the download of {archive.url} was cut off {attempts} times ({err}); "
                    f"{part} keeps what arrived: run the same command again to resume"
                ) from None
            say(f"Download interrupted ({err}); resuming")
    verify(part, archive.md5, downloaded=True)
    part.rename(dest)
    return dest


def _download(url: str, part: Path, say: Callable[[str], None]) -> None:
    """Append the rest of ``url`` to ``part`` (an HTTP Range request from its current size)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:  # no Range support: start again
            say("The server does not resume downloads: starting from the beginning")
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if total is not None and length is not None:
            free = shutil.disk_usage(part.parent).free
            if free < int(length):
                raise PrepareError(
                    f"{part.parent} has {mib(free)} free; {url} needs {mib(int(length))} more"
                )
        if have:
            say(f"Resuming {part.name} at {mib(have)}")
        with (
            open(part, "ab" if have else "wb") as out,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5]) as bar,
        ):
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
        if total is not None and part.stat().st_size < total:
            raise ConnectionError(f"{part.stat().st_size} of {total} bytes arrived")


# --------------------------------------------------------------------------- archive index
@dataclass(frozen=True)
class Member:
    name: str  # posix path inside the archive, no leading './'
    size: int
    is_dir: bool


def damaged(path: Path, err: BaseException) -> PrepareError:
    return PrepareError(
        f"{path} is damaged or incomplete ({type(err).__name__}: {err}). Delete it and "
        "download it again (an interrupted copy or download is the usual cause)"
    )


ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zipfile.BadZipFile, zlib.error, gzip.BadGzipFile)


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def read_index(path: Path) -> list[Member]:
    """The members of a tar (any compression) or zip archive. A truncated or corrupt archive,
    or one with a member outside its folder (absolute or ``..``), raises PrepareError."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                members = [
                    Member(_clean(i.filename), i.file_size, i.is_dir()) for i in zf.infolist()
                ]
        else:
            with tarfile.open(path, "r:*") as tar:
                members = [
                    Member(_clean(m.name), m.size if m.isfile() else 0, m.isdir())
                    for m in tar.getmembers()
                ]
                # tarfile stops quietly at a cut; a whole tar ends with a zero block
                tar.fileobj.seek(tar.offset)
                end = tar.fileobj.read(tarfile.BLOCKSIZE)
                if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("it ends before its end-of-archive block")
    except ARCHIVE_ERRORS as err:
        raise damaged(path, err) from None
    for m in members:
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", m.name):
            raise PrepareError(
                f"{path} holds a member outside its own folder ({m.name!r}): refused. "
                "Is it the official archive?"
            )
    return members


def find_prefix(members: Sequence[Member], pattern: str, what: str, path: Path) -> str:
    """The folder inside the archive that ``pattern`` (a regex matched against member names,
    with a group ``prefix``) points to; the shortest if several."""
    found = sorted(
        {m.group("prefix").rstrip("/") for x in members if (m := re.match(pattern, x.name))},
        key=len,
    )
    if not found:
        raise PrepareError(f"{path} holds no {what}: is it the right archive?")
    return found[0]


def under(members: Sequence[Member], prefix: str) -> list[Member]:
    if not prefix:
        return list(members)
    return [m for m in members if m.name == prefix or m.name.startswith(prefix + "/")]


# --------------------------------------------------------------------------- extraction
def check_space(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise PrepareError(
            f"not enough free space in {folder}: {what} needs about {mib(need)}, "
            f"{mib(free)} are free. Free some space or choose a --root on a larger disk"
        )


def _full_disk(folder: Path, need: int, what: str) -> PrepareError:
    return PrepareError(
        f"the disk filled up while extracting {what} into {folder} (it needs about {mib(need)}); "
        "nothing was kept. Free some space or choose a --root on a larger disk"
    )


def extract(path: Path, members: Sequence[Member], into: Path, need: int) -> None:
    """Extract ``members`` of ``path`` into ``into`` (tar with the ``data`` filter where Python
    has it: no links out of the folder, no device files, no absolute paths)."""
    names = {m.name for m in members}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                infos = [i for i in zf.infolist() if _clean(i.filename) in names]
                for info in tqdm(infos, desc=f"extracting {path.name}", unit="file"):
                    zf.extract(info, into)  # reading a member checks its CRC
        else:
            with tarfile.open(path, "r:*") as tar:
                wanted = [m for m in tar.getmembers() if _clean(m.name) in names]
                bar = tqdm(wanted, desc=f"extracting {path.name}", unit="file")
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(into, members=bar, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    safe = [m for m in bar if m.isfile() or m.isdir()]
                    tar.extractall(into, members=safe)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _full_disk(into.parent, need, path.name) from None
        if isinstance(err, ARCHIVE_ERRORS):
            raise damaged(path, err) from None
        raise
    except ARCHIVE_ERRORS as err:
        if isinstance(err, tarfile.FilterError if hasattr(tarfile, "FilterError") else ()):
            raise PrepareError(
                f"{path}: refused member ({err}). Is it the official archive?"
            ) from None
        raise damaged(path, err) from None


@contextlib.contextmanager
def staging(parent: Path) -> Iterator[Path]:
    """A temporary folder in ``parent`` (same file system: the final move is a rename),
    removed on the way out whatever happens."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def locked(folder: Path, say: Callable[[str], None] = print) -> Iterator[None]:
    """One preparation at a time in ``folder`` (several processes of one job, two jobs)."""
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = folder / LOCK_NAME
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"Another process is preparing {folder}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if made and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                lock.unlink()  # a failed first run leaves no empty folder behind
                folder.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)


def already_prepared(
    targets: Sequence[Path], check: Callable[[], object], what: str, say: Callable[[str], None]
) -> bool:
    """True if the ``targets`` (what an installation moves into place) exist and ``check()``
    (a layout report: ``ok``, ``errors``) finds them complete: nothing to do. Raises if some
    exist but the layout is incomplete (never overwritten); False if none exists (an empty
    folder counts as absent)."""
    present = [t for t in targets if t.exists() and not (t.is_dir() and not any(t.iterdir()))]
    if not present:
        return False
    report = check()
    if report.ok:
        say(f"{what} is already prepared ({present[0]}): nothing to do")
        return True
    raise PrepareError(
        f"{', '.join(map(str, present))} exist(s) but the layout is incomplete:\n"
        + "\n".join(f"  {e}" for e in report.errors)
        + f"\nNothing was changed. Move it away (or delete it) and run again to extract {what} "
        "afresh, or complete it by hand"
    )


def install(
    path: Path,
    root: Path,
    *,
    pattern: str,
    what: str,
    moves: Sequence[tuple[str, str]],
    verify_staged: Callable[[Path], None],
    say: Callable[[str], None] = print,
) -> None:
    """Extract the folder of archive ``path`` that ``pattern`` finds (see :func:`find_prefix`)
    into a temporary folder in ``root``, run ``verify_staged(folder)`` on it (raises on a
    wrong layout), then rename each ``(inside, target)`` of ``moves`` from that folder to
    ``root / target``, in order: the entry that makes the layout usable goes last. Entries
    absent from the archive are skipped; a target that exists is never replaced."""
    members = read_index(path)
    prefix = find_prefix(members, pattern, what, path)
    chosen = under(members, prefix)
    need = sum(m.size for m in chosen)
    say(f"{path.name}: {what} at '{prefix or '.'}', {len(chosen):,} entries, {mib(need)}")
    check_space(root, need, f"{what} from {path.name}")
    with staging(root) as tmp:
        extract(path, chosen, tmp, need)
        staged = tmp / prefix if prefix else tmp
        try:
            verify_staged(staged)
        except PrepareError:
            raise
        except DataError as err:
            raise PrepareError(f"{path} does not hold a complete {what}: {err}") from None
        for inside, target in moves:
            src, dst = (staged / inside if inside != "." else staged), root / target
            if not src.exists():
                continue
            if dst.is_dir() and not any(dst.iterdir()):
                dst.rmdir()  # an empty folder the user made for it
            if dst.exists():
                raise PrepareError(f"{dst} appeared while preparing: left as it is")
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst) if src.is_file() else src.rename(dst)
