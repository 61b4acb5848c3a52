"""An archive fetched (resumable) and md5 checked, extracted into a temporary folder in the root
and renamed into place once its layout check passes; one run per root at a time (a lock).
docs/DATA.md, "How it works"."""

from __future__ import annotations

import contextlib
import errno
import gzip
import http.client
import os
import re
import shlex
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from torchvision.datasets.utils import calculate_md5
from tqdm.auto import tqdm

from ..data.sources import ARCHIVES, Archive
from ..errors import DataError, PrepareError

try:  # POSIX: a lock that dies with its process
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock between concurrent preparations
    fcntl = None

LOCK_NAME, STAGING_PREFIX = ".fcn_lightning-prepare.lock", ".prepare-tmp-"
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zipfile.BadZipFile, zlib.error, gzip.BadGzipFile)
FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no room: blocks, inodes, quota
Say = Callable[[str], None]


def mib(n: float) -> str:
    if n < 0.1 * 2**20:
        return f"{n / 2**10:.0f} KiB"
    if n < 10 * 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def not_a_folder(root: Path) -> str | None:
    """Why ``root`` cannot be a folder (it, or a folder above it, is a file)."""
    p = next((p for p in (root, *root.parents) if p.exists()), root)
    if p.is_dir() or not p.exists():
        return None
    return f"{p} is a file" + (", not a folder" if p == root else f", so {root} cannot be a folder")


def verify(path: Path, md5: str | None, downloaded: bool = False) -> None:
    if md5 and (actual := calculate_md5(path)) != md5.lower():
        todo = f"delete {path} and run again" if downloaded else "Download it again (or, for "
        raise PrepareError(
            f"checksum mismatch for {path}: expected md5 {md5.lower()}, got {actual}. {todo}"
            + f"a mirror's copy you trust, pass --md5 {actual})" * (not downloaded)
        )


def check_space(folder: Path, need: int, what: str) -> None:
    if (free := shutil.disk_usage(folder).free) < need:
        raise PrepareError(
            f"not enough free space in {folder}: {what} needs about {mib(need)}, {mib(free)} "
            "are free. Free some space or choose a --root on a larger disk"
        )


def _mount(path: Path) -> Path:
    """The mount point of the file system holding ``path`` (an existing path)."""
    p = path.absolute()
    dev = p.stat().st_dev
    while p.parent != p and p.parent.stat().st_dev == dev:
        p = p.parent
    return p


def out_of_room(
    err: OSError, root: Path, doing: str, need: int | None = None, files: int | None = None
) -> PrepareError:
    """ENOSPC or EDQUOT while ``doing`` in ``root``: which resource ran out (the quota, the
    inodes or the blocks of the file system), said while the partial extraction is still there."""
    at = next((p for p in (root, *root.parents) if p.exists()), root)
    try:
        fs = _mount(at)
    except OSError:
        fs = at
    on = f"{fs} (the file system of {root})" if fs != root.absolute() else f"{root}"
    free = inodes = None
    try:
        st = os.statvfs(at)
        free, inodes = st.f_bavail * st.f_frsize, st.f_favail if st.f_files else None
    except AttributeError:  # pragma: no cover - Windows
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(at).free
    except OSError:
        pass
    size = f"about {mib(need)}" if need is not None else ""
    count = f"{files:,} files and folders" if files is not None else ""
    if err.errno == getattr(errno, "EDQUOT", None):
        told = f" ({size} in {count} to write)" if size and count else ""
        return PrepareError(
            f"disk quota exceeded on {on} {doing}{told}: nothing was kept. Free some of your "
            "files there, ask for a larger quota, or choose another --root"
        )
    if inodes == 0:
        told = f" ({count} to write, {mib(free)} free)" if count else f" ({mib(free)} free)"
        return PrepareError(
            f"no free inodes on {on} {doing}{told}: nothing was kept. Delete some files there "
            "(each file or folder takes an inode) or choose another --root"
        )
    told = f"needs {size}, " * bool(size) + (f"{mib(free)} free" if free is not None else "")
    return PrepareError(
        f"disk full on {on} {doing}" + f" ({told})" * bool(told) + ": nothing was kept. "
        "Free some space or choose another --root"
    )


def fetch(info: Archive, dest: Path, command: str, say: Say, made: bool) -> Path:
    """``dest``, md5 checked; where absent, downloaded to it (resuming ``<dest>.part``)."""
    if dest.is_file():
        say(f"Using {dest}" + " (verifying its md5)" * bool(info.md5))
        verify(dest, info.md5)
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(3):
        try:
            _download(info.url, part, say)
        except urllib.error.URLError as err:  # HTTPError too
            if getattr(err, "code", None) == 416:  # the .part holds the whole file already
                break
            reason = f"HTTP {err.code} {err.reason}" if hasattr(err, "code") else err.reason
            raise PrepareError(
                f"cannot download {info.url} ({reason}).\nWithout network access here, fetch "
                f"{dest.name} elsewhere, copy it to this machine, e.g. to {dest}"
                + f" (create {dest.parent} first: mkdir -p {dest.parent})" * made
                + f", and run:\n  {command}"
            ) from None
        except (OSError, http.client.HTTPException) as err:  # cut off: resume from the .part
            if getattr(err, "errno", None) == errno.ENOSPC or attempt == 2:
                raise PrepareError(
                    f"the download of {info.url} stopped ({err}); {part} keeps what arrived: "
                    "run the same command again to resume"
                ) from None
            say(f"Download interrupted ({err}); resuming")
            continue
        break
    verify(part, info.md5, downloaded=True)
    return part.rename(dest)


def _download(url: str, part: Path, say: Say) -> None:
    """Append the rest of ``url`` to ``part`` (an HTTP Range request from its size)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:
            say("The server does not resume downloads: starting from the beginning")
            have = 0
        if length := int(response.headers.get("Content-Length") or 0):
            check_space(part.parent, length, url)
        if have:
            say(f"Resuming {part.name} at {mib(have)}")
        total = have + length if length else None
        with (
            open(part, "ab" if have else "wb") as out,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.stem) as bar,
        ):
            while chunk := response.read(1 << 20):
                bar.update(out.write(chunk))
        if total and part.stat().st_size < total:
            raise ConnectionError(f"{part.stat().st_size} of {total} bytes arrived")


def zip_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The members of ``zf``, names written on Windows with '\\' read with '/' (as zipfile does
    on Windows: ``orig_filename`` is kept, so the local header check still passes, and
    extraction still drops absolute paths and '..')."""
    members = zf.infolist()
    for i in members:
        i.filename = i.filename.replace("\\", "/")
    return members


def read_index(path: Path) -> dict[str, int]:
    """Member name -> size, of a zip, or of a tar that reads to its end and that tarfile's
    ``data`` filter accepts (zipfile keeps every member inside the folder itself)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return {i.filename: i.file_size for i in zip_members(zf)}
    if not hasattr(tarfile, "data_filter"):  # pragma: no cover
        raise PrepareError("extracting a tar safely needs Python 3.10.12+ or 3.11.4+")
    with tarfile.open(path, "r:*") as tar:
        members = tar.getmembers()
        tar.fileobj.seek(tar.offset)  # tarfile stops quietly at a cut: a whole tar ends in zeros
        if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError("no end-of-archive block")
        for m in members:
            tarfile.data_filter(m, str(path.parent.absolute()))
        return {m.name: m.size if m.isfile() else 0 for m in members}


def extract(path: Path, names: set[str], into: Path) -> None:
    """The members ``names`` of ``path`` into ``into``: zip CRCs checked, tar with the ``data``
    filter."""
    bar = partial(tqdm, desc=f"extracting {path.name}", unit="file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            zf.extractall(into, bar([i for i in zip_members(zf) if i.filename in names]))
    else:
        with tarfile.open(path, "r:*") as tar:
            wanted = bar([m for m in tar.getmembers() if m.name in names])
            tar.extractall(into, wanted, filter="data")


def install(
    path: Path,
    root: Path,
    *,
    pattern: str,
    wanted: str,
    moves: Sequence[tuple[str, str]],
    verify_staged: Callable[[Path], None],
    say: Say,
    hint: Callable[[list[str]], str | None] = lambda names: None,
) -> None:
    """The shortest folder of ``path`` that ``pattern`` (group ``prefix``) finds, extracted into a
    temporary folder in ``root``, ``verify_staged`` there, then each ``(inside, target)`` of
    ``moves`` renamed to ``root / target`` in order (the one completing the layout last)."""
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=root) as tmp:
        try:
            index = read_index(path)
            found = {m["prefix"].rstrip("/") for n in index if (m := re.match(pattern, n))}
            if not found and (windows := [n for n in index if "\\" in n]):
                example = next((n for n in windows if re.match(pattern, n.replace("\\", "/"))), "")
                if example:  # a tar written on Windows (zip names are converted)
                    raise PrepareError(
                        f"{path} uses Windows '\\' separators in its member names (e.g. "
                        f"'{example}'): re-create it with '/' separators, or extract it with a "
                        "tool that converts them"
                    )
            if not found:
                tops = sorted({n.split("/")[0] for n in index if n})
                held = f"it holds {', '.join(tops[:5])}{' ...' * (len(tops) > 5)}"
                told = hint(list(index)) or (held if tops else "it is empty")
                raise PrepareError(
                    f"{path} does not hold {wanted}: {told}. Is it the right archive?"
                )
            prefix = min(found, key=len)
            chosen = {n for n in index if not prefix or n == prefix or n.startswith(prefix + "/")}
            need = sum(index[n] for n in chosen)
            say(f"{path.name}: {wanted} at '{prefix or '.'}', {len(chosen):,} entries, {mib(need)}")
            check_space(root, need, f"{wanted} from {path.name}")
            extract(path, chosen, Path(tmp))
            verify_staged(staged := Path(tmp, prefix))
            for src, dst in ((staged / inside, root / target) for inside, target in moves):
                if src.exists():
                    with contextlib.suppress(OSError):  # an empty folder the user made for it
                        dst.rmdir()
                    if dst.exists():
                        raise PrepareError(f"{dst} appeared while preparing: left as it is")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    src.rename(dst)
        except tarfile.FilterError as err:
            raise PrepareError(
                f"{path} holds a member outside its own folder or of a refused kind ({err}). "
                "Is it the official archive?"
            ) from None
        except ARCHIVE_ERRORS:
            raise PrepareError(
                f"{path} is neither a tar nor a zip archive, or is damaged or incomplete: delete "
                "it and download it again (an interrupted copy or download is the usual cause)"
            ) from None
        except PrepareError:
            raise
        except DataError as err:
            raise PrepareError(f"{path} does not hold a complete {wanted}: {err}") from None
        except OSError as err:
            if err.errno not in FULL:
                raise
            doing = f"while extracting {path.name}"
            raise out_of_room(err, root, doing, need, len(chosen)) from None
        except KeyboardInterrupt:
            say(f"Removed the unfinished extraction {tmp}")
            raise


@contextlib.contextmanager
def locked(root: Path, say: Say, wait: bool = True) -> Iterator[bool]:
    """One run at a time in ``root``, first rid of killed runs' temporary folders; yields whether
    this run made ``root`` (removed again, with the folders above, if only the lock is in it)."""
    made = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCK_NAME, "a")
    except OSError:  # no room even for the lock: the folders made for it removed again
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    with handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                say(f"Another process is preparing {root}; waiting for it")
                fcntl.flock(handle, fcntl.LOCK_EX)
        for p in sorted(root.glob(STAGING_PREFIX + "*")):
            shutil.rmtree(p, ignore_errors=True)
            done = "Could not remove" if p.exists() else "Removed"
            say(f"{done} an unfinished extraction left by an earlier run: {p}")
        try:
            yield bool(made)
        finally:
            if made and os.listdir(root) == [LOCK_NAME]:
                (root / LOCK_NAME).unlink()
                for p in made:
                    with contextlib.suppress(OSError):  # not empty (another writer): kept
                        p.rmdir()


def already_prepared(targets: Sequence[Path], check: Callable, what: str, say: Say) -> bool:
    """True if the ``targets`` exist and ``check()`` finds them complete; False if none exists
    (an empty folder counts as absent); raises if they are incomplete (never overwritten)."""
    present = [t for t in targets if t.exists() and not (t.is_dir() and not any(t.iterdir()))]
    if present and not (report := check()).ok:
        errors = "".join(f"  {e}\n" for e in report.errors)
        raise PrepareError(
            f"{', '.join(map(str, present))} exist(s) but the layout is incomplete:\n{errors}"
            "Nothing was changed. Move it away (or delete it) and run again, or complete it by hand"
        )
    if present:
        say(f"{what} is already prepared ({present[0]}): nothing to do")
    return bool(present)


def prepare_once(
    root: Path,
    kind: str,
    year: str = "",
    *,
    targets: Sequence[Path],
    check: Callable,
    what: str,
    archive: Any = None,
    md5: str | None = None,
    url: str | None = None,
    say: Say = print,
    before: Callable[[], None] | None = None,
    **recipe: Any,
) -> None:
    """Every preparation of ``kind`` (voc of ``year``, sbd, siftflow, nyud): nothing written where
    the ``targets`` are complete; else, under the lock, ``before()`` run, the check made again
    and the archive :func:`fetch` gives installed (``recipe``: of :func:`install`)."""
    if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise PrepareError(f"--md5 {md5!r} is not an md5: it is 32 hexadecimal digits")
    if url is not None and not re.match(r"(?i)(https?|ftp|file)://", url):
        raise PrepareError(f"--url {url}: not an address to download from (http://, https://...)")
    path = Path(archive).expanduser() if archive is not None else None
    if path is not None and path.is_dir():
        raise PrepareError(f"--archive {path} is a folder, not an archive: give the file")
    if path is not None and path.exists() and not path.is_file():
        raise PrepareError(
            f"--archive {path} is not a regular file (a device, a pipe or a socket): give the "
            "archive file itself"
        )
    if path is not None and not path.is_file():
        raise PrepareError(f"--archive {path}: no such file")
    if problem := not_a_folder(root):
        raise PrepareError(f"{problem}: --root (data.root) must be a folder")
    info = ARCHIVES[kind + year]  # voc2011, voc2012, sbd, siftflow, nyud
    info = replace(info, md5=md5 or info.md5, url=url or info.url)
    dest = path or root / info.filename
    command = f"python -m fcn_lightning.prepare {kind}{f' --year {year}' * bool(year)} --root "
    command += f"{shlex.quote(str(root))} --archive {shlex.quote(str(root / info.filename))}"
    incomplete = None
    if before is None:
        try:
            if already_prepared(targets, check, what, say):
                if any(root.glob(STAGING_PREFIX + "*")):  # unless a live run holds the lock
                    with contextlib.suppress(OSError), locked(root, say, wait=False):
                        pass  # taking the lock removes them
                return
        except PrepareError as err:  # said again under the lock (another run may be finishing)
            incomplete = err
    try:
        with locked(root, say) as made:
            if before is not None:
                before()
            if not already_prepared(targets, check, what, say):
                install(fetch(info, dest, command, say, made), root, say=say, **recipe)
    except OSError as err:
        if err.errno in FULL:  # not even the lock file or the root could be made
            raise out_of_room(err, root, f"while preparing {what}") from None
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        if incomplete is not None:  # the real problem: nothing here would write
            raise incomplete from None
        where = Path(err.filename) if err.filename else root
        raise PrepareError(
            f"cannot write in {where if where.is_dir() else where.parent} ({err.strerror}), and "
            f"{what} is not prepared in {root} yet. Run this where it can be written, or choose "
            "another --root (data.root)"
        ) from None
