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
        self.add_state("invalid", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")  # labels, predictions

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Count one prediction against its label. On an accelerator nothing is read back to the host (no
        synchronisation per image): out-of-range values are counted and :meth:`compute` raises on them. On the
        CPU, where reading is free, they raise here."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        num_classes, bins = self.num_classes, self.num_classes**2
        label, pred = label.flatten().long(), pred.flatten().long().to(label.device)
        if label.device.type == "cpu":
            keep = label != self.ignore_index
            label, pred = label[keep], pred[keep]
            if label.numel():
                self._raise_if_invalid(int((label < 0).sum() + (label >= num_classes).sum()),
                                       int((pred < 0).sum() + (pred >= num_classes).sum()))
            # torch.bincount directly: torchmetrics' helper builds an N×C² mesh under deterministic mode.
            counts = torch.bincount(label * num_classes + pred, minlength=bins)
        else:
            counts, invalid = self.count_without_sync(label, pred)
            self.invalid += invalid
        self.confmat += counts.view(num_classes, num_classes).to(self.confmat.device)

    def count_without_sync(self, label: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C² counts, [invalid labels, invalid predictions]) of flat ``label``/``pred`` with fixed-size ops only:
        ignored and invalid pixels go to one extra bin that is dropped (no boolean indexing, and no bincount, which
        reads the maximum back to size its output)."""
        num_classes, bins = self.num_classes, self.num_classes**2
        counted = label != self.ignore_index
        bad_label = counted & ((label < 0) | (label >= num_classes))
        bad_pred = counted & ((pred < 0) | (pred >= num_classes))
        keep = counted & ~bad_label & ~bad_pred
        index = torch.where(keep, label * num_classes + pred, torch.full_like(label, bins))
        counts = torch.zeros(bins + 1, dtype=torch.long, device=label.device).index_add_(0, index,
                                                                                          torch.ones_like(index))
        return counts[:bins], torch.stack([bad_label.sum(), bad_pred.sum()])

    def _raise_if_invalid(self, bad_labels: int, bad_preds: int) -> None:
        if bad_labels:
            raise ValueError(f"{bad_labels} label values outside [0, {self.num_classes}) and != {self.ignore_index}")
        if bad_preds:
            raise ValueError(f"{bad_preds} predicted ids outside [0, {self.num_classes})")

    def compute(self) -> torch.Tensor:
        self._raise_if_invalid(*(int(v) for v in self.invalid))
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
