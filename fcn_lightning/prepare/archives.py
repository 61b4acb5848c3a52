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
import shlex
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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
CHUNK = 1 << 20


def mib(n: float) -> str:
    """A size for people: KiB below 0.1 MiB, one decimal below 10 MiB (0.7 MiB, not 1 MiB),
    none up to 1 GiB, then GiB with one decimal."""
    if n < 0.1 * 2**20:
        return f"{n / 2**10:.0f} KiB"
    if n < 10 * 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


# --------------------------------------------------------------------------- the options
MD5_HEX = re.compile(r"[0-9a-fA-F]{32}")
URL_SCHEMES = ("http", "https", "ftp", "file")


def choose(
    info: Archive,
    *,
    archive: str | Path | None = None,
    md5: str | None = None,
    url: str | None = None,
) -> tuple[Archive, Path | None]:
    """The archive to expect (``md5``, ``url`` of a mirror) and the user's copy (``archive``),
    checked before anything is read or written: a malformed md5 or URL, an ``archive`` that
    does not exist or is a folder raise PrepareError, even where nothing needs doing."""
    if md5 is not None and not MD5_HEX.fullmatch(md5):
        raise PrepareError(f"--md5 {md5!r} is not an md5: it is 32 hexadecimal digits")
    if url is not None:
        if archive is not None:
            raise PrepareError(
                "--url and --archive exclude each other: --archive takes a copy you have, "
                "--url downloads one"
            )
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in URL_SCHEMES:
            raise PrepareError(
                f"--url {url}: not an address to download from (expected http://, https://, "
                "ftp:// or file://)"
            )
    path = None
    if archive is not None:
        path = Path(archive).expanduser()
        if path.is_dir():
            raise PrepareError(
                f"--archive {path} is a folder, not an archive: give the file itself "
                f"(e.g. {path / info.filename})"
            )
        if not path.is_file():
            raise PrepareError(f"--archive {path}: no such file")
    return info.with_md5(md5).with_url(url), path


def not_a_folder(root: Path) -> str | None:
    """Why ``root`` cannot be a folder (it, or a folder above it, is a file), or None."""
    for p in (root, *root.parents):
        if p.is_dir():
            return None
        if p.exists():
            if p == root:
                return f"{root} is a file, not a folder"
            return f"{p} is a file, so {root} cannot be a folder"
    return None


UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def cannot_write(root: Path, err: OSError, what: str) -> PrepareError:
    """The message for a root where work is needed but that cannot be written to."""
    where = Path(err.filename) if err.filename else root
    if not where.is_dir():  # the lock file, a folder not made, a temporary folder
        where = where.parent
    return PrepareError(
        f"cannot write in {where} ({err.strerror or err}), and {what} is not prepared in "
        f"{root} yet: preparing it writes there. Run this where that folder can be written "
        "(or as a user who may write to it), or choose another --root (data.root)"
    )


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


def no_network(
    archive: Archive, dest: Path, reason: object, command: str, fresh: bool = False
) -> PrepareError:
    """``fresh``: the folder of ``dest`` was made by this run, which removes it again."""
    where = f"e.g. to {dest}" + (
        f" (create {dest.parent} first: mkdir -p {dest.parent})" if fresh else ""
    )
    return PrepareError(
        f"cannot download {archive.url} ({reason}).\n"
        f"Without network access here, fetch that file ({archive.filename}) on a machine that "
        f"has it, copy it to this machine, {where}, and run:\n  {command}"
    )


def fetch(
    archive: Archive,
    folder: Path,
    *,
    path: Path | None = None,
    command: str = "python -m fcn_lightning.prepare ... --archive PATH",
    say: Callable[[str], None] = print,
    attempts: int = 3,
    fresh: bool = False,
) -> Path:
    """The archive on disk, its checksum verified: ``path`` (the user's copy: never downloads),
    else ``folder/<filename>`` if present, else downloaded there (resuming ``<filename>.part``).
    ``fresh``: ``folder`` was made by this run (a failed run removes it again)."""
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            raise PrepareError(f"--archive {path} is a folder, not an archive")
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
            reason = f"HTTP {err.code} {err.reason}"
            raise no_network(archive, dest, reason, command, fresh) from None
        except urllib.error.URLError as err:
            raise no_network(archive, dest, err.reason, command, fresh) from None
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


def unreadable(path: Path) -> PrepareError:
    """Neither zip nor tar could open it: not an archive, or one cut short (a zip keeps its
    index at its end), where tarfile's own message lists each method it tried."""
    return PrepareError(
        f"{path} is neither a tar nor a zip archive, or is damaged or incomplete (a zip cut "
        "short loses its index, kept at its end): delete it and download it again (an "
        "interrupted copy or download is the usual cause)"
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
            try:
                opened = tarfile.open(path, "r:*")
            except tarfile.ReadError:  # no compression or tar header recognised
                raise unreadable(path) from None
            with opened as tar:
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


Hint = Callable[[Sequence[Member]], str | None]  # what an archive holds instead, if known
SHOWN_TOPS = 5


def find_prefix(
    members: Sequence[Member], pattern: str, what: str, path: Path, hint: Hint | None = None
) -> str:
    """The folder inside the archive that ``pattern`` (a regex matched against member names,
    with a group ``prefix``) points to; the shortest if several. Where there is none, the
    message says what the archive holds: ``hint(members)`` if it knows, else its top entries."""
    found = sorted(
        {m.group("prefix").rstrip("/") for x in members if (m := re.match(pattern, x.name))},
        key=len,
    )
    if not found:
        told = hint(members) if hint is not None else None
        if told is None:
            tops = sorted({m.name.split("/")[0] for m in members if m.name})
            shown = ", ".join(tops[:SHOWN_TOPS]) + (" ..." if len(tops) > SHOWN_TOPS else "")
            told = f"it holds {shown}" if tops else "it is empty"
        raise PrepareError(f"{path} holds no {what}: {told}. Is it the right archive?")
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
def staging(parent: Path, say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """A temporary folder in ``parent`` (same file system: the final move is a rename),
    removed on the way out whatever happens; an interruption (Ctrl+C, or the signals the
    command turns into one) is reported through ``say``."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    try:
        yield tmp
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        if say is not None:
            say(f"Removed the unfinished extraction {tmp}")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stale(root: Path) -> list[Path]:
    """Temporary folders of earlier runs in ``root`` (a run killed with SIGKILL, a power cut):
    stale when the lock is held, since only its holder makes one."""
    try:
        return sorted(p for p in root.glob(STAGING_PREFIX + "*") if p.is_dir())
    except OSError:
        return []


def remove_stale(root: Path, say: Callable[[str], None]) -> None:
    """Remove :func:`stale` folders (call with the lock held) and say so."""
    for p in stale(root):
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            say(f"Could not remove an unfinished extraction left by an earlier run: {p}")
        else:
            say(f"Removed an unfinished extraction left by an earlier run: {p}")


def tidy(root: Path, say: Callable[[str], None]) -> None:
    """:func:`remove_stale` in a root where nothing else needs doing, if the lock is free (a
    live preparation's folder is left alone) and the root can be written (else a note)."""
    if not stale(root) or fcntl is None:
        return
    try:
        with open(root / LOCK_NAME, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                remove_stale(root, say)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:  # another process is preparing here: its folder, maybe
        return
    except OSError as err:
        for p in stale(root):
            say(f"Note: {p} is an unfinished extraction left by an earlier run ({err}): delete it")


@contextlib.contextmanager
def locked(folder: Path, say: Callable[[str], None] = print) -> Iterator[None]:
    """One preparation at a time in ``folder`` (several processes of one job, two jobs). The
    folders made for it are removed again if nothing but the lock ended up in them."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
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
                for p in made:
                    with contextlib.suppress(OSError):  # not empty (another writer): kept
                        p.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)


def already_prepared(
    targets: Sequence[Path], check: Callable[[], Any], what: str, say: Callable[[str], None]
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
    hint: Hint | None = None,
) -> None:
    """Extract the folder of archive ``path`` that ``pattern`` finds (see :func:`find_prefix`)
    into a temporary folder in ``root``, run ``verify_staged(folder)`` on it (raises on a
    wrong layout), then rename each ``(inside, target)`` of ``moves`` from that folder to
    ``root / target``, in order: the entry that makes the layout usable goes last. Entries
    absent from the archive are skipped; a target that exists is never replaced."""
    members = read_index(path)
    prefix = find_prefix(members, pattern, what, path, hint)
    chosen = under(members, prefix)
    need = sum(m.size for m in chosen)
    say(f"{path.name}: {what} at '{prefix or '.'}', {len(chosen):,} entries, {mib(need)}")
    check_space(root, need, f"{what} from {path.name}")
    with staging(root, say) as tmp:
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


def prepare_once(
    root: Path,
    info: Archive,
    *,
    targets: Sequence[Path],
    check: Callable[[], Any],
    what: str,
    command: str,
    install_from: Callable[[Path], None],
    archive: str | Path | None = None,
    md5: str | None = None,
    url: str | None = None,
    say: Callable[[str], None] = print,
    before: Callable[[], None] | None = None,
) -> None:
    """The course of every preparation. The options are checked first (:func:`choose`), then
    whether ``targets`` are :func:`already_prepared`, writing nothing: a complete dataset on a
    read-only root is fine. Only where there is work is the root's lock taken (and the root
    made); with it held, stale temporary folders are removed, ``before()`` runs (under the
    lock, before the check; its presence makes every run take the lock), the check is made
    again (another process may have finished meanwhile) and ``install_from(archive)`` runs
    on the archive :func:`fetch` gives. A root that is a file, or that cannot be written
    where there is work, raises PrepareError naming the folder."""
    info, path = choose(info, archive=archive, md5=md5, url=url)
    if problem := not_a_folder(root):
        raise PrepareError(f"{problem}: --root (data.root) must be a folder")
    incomplete: PrepareError | None = None
    if before is None:
        try:
            if already_prepared(targets, check, what, say):
                tidy(root, say)
                return
        except PrepareError as err:  # said again under the lock (another run may be finishing)
            incomplete = err
    fresh = not root.is_dir()
    try:
        with locked(root, say):
            remove_stale(root, say)
            if before is not None:
                before()
            if already_prepared(targets, check, what, say):
                return
            archive_path = fetch(info, root, path=path, command=command, say=say, fresh=fresh)
            install_from(archive_path)
    except OSError as err:
        if err.errno not in UNWRITABLE:
            raise
        if incomplete is not None:  # the real problem: nothing here would write
            raise incomplete from None
        raise cannot_write(root, err, what) from None


def prepare_command(kind: str, root: Path, archive: Archive, year: str = "") -> str:
    """The command that prepares ``kind`` under ``root`` from its archive placed in ``root``
    (what the no-network message tells the user to run)."""
    extra = f" --year {year}" if year else ""
    return (
        f"python -m fcn_lightning.prepare {kind}{extra} --root {shlex.quote(str(root))} "
        f"--archive {shlex.quote(str(root / archive.filename))}"
    )
