"""The layout check of a dataset on disk: per split, the ids its list names, the files found
for each (images, labels, ...) and the official count.

A DataModule builds it from its own split logic (``VOCDataModule.check_layout``,
``SiftFlowDataModule.check_layout``, ``NYUDDataModule.check_layout``); ``python -m
fcn_lightning.prepare`` prints it. A count that differs from the official one is a warning (a
subset is fine); a file that a split lists but that is absent is an error naming the file.
Training does not run it: it stays quiet on the small subsets users and tests train on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

SHOWN = 5  # missing files named per split


@dataclass
class SplitCount:
    split: str
    listed: int
    found: dict[str, int]  # column (images, labels, ...) -> files present
    official: int | None
    missing: list[Path] = field(default_factory=list)


@dataclass
class LayoutReport:
    title: str
    columns: tuple[str, ...]
    splits: list[SplitCount] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts worth knowing, not problems
    problems: list[str] = field(default_factory=list)  # what makes the layout unusable
    cautions: list[str] = field(default_factory=list)  # usable, but not for everything

    @property
    def warnings(self) -> list[str]:
        return [*self.cautions] + [
            f"{s.split}: {s.listed:,} listed, the official split has {s.official:,} "
            "(a subset or another release?)"
            for s in self.splits
            if s.official is not None and s.listed != s.official
        ]

    @property
    def errors(self) -> list[str]:
        out = list(self.problems)
        for s in self.splits:
            if s.missing:
                names = ", ".join(str(p) for p in s.missing[:SHOWN])
                more = f" and {len(s.missing) - SHOWN} more" if len(s.missing) > SHOWN else ""
                out.append(f"{s.split}: {len(s.missing):,} listed file(s) missing: {names}{more}")
        return out

    @property
    def ok(self) -> bool:
        return not self.errors

    def count(self, split: str) -> int | None:
        return next((s.listed for s in self.splits if s.split == split), None)

    def format(self) -> str:
        width = max([len("split"), *(len(s.split) for s in self.splits)])
        head = f"  {'split':<{width}}  {'listed':>7}" + "".join(f"  {c:>7}" for c in self.columns)
        lines = [self.title, head + f"  {'official':>8}"]
        for s in self.splits:
            row = f"  {s.split:<{width}}  {s.listed:>7,}" + "".join(
                f"  {s.found.get(c, 0):>7,}" for c in self.columns
            )
            lines.append(row + f"  {s.official if s.official is not None else '-':>8,}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  error: {e}" for e in self.errors]
        lines.append("  layout: complete" if self.ok else "  layout: INCOMPLETE")
        return "\n".join(lines)

    def raise_for_errors(self) -> None:
        if not self.ok:
            raise DataError(
                "the dataset is incomplete:\n" + "\n".join(f"  {e}" for e in self.errors)
            )


class Listing:
    """Names in each folder, read once: a split of 10,000 ids costs one directory read per
    folder, not 10,000 file checks."""

    def __init__(self) -> None:
        self._names: dict[Path, set[str]] = {}

    def exists(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._names:
            try:
                self._names[folder] = set(os.listdir(folder))
            except OSError:
                self._names[folder] = set()
        return path.name in self._names[folder]


def count_split(
    split: str,
    ids: Sequence[object],
    files: Callable[[object], dict[str, Path]],
    official: int | None,
    listing: Listing | None = None,
) -> SplitCount:
    """Count the files of each column for the ids of a split; list those absent."""
    listing = listing or Listing()
    found: dict[str, int] = {}
    missing: list[Path] = []
    for i in ids:
        for column, path in files(i).items():
            if listing.exists(path):
                found[column] = found.get(column, 0) + 1
            else:
                missing.append(path)
    return SplitCount(split, len(ids), found, official, missing)
