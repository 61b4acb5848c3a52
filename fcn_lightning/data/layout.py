"""The layout check of a dataset on disk (``check_layout``, printed by ``python -m
fcn_lightning.prepare``; docs/DATA.md): per split, the ids, the files found, the official count."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

Files = Callable[[object], dict[str, Path]]  # an id -> its file of each column


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
        return self.cautions + [
            f"{s.split}: {s.listed:,} listed, the official split has {s.official:,} "
            "(a subset or another release?)"
            for s in self.splits
            if s.official is not None and s.listed != s.official
        ]

    @property
    def errors(self) -> list[str]:
        return self.problems + [
            f"{s.split}: {len(s.missing):,} listed file(s) missing: "
            + ", ".join(map(str, s.missing[:5]))
            + f" and {len(s.missing) - 5} more" * (len(s.missing) > 5)
            for s in self.splits
            if s.missing
        ]

    @property
    def ok(self) -> bool:
        return not self.errors

    def count(self, split: str) -> int | None:
        return next((s.listed for s in self.splits if s.split == split), None)

    def format(self) -> str:
        w = max([len("split"), *(len(s.split) for s in self.splits)])
        lines = [self.title, f"  {'split':<{w}}  {'listed':>7}"]
        lines[1] += "".join(f"  {c:>7}" for c in self.columns) + f"  {'official':>8}"
        for s in self.splits:
            found = "".join(f"  {s.found.get(c, 0):>7,}" for c in self.columns)
            official = f"{s.official:,}" if s.official is not None else "-"
            lines.append(f"  {s.split:<{w}}  {s.listed:>7,}{found}  {official:>8}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {n}" for n in self.warnings]
        lines += [f"  error: {n}" for n in self.errors]
        return "\n".join([*lines, "  layout: complete" if self.ok else "  layout: INCOMPLETE"])

    def count_splits(
        self,
        splits: Sequence[str],
        split_ids: Callable[[str], Sequence[object]],
        files: Files,
        official: dict[str, int],
        listing: Listing | None = None,
    ) -> None:
        """:func:`count_split` for each split; one whose ids cannot be listed is a problem."""
        listing = Listing() if listing is None else listing
        for split in splits:
            try:
                ids = split_ids(split)
            except DataError as err:
                self.problems.append(f"{split}: {str(err).splitlines()[0]}")
                continue
            self.splits.append(count_split(split, ids, files, official.get(split), listing))

    def raise_for_errors(self) -> None:
        if not self.ok:
            raise DataError("\n  ".join(["the dataset is incomplete:", *self.errors]))


class Listing(dict):
    """Folder -> the names in it, read once: a split of 10,000 ids costs one read per folder."""

    def __missing__(self, folder: Path) -> set[str]:
        try:
            names = self[folder] = set(os.listdir(folder))
        except OSError:
            names = self[folder] = set()
        return names


def count_split(
    split: str, ids: Sequence[object], files: Files, official: int | None, listing: Listing
) -> SplitCount:
    """Count the files of each column for the ids of a split; list those absent."""
    count = SplitCount(split, len(ids), {}, official)
    for column, path in ((c, p) for i in ids for c, p in files(i).items()):
        if path.name in listing[path.parent]:
            count.found[column] = count.found.get(column, 0) + 1
        else:
            count.missing.append(path)
    return count


def layout_text(template: str, root: Path | None, **fields: object) -> str:
    """A DataModule's expected layout under ``root``, with the root for the prepare command."""
    arg = shlex.quote(str(root)) if root is not None else "<data.root>"
    return template.format(where=f" ({root})" if root is not None else "", arg=arg, **fields)
