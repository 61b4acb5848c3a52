"""A dataset's archive fetched (resumable), its md5 checked, extracted into a temporary folder
inside the root and moved into place only once its layout check passes; one preparation per
root at a time. What the user sees of it: docs/DATA.md, "How it works"."""

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
from pathlib import Path
from typing import Any

from torchvision.datasets.utils import calculate_md5
from tqdm.auto import tqdm

from ..data.sources import Archive
from ..errors import DataError, PrepareError

try:  # POSIX: a lock that dies with its process
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock between concurrent preparations
    fcntl = None

LOCK_NAME = ".fcn_lightning-prepare.lock"
STAGING_PREFIX = ".prepare-tmp-"
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zipfile.BadZipFile, zlib.error, gzip.BadGzipFile)
Say = Callable[[str], None]
Hint = Callable[[Sequence[str]], str | None]  # what an archive holds instead, if known


def mib(n: float) -> str:
    """KiB below 0.1 MiB, one decimal below 10 MiB, none up to 1 GiB, then GiB."""
    if n < 0.1 * 2**20:
        return f"{n / 2**10:.0f} KiB"
    if n < 10 * 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def choose(info: Archive, archive: Any, md5: str | None, url: str | None) -> tuple[Archive, Any]:
    """The archive to expect and the user's copy, checked before anything is read or written."""
    if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise PrepareError(f"--md5 {md5!r} is not an md5: it is 32 hexadecimal digits")
    if url is not None and archive is not None:
        raise PrepareError("--url and --archive exclude each other")
    if url is not None and url.split("://")[0].lower() not in ("http", "https", "ftp", "file"):
        raise PrepareError(f"--url {url}: not an address to download from (http://, https://...)")
    path = Path(archive).expanduser() if archive is not None else None
    if path is not None and path.is_dir():
        raise PrepareError(f"--archive {path} is a folder, not an archive: give the file itself")
    if path is not None and not path.is_file():
        raise PrepareError(f"--archive {path}: no such file")
    return info.with_md5(md5).with_url(url), path


def not_a_folder(root: Path) -> str | None:
    """Why ``root`` cannot be a folder (it, or a folder above it, is a file), or None."""
    for p in (root, *root.parents):
        if p.is_dir():
            return None
        if p.exists():
            return (
                f"{root} is a file, not a folder"
                if p == root
                else (f"{p} is a file, so {root} cannot be a folder")
            )
    return None


def verify(path: Path, md5: str | None, downloaded: bool = False) -> None:
    if md5 and (actual := calculate_md5(path)) != md5.lower():
        todo = (
            f"delete {path} and run again to download it afresh"
            if downloaded
            else f"Download it again; for a mirror's copy you trust, pass --md5 {actual}"
        )
        raise PrepareError(
            f"checksum mismatch for {path}: expected md5 {md5.lower()}, got {actual}. {todo}"
        )


def fetch(
    info: Archive, root: Path, path: Path | None, command: str, say: Say, fresh: bool
) -> Path:
    """The archive, its md5 checked: ``path``, else ``root/<filename>``, else downloaded there
    (resuming ``<filename>.part``). ``fresh``: this run made ``root`` (and removes it on failure)."""
    dest = path or root / info.filename
    if dest.is_file():
        say(f"Using {dest}" + (" (verifying its md5)" if info.md5 else ""))
        verify(dest, info.md5)
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(3):
        try:
            _download(info.url, part, say)
            break
        except urllib.error.HTTPError as err:
            if err.code == 416:  # the .part holds the whole file already
                break
            reason = f"HTTP {err.code} {err.reason}"
        except urllib.error.URLError as err:
            reason = err.reason
        except (OSError, http.client.HTTPException) as err:  # cut off: resume from the .part
            if getattr(err, "errno", None) == errno.ENOSPC or attempt == 2:
                raise PrepareError(
                    f"the download of {info.url} stopped ({err}); {part} keeps what arrived: "
                    "run the same command again to resume"
                ) from None
            say(f"Download interrupted ({err}); resuming")
            continue
        make = f" (create {root} first: mkdir -p {root})" if fresh else ""
        raise PrepareError(
            f"cannot download {info.url} ({reason}).\nWithout network access here, fetch "
            f"{info.filename} elsewhere, copy it to this machine, e.g. to {dest}{make}, and run:"
            f"\n  {command}"
        )
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
        length = int(response.headers.get("Content-Length") or 0) or None
        if length:
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


def damaged(path: Path) -> PrepareError:
    return PrepareError(
        f"{path} is neither a tar nor a zip archive, or is damaged or incomplete: delete it and "
        "download it again (an interrupted copy or download is the usual cause)"
    )


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def read_index(path: Path) -> dict[str, int]:
    """Member name -> size, of a tar (any compression) or zip that reads to its end. A tar
    member that its ``data`` extraction filter would refuse raises PrepareError."""
    try:
        if zipfile.is_zipfile(path):  # a zip's extraction itself keeps inside the folder
            with zipfile.ZipFile(path) as zf:
                return {_clean(i.filename): i.file_size for i in zf.infolist()}
        if not hasattr(tarfile, "data_filter"):  # pragma: no cover
            raise PrepareError("extracting a tar safely needs Python 3.10.12+ or 3.11.4+")
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            tar.fileobj.seek(tar.offset)  # tarfile stops quietly at a cut: a whole tar ends
            if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):  # in zeros
                raise tarfile.ReadError("no end-of-archive block")
            for m in members:
                tarfile.data_filter(m, str(path.parent.absolute()))
            return {_clean(m.name): m.size if m.isfile() else 0 for m in members}
    except tarfile.FilterError as err:
        raise PrepareError(
            f"{path} holds a member outside its own folder or of a refused kind ({err}). "
            "Is it the official archive?"
        ) from None
    except ARCHIVE_ERRORS:
        raise damaged(path) from None


def find_prefix(
    names: Sequence[str], pattern: str, what: str, path: Path, hint: Hint | None
) -> str:
    """The shortest folder that ``pattern`` (group ``prefix``) finds; else say what is there."""
    found = sorted({m["prefix"].rstrip("/") for n in names if (m := re.match(pattern, n))}, key=len)
    if found:
        return found[0]
    told = hint(names) if hint else None
    if told is None:
        tops = sorted({n.split("/")[0] for n in names if n})
        told = (
            f"it holds {', '.join(tops[:5])}{' ...' * (len(tops) > 5)}" if tops else "it is empty"
        )
    raise PrepareError(f"{path} holds no {what}: {told}. Is it the right archive?")


def check_space(folder: Path, need: int, what: str) -> None:
    if (free := shutil.disk_usage(folder).free) < need:
        raise PrepareError(
            f"not enough free space in {folder}: {what} needs about {mib(need)}, {mib(free)} "
            "are free. Free some space or choose a --root on a larger disk"
        )


def extract(path: Path, names: Any, into: Path) -> None:
    """The members ``names`` of ``path`` into ``into``: zip CRCs checked as it reads, tar with
    the ``data`` filter (nothing outside ``into``, no links out, no device files)."""
    desc = f"extracting {path.name}"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            wanted = [i for i in zf.infolist() if _clean(i.filename) in names]
            zf.extractall(into, tqdm(wanted, desc=desc, unit="file"))
    else:
        with tarfile.open(path, "r:*") as tar:
            wanted = [m for m in tar.getmembers() if _clean(m.name) in names]
            tar.extractall(into, tqdm(wanted, desc=desc, unit="file"), filter="data")


def install(
    path: Path,
    root: Path,
    *,
    pattern: str,
    wanted: str,
    moves: Sequence[tuple[str, str]],
    verify_staged: Callable[[Path], None],
    say: Say,
    hint: Hint | None = None,
) -> None:
    """Extract the folder of ``path`` that ``pattern`` finds into a temporary folder in
    ``root``; after ``verify_staged(folder)`` passes, rename each ``(inside, target)`` of
    ``moves`` to ``root / target`` in order (the one that completes the layout last)."""
    index = read_index(path)
    prefix = find_prefix(list(index), pattern, wanted, path, hint)
    chosen = {n for n in index if not prefix or n == prefix or n.startswith(prefix + "/")}
    need = sum(index[n] for n in chosen)
    say(f"{path.name}: {wanted} at '{prefix or '.'}', {len(chosen):,} entries, {mib(need)}")
    check_space(root, need, f"{wanted} from {path.name}")
    tmp = tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=root)
    try:
        with tmp:
            try:
                extract(path, chosen, Path(tmp.name))
            except ARCHIVE_ERRORS:
                raise damaged(path) from None
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                raise PrepareError(
                    f"the disk filled up while extracting {path.name} into {root} (it needs "
                    f"about {mib(need)}); nothing was kept. Free some space or choose another "
                    "--root"
                ) from None
            staged = Path(tmp.name, prefix)
            try:
                verify_staged(staged)
            except DataError as err:
                raise PrepareError(f"{path} does not hold a complete {wanted}: {err}") from None
            for inside, target in moves:
                src, dst = staged / inside, root / target
                if not src.exists():
                    continue
                if dst.is_dir() and not any(dst.iterdir()):
                    dst.rmdir()  # an empty folder the user made for it
                if dst.exists():
                    raise PrepareError(f"{dst} appeared while preparing: left as it is")
                dst.parent.mkdir(parents=True, exist_ok=True)
                src.rename(dst)
    except KeyboardInterrupt:
        say(f"Removed the unfinished extraction {tmp.name}")
        raise


def remove_stale(root: Path, say: Say) -> None:
    """Remove the temporary folders of killed runs (SIGKILL, a power cut): call it with the
    lock held, since only its holder makes one."""
    for p in sorted(root.glob(STAGING_PREFIX + "*")):
        shutil.rmtree(p, ignore_errors=True)
        done = "Could not remove" if p.exists() else "Removed"
        say(f"{done} an unfinished extraction left by an earlier run: {p}")


def tidy(root: Path, say: Say) -> None:
    """:func:`remove_stale` where nothing else needs doing, unless a live run holds the lock."""
    if fcntl is None or not any(root.glob(STAGING_PREFIX + "*")):
        return
    try:
        with open(root / LOCK_NAME, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            remove_stale(root, say)
    except BlockingIOError:  # another process is preparing here: its folder, maybe
        pass
    except OSError as err:
        say(f"Note: cannot remove the unfinished extractions of earlier runs in {root} ({err})")


@contextlib.contextmanager
def locked(root: Path, say: Say) -> Iterator[None]:
    """One preparation at a time in ``root``; the folders made for it are removed again if
    nothing but the lock ended up in them."""
    made = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"Another process is preparing {root}; waiting for it")
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if made and os.listdir(root) == [LOCK_NAME]:
                (root / LOCK_NAME).unlink()
                for p in made:
                    with contextlib.suppress(OSError):  # not empty (another writer): kept
                        p.rmdir()


def already_prepared(
    targets: Sequence[Path], check: Callable[[], Any], what: str, say: Say
) -> bool:
    """True if the ``targets`` exist and ``check()`` finds them complete; False if none exists
    (an empty folder counts as absent); raises if they are incomplete (never overwritten)."""
    present = [t for t in targets if t.exists() and not (t.is_dir() and not any(t.iterdir()))]
    if not present:
        return False
    if (report := check()).ok:
        say(f"{what} is already prepared ({present[0]}): nothing to do")
        return True
    raise PrepareError(
        f"{', '.join(map(str, present))} exist(s) but the layout is incomplete:\n"
        + "".join(f"  {e}\n" for e in report.errors)
        + "Nothing was changed. Move it away (or delete it) and run again, or complete it by hand"
    )


def prepare_once(
    root: Path,
    info: Archive,
    *,
    targets: Sequence[Path],
    check: Callable[[], Any],
    what: str,
    command: str,
    archive: Any = None,
    md5: str | None = None,
    url: str | None = None,
    say: Say = print,
    before: Callable[[], None] | None = None,
    **recipe: Any,
) -> None:
    """Every preparation: the options checked (:func:`choose`); nothing written where the
    ``targets`` are already complete (a read-only root is fine); else, under the root's lock,
    stale folders removed, ``before()`` run, the check made again (another process may have
    finished) and the archive :func:`fetch` gives installed (:func:`install` with ``recipe``)."""
    info, path = choose(info, archive, md5, url)
    if problem := not_a_folder(root):
        raise PrepareError(f"{problem}: --root (data.root) must be a folder")
    incomplete = None
    if before is None:
        try:
            if already_prepared(targets, check, what, say):
                return tidy(root, say)
        except PrepareError as err:  # said again under the lock (another run may be finishing)
            incomplete = err
    fresh = not root.is_dir()
    try:
        with locked(root, say):
            remove_stale(root, say)
            if before is not None:
                before()
            if not already_prepared(targets, check, what, say):
                source = fetch(info, root, path, command, say, fresh)
                install(source, root, say=say, **recipe)
    except OSError as err:
        if err.errno not in UNWRITABLE:
            raise
        if incomplete is not None:  # the real problem: nothing here would write
            raise incomplete from None
        where = Path(err.filename) if err.filename else root
        raise PrepareError(
            f"cannot write in {where if where.is_dir() else where.parent} ({err.strerror}), and "
            f"{what} is not prepared in {root} yet. Run this where it can be written, or choose "
            "another --root (data.root)"
        ) from None


def prepare_command(kind: str, root: Path, archive: Archive, year: str = "") -> str:
    """The command that prepares ``kind`` in ``root`` from its archive placed there."""
    return (
        f"python -m fcn_lightning.prepare {kind}{f' --year {year}' * bool(year)} --root "
        f"{shlex.quote(str(root))} --archive {shlex.quote(str(root / archive.filename))}"
    )
