"""The label check run once before training, ``SegmentationDataModule.check_labels()``: every
label file read as training reads it and counted, the counts cached per file (docs/TRAINING.md)."""

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

CACHE_VERSION = 2
IGNORED_WARN = 0.5  # warn when more than this share of a split's pixels is ignored
SHOW = 5  # files and classes named in a message
FILES_PER_BATCH = 16  # label files a loader worker counts per batch


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
    pixels: int = 0  # all pixels
    empty: list[str] = field(default_factory=list)  # label files without a labelled pixel
    cached: int = 0  # files served from the cache
    seconds: float = 0.0  # time the split took

    @property
    def ignored_share(self) -> float:
        return self.ignored / self.pixels if self.pixels else 0.0

    @property
    def absent(self) -> list[str]:  # classes that never occur in this split
        return [n for n, c in zip(self.class_names, self.histogram, strict=True) if c == 0]

    @property
    def from_cache(self) -> bool:
        return self.cached == self.images

    def add(self, path: str, result: dict[str, Any]) -> None:
        self.histogram += np.asarray(result["hist"], np.int64)
        self.ignored, self.pixels = self.ignored + result["ignored"], self.pixels + result["pixels"]
        if not any(result["hist"]):
            self.empty.append(path)


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


def _histograms(reader: Callable, label_map: dict, batch: list[tuple]) -> list[dict[str, Any]]:
    """The loader's collate, run in its workers: each label file's counts, or its error."""
    results = []
    for path, head, n in batch:
        try:
            results.append(count_labels(map_labels(reader(Path(path), head), label_map), n))
        except Exception as err:
            error = str(err) if isinstance(err, DataError) else f"{path}: {err!r}"
            results.append({"error": error})
    return results


def cache_file(dm: Any) -> Path:
    """One file per DataModule class (hence reader), data root and label map."""
    env = os.environ.get("FCN_LIGHTNING_CACHE")
    folder = Path(env).expanduser() if env else Path.home() / ".cache" / "fcn_lightning" / "labels"
    kind = f"{type(dm).__module__}.{type(dm).__qualname__}|{os.path.abspath(dm.root or '')}"
    kind += f"|{sorted(dm.label_map.items())}"
    return folder / f"labels-{hashlib.sha1(kind.encode()).hexdigest()[:16]}.json"


def _load_cache(path: Path) -> dict[str, Any]:
    """The cached entries; none from a missing, unreadable, corrupt or older file."""
    try:
        data = json.loads(path.read_text())
        ok = data["version"] == CACHE_VERSION and isinstance(data["entries"], dict)
        return data["entries"] if ok else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _cached(entries: dict[str, Any], key: str, stamp: list[int]) -> dict[str, Any] | None:
    entry = entries.get(key)
    ok = isinstance(entry, dict) and entry.get("stamp") == stamp
    ok = ok and isinstance(entry.get("hist"), list) and len(entry["hist"]) == stamp[-1]
    return entry if ok and {"ignored", "pixels", "bad"} <= set(entry) else None


def _counts(dm: Any, splits: list[str], entries: dict, workers: int) -> tuple[dict, ...]:
    """Label files by split; counts by ``(path, head)``, cached (``entries``, updated) or read now
    by one loader; the keys read now; the seconds each split took."""
    t0, heads = time.perf_counter(), dm.contract.num_classes
    files, results, misses, owner = {}, {}, [], []
    for split in splits:
        files[split] = dm.label_files(split)
        for head, p in ((h, p) for sample in files[split] for h, p in sample.items()):
            if (key := (os.path.abspath(p), head)) in results:
                continue  # in a split before
            try:
                st = os.stat(key[0])
            except OSError as err:
                results[key] = {"error": f"label file {key[0]}: {err.strerror}"}
                continue
            # ctime: set by every change of the file, and by no tool back to an older time
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, heads[head]]
            results[key] = _cached(entries, "|".join(key), stamp)
            if results[key] is None:
                misses.append((key, stamp))
                owner.append(split)
    loader = DataLoader(
        [(*key, stamp[-1]) for key, stamp in misses],
        batch_size=max(1, min(FILES_PER_BATCH, -(-len(misses) // max(1, workers)))),
        num_workers=workers if len(misses) > 1 else 0,
        collate_fn=partial(_histograms, type(dm).read_label, dm.label_map),
        generator=torch.Generator(),  # its own: the global random state stays as training's
    )
    done = {split: time.perf_counter() for split in splits}  # when its last file was read
    for i, result in enumerate(result for batch in loader for result in batch):
        key, stamp = misses[i]
        results[key], done[owner[i]] = result, time.perf_counter()
        if "error" not in result:
            entries["|".join(key)] = {"stamp": stamp, **result}
    seconds, before = {}, t0
    for split in splits:
        end = max(done[split], before)
        seconds[split], before = end - before, end
    return files, results, {key for key, _ in misses}, seconds


def run_label_check(
    dm: Any, splits: Sequence[str] | None = None, *, workers: int | None = None
) -> LabelReport:
    """Check the labels of ``splits`` of ``dm``, read by ``workers`` loader processes."""
    start = time.perf_counter()
    contract, heads = dm.contract, dm.contract.num_classes
    report = LabelReport(cache_file=cache_file(dm))
    entries = _load_cache(report.cache_file)
    names = list(dict.fromkeys(splits or (dm.train_split, dm.val_split, dm.test_split)))
    workers = dm.num_workers if workers is None else workers
    files, results, fresh, seconds = _counts(dm, names, entries, workers)
    bad: dict[tuple[str, str], list] = {}  # (split, head) -> [(file, values out of range)]
    unreadable: list[str] = []
    for split, head in ((split, head) for split in names for head in heads):
        classes = tuple(contract.class_names(head))
        s = SplitLabels(split, head, classes, len(files[split]), np.zeros(len(classes), np.int64))
        for path in (os.path.abspath(sample[head]) for sample in files[split]):
            s.cached += (path, head) not in fresh
            if "error" in (result := results[path, head]):
                unreadable.append(f"  split '{split}': {result['error']}")
                continue
            s.add(path, result)
            if result["bad"]:
                bad.setdefault((split, head), []).append((path, result["bad"]))
        s.seconds = seconds[split]  # the split's, shared by its heads
        report.splits[split if contract.single else f"{split}/{head}"] = s
    try:  # atomically, when a file was read; a failure warns, never stops the run
        if fresh:
            report.cache_file.parent.mkdir(parents=True, exist_ok=True)
            data = {"version": CACHE_VERSION, "entries": entries}
            write_json_atomic(report.cache_file, data, indent=None)
    except OSError as err:
        warnings.warn(f"label check: cache not written to {report.cache_file}: {err}", stacklevel=3)
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
