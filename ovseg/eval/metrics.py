"""Confusion-matrix segmentation metrics with mmsegmentation ``IoUMetric`` semantics.

- pixels labelled 255 are removed from prediction and label;
- one C×C int64 matrix (rows = ground truth) is summed over the whole split and over DDP ranks;
- IoU_c = TP/(TP+FP+FN), NaN (excluded from mIoU) when the class is absent from both;
- Acc_c = TP/(TP+FN), NaN (excluded from mAcc) when the class is absent from the ground truth,
  even if it was predicted (torchmetrics' macro accuracy counts it as 0 instead);
- pAcc = trace / labelled pixels. Scores in percent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics import Metric

from ovseg.data.specs import IGNORE_INDEX


class ConfusionMatrix(Metric):
    """C×C int64 confusion matrix, sum-reduced across processes (exact under DDP)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        keep = label != self.ignore_index
        label = label[keep].long()
        pred = pred[keep].long()
        if label.numel() and (label.min() < 0 or label.max() >= self.num_classes):
            raise ValueError(f"label values outside [0, {self.num_classes}) and != {self.ignore_index}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted ids outside [0, {self.num_classes})")
        # torch.bincount directly: torchmetrics' helper builds an N×C² mesh under deterministic mode.
        counts = torch.bincount(label * self.num_classes + pred, minlength=self.num_classes**2)
        self.confmat += counts.view(self.num_classes, self.num_classes)

    def compute(self) -> torch.Tensor:
        return self.confmat


@dataclass
class SegScores:
    mIoU: float
    pAcc: float
    mAcc: float
    iou: np.ndarray  # per class, percent, NaN where undefined
    acc: np.ndarray


def scores_from_confusion(confmat: np.ndarray | torch.Tensor) -> SegScores:
    cm = np.asarray(confmat.cpu() if isinstance(confmat, torch.Tensor) else confmat, dtype=np.float64)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan) * 100
        acc = np.where(gt > 0, tp / gt, np.nan) * 100
    total = cm.sum()
    return SegScores(
        mIoU=_nanmean(iou),
        pAcc=float(tp.sum() / total * 100) if total > 0 else float("nan"),
        mAcc=_nanmean(acc),
        iou=iou,
        acc=acc,
    )


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
