"""The label check run once before training, ``SegmentationDataModule.check_labels()``: every
label file read as training reads it, by a DataLoader, and counted; the counts cached per file
(docs/TRAINING.md)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..atomic import write_json_atomic
from ..contract import IGNORE_INDEX
from ..errors import DataError
from .readers import map_labels

CACHE_VERSION = 3  # 3: the inode in the stamp
IGNORED_WARN = 0.5  # warn when more than this share of a split's pixels is ignored
SHOW = 5  # files and classes named in a message


def _more(names: list[str]) -> str:
    return ", ".join(names[:SHOW]) + (f" +{len(names) - SHOW} more" if len(names) > SHOW else "")


@dataclass
class SplitLabels:
    """What the labels of one split (and head) hold."""

    split: str
    head: str
    class_names: tuple[str, ...]
    images: int
    histogram: np.ndarray  # labelled pixels per class
    ignored: int = 0  # pixels labelled 255
    pixels: int = 0
    empty: list[str] = field(default_factory=list)  # label files without a labelled pixel
    cached: int = 0  # files served from the cache
    seconds: float = 0.0

    @property
    def ignored_share(self) -> float:
        return self.ignored / self.pixels if self.pixels else 0.0

    @property
    def absent(self) -> list[str]:  # classes that never occur in this split
        return [n for n, c in zip(self.class_names, self.histogram, strict=True) if c == 0]

    @property
    def from_cache(self) -> bool:
        return self.cached == self.images


@dataclass
class LabelReport:
    """The findings by split (``<split>/<head>`` with several heads), and the likely mistakes."""

    splits: dict[str, SplitLabels] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cache_file: Path | None = None
    note: str = ""

    @property
    def from_cache(self) -> bool:  # no label file was read
        return bool(self.splits) and all(s.from_cache for s in self.splits.values())

    def format(self) -> str:  # a line per split, then the warnings
        if not self.splits:
            return f"label check: {self.note or 'no labels to check'}"
        source = "from the cache" if self.from_cache else f"cache {self.cache_file}"
        lines = [f"label check: {len(self.splits)} split(s) in {self.seconds:.2f} s ({source})"]
        for key, s in self.splits.items():
            read = "cached" if s.from_cache else f"{s.images - s.cached} read"
            lines.append(
                f"  {key}: {s.images} images, {100 * s.ignored_share:.1f}% ignored, "
                f"{len(s.empty)} without labelled pixels, classes absent: "
                f"{_more(s.absent) or 'none'} ({read}, {s.seconds:.2f} s)"
            )
        return "\n".join(lines + [f"  warning: {w}" for w in self.warnings])


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
    hist, ignored = counts[:num_classes].tolist(), int(counts[IGNORE_INDEX])
    return {"hist": hist, "ignored": ignored, "pixels": pixels, "bad": sorted(bad)[:8]}


def _read(reader: Callable, label_map: dict, heads: dict, batch: list) -> list[dict[str, Any]]:
    """The loader's collate, run in its workers: each label file's counts, or its error."""
    results = []
    for path, head in batch:
        try:
            label = map_labels(reader(Path(path), head), label_map)
            results.append(count_labels(label, heads[head]))
        except Exception as err:
            results.append(
                {"error": str(err) if isinstance(err, DataError) else f"{path}: {err!r}"}
            )
    return results


def _cache(dm: Any) -> tuple[Path, dict[str, Any]]:
    """The cache file, one per DataModule class (hence reader), data root and label map, and its
    entries: none from a missing, unreadable, corrupt or older file."""
    env = os.environ.get("FCN_LIGHTNING_CACHE")
    folder = Path(env).expanduser() if env else Path.home() / ".cache" / "fcn_lightning" / "labels"
    kind = f"{type(dm).__module__}.{type(dm).__qualname__}|{os.path.abspath(dm.root or '')}"
    kind += f"|{sorted(dm.label_map.items())}"
    path = folder / f"labels-{hashlib.sha1(kind.encode()).hexdigest()[:16]}.json"
    try:
        data = json.loads(path.read_text())
        ok = data["version"] == CACHE_VERSION and isinstance(data["entries"], dict)
        return path, data["entries"] if ok else {}
    except (OSError, ValueError, KeyError, TypeError):
        return path, {}


def run_label_check(
    dm: Any, splits: Sequence[str] | None = None, *, workers: int | None = None
) -> LabelReport:
    """Check the labels of ``splits`` of ``dm``, read by ``workers`` loader processes."""
    start = time.perf_counter()
    contract, heads = dm.contract, dm.contract.num_classes
    cache, entries = _cache(dm)
    report = LabelReport(cache_file=cache)
    workers = dm.num_workers if workers is None else workers
    names = list(dict.fromkeys(splits or (dm.train_split, dm.val_split, dm.test_split)))
    files = {
        s: [{h: os.path.abspath(p) for h, p in x.items()} for x in dm.label_files(s)] for s in names
    }
    results, misses = {}, {}  # counts by (path, head); the files to read: their stamp, split
    for split in names:
        for key in ((p, h) for sample in files[split] for h, p in sample.items()):
            if key in results:
                continue  # in a split before
            try:
                st = os.stat(key[0])
            except OSError as err:
                results[key] = {"error": f"label file {key[0]}: {err.strerror}"}
                continue
            # ctime: set by every change of the file (and by `touch -r`, a restore), by no tool
            # back to an older time; the inode: a file replaced by another (rename, rsync)
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, heads[key[1]]]
            entry = entries.get("|".join(key))
            if isinstance(entry, dict) and entry.get("stamp") == stamp and "hist" in entry:
                results[key] = entry
            else:
                misses[key] = stamp, split
    loader = DataLoader(
        list(misses),
        batch_size=max(1, min(16, -(-len(misses) // max(1, workers)))),
        num_workers=workers if len(misses) > 1 else 0,
        collate_fn=partial(_read, type(dm).read_label, dm.label_map, heads),
        generator=torch.Generator(),  # its own: the global random state stays as training's
    )
    done = dict.fromkeys(names, time.perf_counter())  # when a split's last file was read
    read = (result for batch in loader for result in batch)
    for (key, (stamp, split)), result in zip(misses.items(), read, strict=True):
        results[key], done[split] = result, time.perf_counter()
        if "error" not in result:
            entries["|".join(key)] = {"stamp": stamp, **result}
    bad: dict[tuple[str, str], list] = {}  # (split, head) -> [(file, values out of range)]
    unreadable: list[str] = []
    before = start
    for split in names:
        end = max(done[split], before)
        for head in heads:
            classes = tuple(contract.class_names(head))
            s = SplitLabels(
                split, head, classes, len(files[split]), np.zeros(len(classes), np.int64)
            )
            s.seconds = end - before  # the split's, shared by its heads
            for path in (sample[head] for sample in files[split]):
                s.cached += (path, head) not in misses
                if "error" in (r := results[path, head]):
                    unreadable.append(f"  split '{split}': {r['error']}")
                    continue
                s.histogram += r["hist"]
                s.ignored, s.pixels = s.ignored + r["ignored"], s.pixels + r["pixels"]
                if not any(r["hist"]):
                    s.empty.append(path)
                if r["bad"]:
                    bad.setdefault((split, head), []).append((path, r["bad"]))
            report.splits[split if contract.single else f"{split}/{head}"] = s
        before = end
    try:  # atomically, when a file was read; a failure warns, never stops the run
        if misses:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache, {"version": CACHE_VERSION, "entries": entries}, indent=None)
    except OSError as err:
        warnings.warn(f"label check: cache not written to {cache}: {err}", stacklevel=3)
    report.seconds = time.perf_counter() - start
    report.warnings = likely_mistakes(report, dm.train_split)
    for message in report.warnings:
        warnings.warn(f"label check: {message}", stacklevel=3)
    if bad or unreadable:
        raise DataError(_problems(bad, unreadable, heads))
    return report


def _problems(bad: dict, unreadable: list[str], heads: dict[str, int]) -> str:
    """What fails the check: values out of range by split (and head), unreadable files."""
    lines = ["label check: label values outside the classes and 255 (ignore):"] if bad else []
    for (split, head), items in bad.items():
        n, values = heads[head], sorted({v for _, found in items for v in found})
        where = f"split '{split}'" + (f" head '{head}'" if len(heads) > 1 else "")
        lines.append(
            f"  {where}: values {values[:8]} outside 0..{n - 1} (num_classes={n}) "
            f"in {len(items)} file(s):"
        )
        lines += [f"    {name}: {found}" for name, found in items[:SHOW]]
    if bad:
        example = next(iter(bad.values()))[0][1][0]
        lines.append(
            "fix: set data.num_classes (or classes.txt) to the real number of classes, or map the "
            f"values with data.label_map, e.g. data.label_map={{{example}: 255}} to ignore them"
        )
    if unreadable:
        lines.append(f"label check: {len(unreadable)} label file(s) cannot be read:")
    return "\n".join(lines + unreadable[:SHOW])


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
            found.append(
                f"classes never in the training split '{key}': {_more(s.absent)} "
                "(the model cannot learn them: check data.num_classes / classes.txt, data.label_map)"
            )
    return found
