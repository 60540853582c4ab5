"""Sliding-window and chunked label inference against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.eval.inference import labels_from_logits, slide_logits, slide_windows
from ovseg.utils.geometry import keep_ratio_size


def conv_dense_fn(num_queries=5, stride=4, seed=0):
    """A deterministic stand-in for a method: a strided conv (position-independent, so windows agree)."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, num_queries, kernel_size=stride, stride=stride)
    return lambda images: conv(images).detach()


def test_keep_ratio_size_matches_mmcv_rescale():
    # mmseg Resize(scale=(2048, 336), keep_ratio=True) on a 500x375 (w x h) VOC image -> 448x336
    assert keep_ratio_size(375, 500, 336, 2048) == (336, 448)
    # fit in 520x520: the long side decides
    assert keep_ratio_size(375, 500, 520, 520) == (390, 520)
    # a panorama: the long-side cap wins over the short side
    assert keep_ratio_size(100, 4000, 336, 2048) == (51, 2048)


def test_slide_grid_covers_and_matches_mmseg_formula():
    windows = slide_windows(300, 500, 224, 112)
    assert len(windows) == (1 + math.ceil((300 - 224) / 112)) * (1 + math.ceil((500 - 224) / 112))
    assert all(y2 - y1 == 224 and x2 - x1 == 224 for y1, y2, x1, x2 in windows)
    assert max(y2 for _, y2, _, _ in windows) == 300 and max(x2 for _, _, _, x2 in windows) == 500
    # smaller than the crop: one window, the image itself
    assert slide_windows(100, 150, 224, 112) == [(0, 100, 0, 150)]


def test_slide_equals_whole_when_one_window_covers_the_image():
    fn = conv_dense_fn()
    image = torch.rand(1, 3, 64, 48)
    slide = slide_logits(fn, image, crop=64, stride=32)
    whole = F.interpolate(fn(image), size=(64, 48), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(slide, whole)


@pytest.mark.parametrize("window_batch_size", [1, 3, 100])
def test_overlapping_windows_are_count_averaged(window_batch_size):
    fn = conv_dense_fn(num_queries=3)
    image = torch.rand(1, 3, 40, 56)
    crop, stride = 24, 16
    # independent reference: every window's upsampled scores, summed and divided per pixel
    total = torch.zeros(3, 40, 56)
    count = torch.zeros(40, 56)
    for y1, y2, x1, x2 in slide_windows(40, 56, crop, stride):
        out = F.interpolate(fn(image[:, :, y1:y2, x1:x2]), size=(y2 - y1, x2 - x1), mode="bilinear")[0]
        total[:, y1:y2, x1:x2] += out
        count[y1:y2, x1:x2] += 1
    assert count.max() > 1  # the case really overlaps
    torch.testing.assert_close(slide_logits(fn, image, crop, stride, window_batch_size), total / count)


def naive_labels(logits, out_size, q2c, scale=None, prob_thd=None, area_thd=None, bg=None):
    """SCLIP's postprocess on fully materialised scores."""
    up = F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0]
    num_classes = int(q2c.max()) + 1
    if scale:
        up = (up * scale).softmax(0)
    per_class = torch.stack([up[q2c == c].max(0).values for c in range(num_classes)])
    if area_thd is not None:
        pred = per_class.argmax(0)
        area = torch.stack([(pred == c).sum() for c in range(1, num_classes)]).float()
        keep = (area > area_thd * area.sum()).float()
        per_class[1:] *= keep[:, None, None]
    pred = per_class.argmax(0)
    if prob_thd is not None:
        pred[per_class.max(0).values < prob_thd] = bg
    return pred


@pytest.mark.parametrize(
    "scale,prob,area", [(None, None, None), (40.0, None, None), (40.0, 0.5, None), (10.0, 0.3, 0.15)]
)
def test_chunked_labels_equal_naive(scale, prob, area):
    torch.manual_seed(0)
    q2c = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4])  # background with synonyms, class 2 with two names
    logits = torch.randn(8, 6, 7) * 0.3
    expected = naive_labels(logits, (30, 41), q2c, scale, prob, area, bg=0)
    got = labels_from_logits(logits, (30, 41), q2c, logit_scale=scale, prob_threshold=prob, area_threshold=area,
                             background_index=0, max_chunk_bytes=30 * 41 * 4 * 3)
    assert torch.equal(got, expected)


def test_never_materialises_all_classes_at_full_resolution(interpolate_shapes):
    """171 classes on a 2048x1024 image: every upsampling call holds a bounded number of channels."""
    logits = torch.randn(171, 64, 128)
    pred = labels_from_logits(logits, (1024, 2048), torch.arange(171), max_chunk_bytes=64 * 2**20)
    assert pred.shape == (1024, 2048)
    assert max(s[1] for s in interpolate_shapes) * 1024 * 2048 * 4 <= 64 * 2**20
    assert max(s[1] for s in interpolate_shapes) < 171
