"""Trident's pieces against float64 loop recomputations of the released code's formulas (github.com/YuHengsss/Trident
``open_clip/transformer.py`` ``get_sam_sim`` / ``guidance_attn``, ``seg_utils/utils.py`` ``preprocess_image``), and the
evaluator's hand-over of the original image."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ovseg.eval.inference import slide_windows
from ovseg.methods.trident import (
    DATASET_SETTINGS,
    Trident,
    clip_input_size,
    last_block_attention,
    sam_affinity,
    splice_windows,
)
from ovseg.models.clip import CLIPConfig
from ovseg.models.vfm import VFMConfig


def affinity_loops(values: np.ndarray, attention: np.ndarray, cos_fac: float, refine_neg_cos: bool) -> np.ndarray:
    """get_sam_sim for one image, in float64 with loops: values [heads, h, w, d], attention [heads, n, n]."""
    heads, h, w, d = values.shape
    n = h * w
    flat = values.reshape(heads, n, d).astype(np.float64)
    cosine = np.zeros((heads, n, n))
    for hd, i, j in itertools.product(range(heads), range(n), range(n)):
        a, b = flat[hd, i], flat[hd, j]
        cosine[hd, i, j] = a @ b / (max(np.linalg.norm(a), 1e-12) * max(np.linalg.norm(b), 1e-12))
    out = np.zeros((n, n))
    for i in range(n):
        threshold = cos_fac * sum(cosine[hd, i, j] for hd in range(heads) for j in range(n)) / (heads * n)
        if not refine_neg_cos and threshold < 0:
            threshold = 0.6
        threshold = min(threshold, 0.9)
        for j in range(n):
            out[i, j] = sum(attention[hd, i, j] for hd in range(heads) if cosine[hd, i, j] > threshold) / heads
        out[i] /= out[i].sum()
    return out


@pytest.mark.parametrize("cos_fac, refine_neg_cos, shift", [(1.2, True, 0.0), (0.0, True, 0.0),
                                                            (3.0, False, -0.8), (3.0, True, 0.5)])
def test_sam_affinity_matches_loops(cos_fac, refine_neg_cos, shift):
    """Thresholds per row (mean over heads and keys, × cos_fac; 0.6 for a negative one without refine_neg_cos; capped
    at 0.9), the heads' kept attention averaged, rows normalised — on a 3x4 grid. ``shift`` moves the values' mean so
    that the negative-threshold and the cap branches are reached."""
    g = torch.Generator().manual_seed(0)
    heads, h, w, d = 3, 3, 4, 5
    values = torch.randn(1, heads, h, w, d, generator=g, dtype=torch.float64)
    values[..., 0] += shift * 4  # a common direction: high cosines (the cap is reached)
    if shift < 0:  # half the positions turned the other way: some rows' mean cosine below 0
        values[:, :, :, : w // 2] *= -1
    attention = torch.softmax(torch.randn(1, heads, h * w, h * w, generator=g, dtype=torch.float64), dim=-1)
    unit = torch.nn.functional.normalize(values.flatten(2, 3), dim=-1)
    row_mean = (unit @ unit.transpose(-1, -2)).mean(dim=1).mean(dim=-1)
    if shift < 0:
        assert bool((row_mean < 0).any()), "some row's threshold is negative"
    if shift > 0:
        assert bool((cos_fac * row_mean > 0.9).any()), "some row's threshold is capped"
    ours = sam_affinity(values, attention, cos_fac, refine_neg_cos)[0].numpy()
    expected = affinity_loops(values[0].numpy(), attention[0].numpy(), cos_fac, refine_neg_cos)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_splice_windows_matches_loops():
    """Overlapping windows of a non-square grid: each position the mean of the windows covering it."""
    g = torch.Generator().manual_seed(1)
    height, width, crop, stride = 7, 11, 4, 3
    boxes = slide_windows(height, width, crop, stride)
    maps = torch.randn(len(boxes), 2, crop, crop, generator=g, dtype=torch.float64)
    ours = splice_windows(maps, boxes, (height, width))[0].numpy()
    expected = np.zeros((2, height, width))
    for y, x in itertools.product(range(height), range(width)):
        covering = [maps[k, :, y - y1, x - x1].numpy() for k, (y1, y2, x1, x2) in enumerate(boxes)
                    if y1 <= y < y2 and x1 <= x < x2]
        assert covering, "the slide grid covers every position"
        expected[:, y, x] = np.mean(covering, axis=0)
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert sum(y1 <= 3 < y2 and x1 <= 3 < x2 for y1, y2, x1, x2 in boxes) > 1  # windows overlap there


@pytest.mark.parametrize("size, expected", [((448, 597), (464, 608)), ((336, 500), (352, 512)),
                                            ((448, 448), (448, 448)), ((100, 150), (336, 336)),
                                            ((320, 480), (320, 480)), ((688, 1376), (688, 1376)),
                                            ((449, 2048), (464, 2048))])
def test_clip_input_size(size, expected):
    """preprocess_image: sides that are multiples of the patch kept; otherwise the long side rounded up, the short
    one scaled (truncated) and rounded up, each at least the crop."""
    assert clip_input_size(*size, 16, 336) == expected


def test_last_block_attention_is_sams_own():
    """Probabilities @ values, merged and projected, give segment-anything's Attention output (with relative
    positions drawn at random): the recomputation is the module's."""
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, use_rel_pos=True, input_size=(3, 5)).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
        x = torch.randn(1, 3, 5, 16)
        probs, values = last_block_attention(attn, x)
        mixed = (probs @ values.flatten(2, 3)).view(1, 2, 3, 5, -1).permute(0, 2, 3, 1, 4).reshape(1, 3, 5, -1)
        torch.testing.assert_close(attn.proj(mixed), attn(x))
    assert torch.allclose(probs.sum(dim=-1), torch.ones(1))


def tiny_trident(**settings) -> Trident:
    return Trident(clip=CLIPConfig(name="tiny-vit", pretrained=None),
                   vfm=VFMConfig(kind="dino", name="vit_base_patch16_224.dino", weights=None,
                                 model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}),
                   sam=VFMConfig(kind="sam", name="vit_b", weights=None,
                                 model_kwargs={"img_size": 128, "depth": 1, "embed_dim": 32, "num_heads": 2,
                                               "global_attn_indexes": (0,)}),
                   default_settings={"slide_crop": 64, "slide_stride": 32}, **settings).eval()


def test_sam_reads_the_original_image_and_halves():
    """The evaluator hands the image before its resize to the method (SAM's grid follows the original's shape), and
    Cityscapes' two SAM halves sit side by side."""
    from ovseg.eval.evaluator import Evaluator
    from ovseg.eval.protocols import load_protocol

    method = tiny_trident(dataset_settings={"cityscapes": {"slide_crop": 64, "slide_stride": 32}})
    seen = []
    read = method.sam.read
    method.sam.read = lambda image: seen.append(image.shape) or read(image)
    evaluator = Evaluator(load_protocol("trident"), {"short_side": 64, "long_side_max": 256, "templates": "single",
                                                     "class_names": "{dataset}", "prob_threshold": None})
    entry = evaluator.add_dataset(method, "voc21", [["a"], ["b"]], 0, torch.device("cpu"))
    image = torch.rand(3, 50, 90)
    pred = evaluator.predict(method, entry, image, (50, 90))
    assert pred.shape == (50, 90)
    assert seen == [(64, 96, 3)]  # the original 50x90, sides rounded up to 16 (not the 64x115 protocol resize)
    seen.clear()
    with method.scoring("cityscapes"), method.reading_originals([torch.rand(3, 64, 128)]):
        logits = method.dense_logits(torch.rand(1, 3, 64, 128), torch.randn(2, method.encoder.embed_dim))
    assert seen == [(64, 64, 3), (64, 64, 3)]
    assert logits.shape == (1, 2, 8, 16)  # each half 64x64 -> SAM 128x128 -> 8x8 tokens
    assert DATASET_SETTINGS["cityscapes"].sam_halves
