"""The confusion-matrix metric against an independent numpy re-computation of mmseg's IoUMetric."""

import numpy as np
import pytest
import torch

from ovseg.eval.metrics import ConfusionMatrix, scores_from_confusion


def mmseg_reference(preds, labels, num_classes, ignore_index=255):
    """mmseg `intersect_and_union` + `total_area_to_metrics`, re-written with numpy histograms."""
    inter = np.zeros(num_classes)
    area_pred = np.zeros(num_classes)
    area_label = np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]
        inter += np.histogram(pred[pred == label], bins=num_classes, range=(0, num_classes))[0]
        area_pred += np.histogram(pred, bins=num_classes, range=(0, num_classes))[0]
        area_label += np.histogram(label, bins=num_classes, range=(0, num_classes))[0]
    union = area_pred + area_label - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / area_label
    return {
        "aAcc": inter.sum() / area_label.sum() * 100,
        "mIoU": np.nanmean(iou) * 100,
        "mAcc": np.nanmean(acc) * 100,
        "IoU": iou * 100,
        "Acc": acc * 100,
    }


def random_case(rng, num_classes=7, n=4):
    preds, labels = [], []
    for _ in range(n):
        h, w = rng.integers(5, 30, size=2)
        # class 5 never appears in ground truth but is predicted; class 6 appears nowhere
        label = rng.integers(0, 5, size=(h, w))
        label[rng.random((h, w)) < 0.2] = 255
        pred = rng.integers(0, 6, size=(h, w))
        preds.append(pred)
        labels.append(label)
    return preds, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_mmseg_reference(seed):
    rng = np.random.default_rng(seed)
    preds, labels = random_case(rng)
    metric = ConfusionMatrix(7)
    for pred, label in zip(preds, labels):
        metric.update(torch.from_numpy(pred), torch.from_numpy(label))
    scores = scores_from_confusion(metric.compute())
    ref = mmseg_reference(preds, labels, 7)
    assert scores.pAcc == pytest.approx(ref["aAcc"])
    assert scores.mIoU == pytest.approx(ref["mIoU"])
    assert scores.mAcc == pytest.approx(ref["mAcc"])
    np.testing.assert_allclose(scores.iou, ref["IoU"], equal_nan=True)
    np.testing.assert_allclose(scores.acc, ref["Acc"], equal_nan=True)
    # class 6 absent everywhere: excluded from both means; class 5 predicted but not in GT:
    # IoU 0 (counts in mIoU), Acc NaN (excluded from mAcc) — where torchmetrics' macro accuracy differs.
    assert np.isnan(scores.iou[6]) and np.isnan(scores.acc[6])
    assert scores.iou[5] == 0 and np.isnan(scores.acc[5])


def test_ignore_pixels_removed_from_prediction_and_label():
    label = torch.tensor([[0, 255], [1, 1]])
    pred = torch.tensor([[0, 1], [1, 0]])
    metric = ConfusionMatrix(2)
    metric.update(pred, label)
    # the ignored pixel's prediction (1) must not count as a false positive of class 1
    assert metric.compute().tolist() == [[1, 0], [1, 1]]


def test_rows_are_ground_truth():
    metric = ConfusionMatrix(3)
    metric.update(torch.tensor([2, 2, 2]), torch.tensor([0, 0, 1]))
    cm = metric.compute()
    assert cm[0, 2] == 2 and cm[1, 2] == 1 and cm.sum() == 3


def test_label_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="label values outside"):
        ConfusionMatrix(3).update(torch.tensor([0]), torch.tensor([7]))


def test_accelerator_counting_matches_bincount_and_defers_invalid_values():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, 500)
    label[rng.random(500) < 0.2] = 255
    pred = rng.integers(0, 5, 500)
    metric = ConfusionMatrix(5)
    counts, invalid = metric.count_without_sync(torch.from_numpy(label), torch.from_numpy(pred))
    keep = label != 255
    expected = np.bincount(label[keep] * 5 + pred[keep], minlength=25)
    assert np.array_equal(counts.numpy(), expected) and invalid.tolist() == [0, 0]
    label[:3], pred[3:7], pred[7:9] = 9, -1, 5  # 3 bad labels, 6 bad predictions (not ignored)
    label[3:9] = 0
    counts, invalid = metric.count_without_sync(torch.from_numpy(label), torch.from_numpy(pred))
    assert invalid.tolist() == [3, 6]
    keep = (label != 255) & (label < 5) & (pred >= 0) & (pred < 5)  # invalid pixels land in no bin
    assert np.array_equal(counts.numpy(), np.bincount(label[keep] * 5 + pred[keep], minlength=25))
    metric.invalid += invalid  # as update() does on a GPU; compute() then refuses
    with pytest.raises(ValueError, match="3 label values outside"):
        metric.compute()
