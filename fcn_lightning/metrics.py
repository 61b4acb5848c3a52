"""The paper's four metrics (section 5; docs/PAPER.md "Metrics") on torchmetrics.

``hist`` is the confusion matrix over labelled pixels (rows = ground truth):
pixel acc = diag.sum / hist.sum; mean acc = nanmean(diag / hist.sum(1));
IU = diag / (hist.sum(1) + hist.sum(0) - diag); mean IU = nanmean(IU);
f.w. IU = sum over classes with freq > 0 of freq * IU.
A class absent from both prediction and ground truth is NaN and left out of the means."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex

from .contract import IGNORE_INDEX, METRIC_NAMES


def _labels(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class indices from logits (N, C, H, W) or labels (N, H, W)."""
    return preds.argmax(1) if preds.dim() == target.dim() + 1 else preds


class PixelAccuracy(Metric):
    """Correct / labelled pixels; ignored pixels count in neither. Sum states: exact under DDP."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds = _labels(preds, target)
        valid = target != self.ignore_index
        self.correct += ((preds == target) & valid).sum()
        self.total += valid.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class ConfusionJaccardIndex(MulticlassJaccardIndex):
    """torchmetrics' mean IoU (macro, ignore_index 255), its confusion matrix (rows = ground
    truth) built with one ``scatter_add_``: no host sync per batch."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        kwargs.setdefault("validate_args", False)
        super().__init__(
            num_classes=num_classes, average="macro", ignore_index=ignore_index, **kwargs
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        n = self.num_classes
        preds = _labels(preds, target).reshape(-1).long()
        target = target.reshape(-1).long()
        valid = (target != self.ignore_index) & (target >= 0) & (target < n)
        index = torch.where(valid, target * n + preds, n * n)  # ignored pixels go to a spare bin
        counts = torch.zeros(n * n + 1, dtype=self.confmat.dtype, device=self.confmat.device)
        counts.scatter_add_(0, index, torch.ones_like(index, dtype=counts.dtype))
        self.confmat += counts[:-1].view(n, n)


def scores_from_confmat(
    hist: torch.Tensor, exclude_absent: bool = False
) -> dict[str, torch.Tensor]:
    """score.py's numbers from a confusion matrix (rows = ground truth); ``exclude_absent``:
    classes absent from the ground truth leave every mean (the SIFT Flow caveat)."""
    hist = hist.double()
    diag, gt, pred, total = hist.diag(), hist.sum(1), hist.sum(0), hist.sum()
    iou = diag / (gt + pred - diag)  # NaN where absent from both
    if exclude_absent:
        iou = torch.where(gt > 0, iou, torch.nan)
    freq = gt / total
    present = freq > 0
    return {
        "pixel_acc": diag.sum() / total,
        "mean_acc": (diag / gt).nanmean(),  # NaN per class absent from the ground truth
        "mIoU": iou.nanmean(),
        "fwIoU": (freq[present] * iou[present]).sum(),
        "per_class_IoU": iou,
    }


class HeadMetrics(nn.Module):
    """Mean IoU (torchmetrics) and pixel accuracy (our Metric) of one head and split; ``compute``
    gives all four numbers, the per-class IoU and the confusion matrix (summed over processes)."""

    def __init__(self, num_classes: int, exclude_absent: bool = False) -> None:
        super().__init__()
        self.exclude_absent = exclude_absent
        self.jaccard = ConfusionJaccardIndex(num_classes)
        self.pixel_acc = PixelAccuracy()

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.jaccard.update(preds, target)
        self.pixel_acc.update(preds, target)

    def compute(self) -> dict[str, torch.Tensor]:
        with self.jaccard.sync_context():  # under DDP: summed over processes
            confmat = self.jaccard.confmat.clone()
        scores = scores_from_confmat(confmat, self.exclude_absent)
        if not self.exclude_absent:
            scores["mIoU"] = self.jaccard.compute()  # torchmetrics' macro IoU (== nanmean of IU)
        scores["pixel_acc"] = self.pixel_acc.compute()
        scores["confmat"] = confmat
        return scores

    def reset(self) -> None:
        self.jaccard.reset()
        self.pixel_acc.reset()


def summarize(
    scores: dict[str, torch.Tensor], class_names: Sequence[str], exclude_absent: bool = False
) -> dict[str, Any]:
    """One head's scores as metrics.json holds them: the four numbers, ``per_class_IoU`` by
    class (None where absent) and, with ``exclude_absent``, the classes left out."""
    per_class = scores["per_class_IoU"].tolist()
    block: dict[str, Any] = {k: float(scores[k]) for k in METRIC_NAMES}
    block["per_class_IoU"] = {
        c: (None if math.isnan(v) else v) for c, v in zip(class_names, per_class, strict=False)
    }
    if exclude_absent:
        absent = (scores["confmat"].sum(1) == 0).tolist()
        block["excluded_classes"] = [c for c, a in zip(class_names, absent, strict=False) if a]
    return block
