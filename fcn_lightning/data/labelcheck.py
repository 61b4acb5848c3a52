"""The label check run once before training: ``SegmentationDataModule.check_labels()``.

Every label file of the splits is read once, through the reader training uses (the dataset's own
conversions, then ``label_map``), in worker processes, and counted: pixels per class, ignored
(255) pixels, values out of range. A wrong class count, masks saved as 0/255 or a bad file in the
validation split then show in seconds, before training, not an epoch into it.

Per-file results are cached in one JSON file per dataset under ``$FCN_LIGHTNING_CACHE`` (else
``~/.cache/fcn_lightning/labels/``), keyed by the file's absolute path, size, mtime, the label
map, the class count and the reader: a re-check reads no file that has not changed. The data
root is never written to; a corrupt cache file is ignored and rewritten.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..atomic import write_json_atomic
from ..contract import IGNORE_INDEX, DataContract
from ..errors import DataError
from .readers import map_labels


class LabelSource(Protocol):
    """What the label check reads of a DataModule (``SegmentationDataModule`` gives it)."""

    root: Path | None
    train_split: str
    val_split: str
    test_split: str
    label_map: dict[int, int]
    contract: DataContract

    def label_files(self, split: str) -> list[dict[str, Path]]: ...

    @staticmethod
    def read_label(path: Path, head: str = "out") -> np.ndarray: ...


CACHE_VERSION = 1
IGNORED_WARN = 0.5  # warn when more than this share of a split's pixels is ignored
SHOW = 5  # files and classes named in a message

Reader = Callable[[Path, str], np.ndarray]
Item = tuple[str, str, int]  # (label file, head, number of classes)


def cache_dir() -> Path:
    """``$FCN_LIGHTNING_CACHE`` if set, else ``~/.cache/fcn_lightning/labels``."""
    env = os.environ.get("FCN_LIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fcn_lightning" / "labels"


@dataclass
class SplitLabels:
    """What the labels of one split (and head) hold."""

    split: str
    head: str
    class_names: tuple[str, ...]
    images: int
    histogram: np.ndarray  # labelled pixels per class
    ignored: int  # pixels labelled 255
    pixels: int  # all pixels
    empty: list[str]  # label files without a labelled pixel
    cached: int  # files served from the cache
    seconds: float  # time the split took

    @property
    def ignored_share(self) -> float:
        return self.ignored / self.pixels if self.pixels else 0.0

    @property
    def absent(self) -> list[str]:
        """Classes that never occur in this split."""
        return [
            name for name, count in zip(self.class_names, self.histogram, strict=True) if count == 0
        ]

    @property
    def from_cache(self) -> bool:
        return self.cached == self.images


@dataclass
class LabelReport:
    """The label check's findings. ``splits`` is keyed by split name (``<split>/<head>`` for a
    dataset with several heads); ``warnings`` lists the likely mistakes found."""

    splits: dict[str, SplitLabels] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cache_file: Path | None = None
    note: str = ""

    @property
    def from_cache(self) -> bool:
        """Whether every label came from the cache (no label file was read)."""
        return bool(self.splits) and all(s.from_cache for s in self.splits.values())

    def format(self) -> str:
        """One short block: a line per split, then the warnings."""
        if not self.splits:
            return f"label check: {self.note or 'no labels to check'}"
        source = "from the cache" if self.from_cache else f"cache {self.cache_file}"
        lines = [f"label check: {len(self.splits)} split(s) in {self.seconds:.2f} s ({source})"]
        for key, s in self.splits.items():
            absent = ", ".join(s.absent[:SHOW]) + (
                f" +{len(s.absent) - SHOW} more" if len(s.absent) > SHOW else ""
            )
            read = "cached" if s.from_cache else f"{s.images - s.cached} read"
            lines.append(
                f"  {key}: {s.images} images, {100 * s.ignored_share:.1f}% ignored, "
                f"{len(s.empty)} without labelled pixels, classes absent: {absent or 'none'} "
                f"({read}, {s.seconds:.2f} s)"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def count_labels(label: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Pixels per class, ignored and all pixels, and the out-of-range values of one label."""
    flat = np.asarray(label).ravel("K")  # no copy for the Fortran-ordered arrays of .mat files
    pixels, bad = flat.size, []
    if flat.dtype != np.uint8:
        wide = (flat < 0) | (flat > 255)
        if wide.any():
            bad, flat = np.unique(flat[wide]).tolist(), flat[~wide]
        flat = flat.astype(np.uint8)
    counts = np.bincount(flat, minlength=256)
    bad += (np.flatnonzero(counts[num_classes:IGNORE_INDEX]) + num_classes).tolist()
    return {
        "hist": counts[:num_classes].tolist(),
        "ignored": int(counts[IGNORE_INDEX]),
        "pixels": int(pixels),
        "bad": sorted(bad)[:8],
    }


def _read_chunk(job: tuple[Reader, dict[int, int], list[Item]]) -> list[dict[str, Any]]:
    """In a worker: the counts of a chunk of label files, or the error each one raised."""
    reader, label_map, items = job
    results = []
    for path, head, n in items:
        try:
            results.append(count_labels(map_labels(reader(Path(path), head), label_map), n))
        except Exception as err:  # reported with the others once the split is read
            message = str(err) if isinstance(err, DataError) else f"{path}: {err!r}"
            results.append({"error": message})
    return results


class _Workers:
    """A process pool, started only when there are files to read, shared by the splits."""

    def __init__(self, workers: int | None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def read(
        self, reader: Reader, label_map: dict[int, int], items: list[Item]
    ) -> list[dict[str, Any]]:
        if self.workers == 1 or len(items) < 2:
            return _read_chunk((reader, label_map, items))
        size = max(1, min(64, math.ceil(len(items) / (4 * self.workers))))
        chunks = [(reader, label_map, items[i : i + size]) for i in range(0, len(items), size)]
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers)
        return [r for chunk in self.pool.map(_read_chunk, chunks) for r in chunk]


class LabelCache:
    """Per-file results in one JSON file; a missing, unreadable or corrupt file starts empty."""

    def __init__(self, path: Path) -> None:
        self.path, self.entries, self.changed = path, {}, False
        try:
            data = json.loads(path.read_text())
            if data["version"] != CACHE_VERSION or not isinstance(data["entries"], dict):
                raise ValueError("an unknown cache version")
            self.entries = data["entries"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError):
            self.changed = True  # ignored, and rewritten below

    def get(self, key: str, stamp: list[Any]) -> dict[str, Any] | None:
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp:
            return None
        result = entry.get("result")
        valid = (
            isinstance(result, dict)
            and isinstance(result.get("hist"), list)
            and len(result["hist"]) == stamp[3]
            and {"ignored", "pixels", "bad"} <= set(result)
        )
        return result if valid else None

    def put(self, key: str, stamp: list[Any], result: dict[str, Any]) -> None:
        self.entries[key] = {"stamp": stamp, "result": result}
        self.changed = True

    def save(self) -> None:
        """Write atomically (a temporary file renamed); a failure warns, never stops the run."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                self.path, {"version": CACHE_VERSION, "entries": self.entries}, indent=None
            )
        except OSError as err:
            warnings.warn(f"label check: cache not written to {self.path}: {err}", stacklevel=3)


def cache_file(dm: LabelSource) -> Path:
    """One cache file per DataModule class and data root."""
    kind = f"{type(dm).__module__}.{type(dm).__qualname__}|{os.path.abspath(dm.root or '')}"
    return cache_dir() / f"labels-{hashlib.sha1(kind.encode()).hexdigest()[:16]}.json"


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cache holds some 10^5 small objects: without this, the cyclic garbage collector scans
    them again and again while the check allocates, and a cached check takes three times longer."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_label_check(
    dm: LabelSource, splits: Sequence[str] | None = None, *, workers: int | None = None
) -> LabelReport:
    """Check the labels of ``splits`` (default: the train, val and test splits of ``dm``)."""
    start = time.perf_counter()
    names = list(dict.fromkeys(splits or (dm.train_split, dm.val_split, dm.test_split)))
    contract = dm.contract
    heads = contract.num_classes
    cache = LabelCache(cache_file(dm))
    report = LabelReport(cache_file=cache.path)
    problems = Problems()
    with _collector_paused(), _Workers(workers) as pool:
        for split in names:
            t0 = time.perf_counter()
            files = dm.label_files(split)
            results, fresh = _results(dm, files, heads, cache, pool)
            seconds = time.perf_counter() - t0
            for head, n in heads.items():
                key = split if contract.single else f"{split}/{head}"
                report.splits[key] = _summary(
                    split,
                    head,
                    tuple(contract.class_names(head)),
                    n,
                    files,
                    results,
                    fresh,
                    problems,
                )
                report.splits[key].seconds = seconds  # the split's, shared by its heads
        cache.save()
    report.seconds = time.perf_counter() - start
    report.warnings = likely_mistakes(report, dm.train_split)
    for message in report.warnings:
        warnings.warn(f"label check: {message}", stacklevel=3)
    if problems.out_of_range or problems.unreadable:
        raise DataError(problems.message(heads))
    return report


def _results(
    dm: LabelSource,
    files: list[dict[str, Path]],
    heads: dict[str, int],
    cache: LabelCache,
    pool: _Workers,
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The counts of every label file, by key ``<absolute path>|<head>``, from the cache or read
    now; and the keys read now."""
    reader = type(dm).read_label
    reader_name = f"{reader.__module__}.{reader.__qualname__}"
    label_map = [[k, v] for k, v in sorted(dm.label_map.items())]  # as JSON gives it back
    results: dict[str, dict[str, Any]] = {}
    misses: list[tuple[str, list[Any], Item]] = []
    for sample in files:
        for head, path in sample.items():
            name = os.path.abspath(path)
            key = f"{name}|{head}"
            try:
                st = os.stat(name)
            except OSError as err:
                results[key] = {"error": f"label file {name}: {err.strerror}"}
                continue
            stamp = [st.st_size, st.st_mtime_ns, label_map, heads[head], reader_name]
            hit = cache.get(key, stamp)
            if hit is None:
                misses.append((key, stamp, (name, head, heads[head])))
            else:
                results[key] = hit
    read = pool.read(reader, dm.label_map, [item for _, _, item in misses])
    for (key, stamp, _), result in zip(misses, read, strict=True):
        results[key] = result
        if "error" not in result:
            cache.put(key, stamp, result)
    return results, {key for key, _, _ in misses}


@dataclass
class Problems:
    """What makes the check fail: values out of range, files that cannot be read."""

    out_of_range: list[tuple[str, str, str, list[int]]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # split, message

    def message(self, heads: dict[str, int]) -> str:
        lines = []
        if self.out_of_range:
            lines.append("label check: label values outside the classes and 255 (ignore):")
            groups: dict[tuple[str, str], list[tuple[str, list[int]]]] = {}
            for split, head, name, bad in self.out_of_range:
                groups.setdefault((split, head), []).append((name, bad))
            for (split, head), items in groups.items():
                n = heads[head]
                values = sorted({v for _, bad in items for v in bad})
                where = f"split '{split}'" + (f" head '{head}'" if len(heads) > 1 else "")
                lines.append(
                    f"  {where}: values {values[:8]} outside 0..{n - 1} (num_classes={n}) "
                    f"in {len(items)} file(s):"
                )
                lines += [f"    {name}: {bad}" for name, bad in items[:SHOW]]
            example = self.out_of_range[0][3][0]
            lines.append(
                "fix: set data.num_classes (or classes.txt) to the real number of classes, or map "
                f"the values with data.label_map, e.g. data.label_map={{{example}: 255}} to ignore "
                "them"
            )
        if self.unreadable:
            lines.append(f"label check: {len(self.unreadable)} label file(s) cannot be read:")
            lines += [f"  split '{split}': {message}" for split, message in self.unreadable[:SHOW]]
        return "\n".join(lines)


def _summary(
    split: str,
    head: str,
    class_names: tuple[str, ...],
    n: int,
    files: list[dict[str, Path]],
    results: dict[str, dict[str, Any]],
    fresh: set[str],
    problems: Problems,
) -> SplitLabels:
    """One split's (and head's) totals; its bad files go to ``problems``."""
    hists, ignored, pixels, empty, cached = [np.zeros(n, np.int64)], 0, 0, [], 0
    for sample in files:
        name = os.path.abspath(sample[head])
        key = f"{name}|{head}"
        result = results[key]
        cached += key not in fresh
        if "error" in result:
            problems.unreadable.append((split, result["error"]))
            continue
        hists.append(result["hist"])
        ignored, pixels = ignored + result["ignored"], pixels + result["pixels"]
        if result["bad"]:
            problems.out_of_range.append((split, head, name, result["bad"]))
        if not any(result["hist"]):
            empty.append(name)
    return SplitLabels(
        split=split,
        head=head,
        class_names=class_names,
        images=len(files),
        histogram=np.array(hists, np.int64).sum(axis=0),
        ignored=ignored,
        pixels=pixels,
        empty=empty,
        cached=cached,
        seconds=0.0,
    )


def likely_mistakes(report: LabelReport, train_split: str) -> list[str]:
    """Findings that are probably a mistake, each with its likely cause and fix."""
    found = []
    for key, s in report.splits.items():
        others = int(s.histogram[1:].sum())
        if s.ignored and not others:
            found.append(
                f"split '{key}' holds only class 0 and 255 (ignored): masks saved as 0/255? "
                "set data.label_map={255: 1}"
            )
            continue
        if s.histogram.any() and not others:
            found.append(f"every labelled pixel of split '{key}' is class 0: are the masks empty?")
        elif s.ignored_share > IGNORED_WARN:
            found.append(
                f"{100 * s.ignored_share:.0f}% of the pixels of split '{key}' are ignored (255): "
                "is a class saved as 255? map it with data.label_map, e.g. {255: 1}"
            )
        if s.split == train_split and s.absent:
            more = f" +{len(s.absent) - SHOW} more" if len(s.absent) > SHOW else ""
            found.append(
                f"classes never in the training split '{key}': {', '.join(s.absent[:SHOW])}{more} "
                "(the model cannot learn them: check data.num_classes / classes.txt, data.label_map)"
            )
    return found
