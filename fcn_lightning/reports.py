"""Results as they leave the project: TensorBoard tags, metrics.json / eval.json's short form
(no head level when the only head is ``SINGLE_HEAD``) and the printed table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .contract import METRIC_NAMES, SINGLE_HEAD

METRIC_TITLES = dict(mIoU="mIoU %", pixel_acc="pixel acc", mean_acc="mean acc", fwIoU="fwIoU")


def tag(split: str, head: str, name: str, single: bool) -> str:
    """A logged metric's name: ``val/mIoU`` with one head, ``val/sem/mIoU`` with several."""
    return f"{split}/{name}" if single else f"{split}/{head}/{name}"


def short_form(results: Mapping[str, Any]) -> Mapping[str, Any]:
    """Per-head results as reports write them: the block alone for the single head."""
    return results[SINGLE_HEAD] if list(results) == [SINGLE_HEAD] else results


def long_form(block: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`short_form`: ``{head: block}`` from what a report holds."""
    return {SINGLE_HEAD: dict(block)} if "mIoU" in block else dict(block)


def headline(block: Mapping[str, Any]) -> float:
    """The number sweepers optimise and summaries show: mIoU of the first head."""
    return float(next(iter(long_form(block).values()))["mIoU"])


def format_table(metrics: Mapping[str, Any]) -> str:
    """One row per stage (and head, where several) with the four metrics in percent; results
    in either form."""
    rows = []
    for stage, block in metrics.items():
        heads = long_form(block)
        for head, m in heads.items():
            name = stage if list(heads) == [SINGLE_HEAD] else f"{stage}/{head}"
            rows.append(f"{name:<18}" + "".join(f"{100 * m[k]:>11.1f}" for k in METRIC_NAMES))
    header = f"{'stage':<18}" + "".join(f"{METRIC_TITLES[k]:>11}" for k in METRIC_NAMES)
    return "\n".join([header, "-" * len(header), *rows])
