"""CLIP-S4's SegSort pieces against naive loops: grid-started k-means on embeddings + coordinates, the multi-positive
pixel-segment loss, and the unknown-prototype gate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.methods.clips4.losses import pixel_segment_multi_positive, semantic_consistency
from ovseg.models.segments import grid_labels, grid_shape, segment_pixels, segsort_kmeans


def _naive_segsort(x: np.ndarray, height: int, width: int, rows: int, cols: int, iterations: int,
                   weight: float) -> np.ndarray:
    """HSG's algorithm pixel by pixel: points [normalize(x), w·((y, x) − 0.5)] normalised, labels from a rows×cols
    grid (round(linspace)), then iterations of centre = normalised sum, label = most similar centre."""
    points = []
    for i in range(height):
        for j in range(width):
            e = x[i * width + j] / np.linalg.norm(x[i * width + j])
            y = i / (height - 1) if height > 1 else 0.0
            xx = j / (width - 1) if width > 1 else 0.0
            p = np.concatenate([e, [weight * (y - 0.5), weight * (xx - 0.5)]])
            points.append(p / np.linalg.norm(p))
    labels = []
    for i in range(height):
        for j in range(width):
            r = int(np.round(i * (rows - 1) / (height - 1))) if height > 1 else 0
            c = int(np.round(j * (cols - 1) / (width - 1))) if width > 1 else 0
            labels.append(r + rows * c)
    k = rows * cols
    for _ in range(iterations):
        centres = []
        for s in range(k):
            total = sum((points[n] for n in range(len(points)) if labels[n] == s), np.zeros(len(points[0])))
            norm = np.linalg.norm(total)
            centres.append(total / norm if norm > 0 else total)
        labels = [int(np.argmax([float(points[n] @ c) for c in centres])) for n in range(len(points))]
    return np.array(labels)


def test_grid_start_is_the_most_square_tiling():
    assert grid_shape(36) == (6, 6) and grid_shape(16) == (4, 4) and grid_shape(6) == (2, 3) and grid_shape(7) == (1, 7)
    labels = grid_labels(12, 12, 36).view(12, 12)
    assert labels.unique().numel() == 36 and labels[0, 0] == 0 and labels[11, 0] == 5 and labels[0, 11] == 30


def test_segsort_kmeans_equals_a_naive_loop():
    generator = torch.Generator().manual_seed(0)
    height, width, dim = 7, 9, 5
    # two embedding "objects" plus noise: the location term decides between look-alike pixels
    x = torch.randn(2, height * width, dim, generator=generator) * 0.3
    x[:, :, 0] += (torch.arange(height * width) % width < 4).float() * 2
    for weight, iterations in ((1.0, 5), (0.3, 3), (3.0, 4)):
        ours = segsort_kmeans(x, height, width, 6, iterations, weight)
        for b in range(2):
            ref = _naive_segsort(x[b].double().numpy(), height, width, 2, 3, iterations, weight)
            assert ours[b].tolist() == ref.tolist(), (weight, iterations)


def test_segsort_segments_are_more_compact_than_embedding_segments():
    """On smooth feature maps (a low-frequency field plus noise, like a network's), grid-started k-means with
    coordinates gives segments in fewer connected pieces than embedding-only k-means, which groups look-alike
    pixels wherever they are."""
    from scipy import ndimage

    def pieces(assign):
        grid = assign.view(24, 24).numpy()
        return np.mean([ndimage.label(grid == s)[1] for s in np.unique(grid)])

    segsort, embedding = [], []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        field = F.interpolate(torch.randn(1, 8, 4, 4, generator=generator), size=(24, 24), mode="bilinear",
                              align_corners=False)
        x = (field + 0.3 * torch.randn(1, 8, 24, 24, generator=generator)).flatten(2).transpose(1, 2)
        segsort.append(pieces(segment_pixels(x, 24, 24, 16, 10, "segsort")))
        embedding.append(pieces(segment_pixels(x, 24, 24, 16, 10, "embedding",
                                               generator=torch.Generator().manual_seed(0))))
    assert np.mean(segsort) < 0.75 * np.mean(embedding)  # measured: 2.8 vs 4.3 pieces per segment


def test_multi_positive_loss_equals_a_naive_per_pixel_loop():
    generator = torch.Generator().manual_seed(2)
    pixels = F.normalize(torch.randn(9, 6, generator=generator), dim=-1)
    prototypes = F.normalize(torch.randn(7, 6, generator=generator), dim=-1)
    valid = torch.tensor([True, True, True, False, True, True, True])
    positives = torch.tensor([[0, 4], [1, -1], [2, 5], [6, 0], [4, -1], [5, 6], [0, 1], [2, -1], [6, 5]])
    kappa = 16.0
    expected = []
    for p in range(9):
        sims = {s: kappa * float(pixels[p] @ prototypes[s]) for s in range(7) if valid[s]}
        numerator = sum(math.exp(sims[int(s)]) for s in positives[p] if s >= 0)
        expected.append(-math.log(numerator / sum(math.exp(v) for v in sims.values())))
    ours = pixel_segment_multi_positive(pixels, prototypes, positives, valid, kappa, reduction="none")
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=ours.dtype), rtol=1e-5, atol=1e-5)
    mean = pixel_segment_multi_positive(pixels, prototypes, positives, valid, kappa)
    torch.testing.assert_close(mean, torch.tensor(expected).mean(), rtol=1e-5, atol=1e-5)


def unknown_rule_world():
    """A hand-built CLIP space with CLIP's image–text gap: known text prototypes ``t_c``, and image segments that all
    share an image direction ``g`` (cos ≈ 0.8 among any two images, ≈ 0.3-0.5 to their class text). Segments 0-19
    are of known classes (``t_c``); 20-39 of a held-out class ``h`` that no name covers, leaning slightly to "car"
    (0.1), so the τ 0.01 known softmax calls them explained as "car", as CLIP does with held-out classes. Unknown
    prototypes are image means: one at each known class's segments (where a shared softmax takes them over) and
    one at the held-out class's."""
    from ovseg.methods.clips4.method import CLIPS4
    from ovseg.models.clip import CLIPConfig

    torch.manual_seed(0)
    model = CLIPS4(clip=CLIPConfig(name="tiny-vit", pretrained=None, last_block="value", residual="token"),
                   known_classes=["cat", "dog", "car"], train_templates="single", num_unknown=4)
    dim = model.known_text.shape[1]
    generator = torch.Generator().manual_seed(3)
    directions = torch.linalg.qr(torch.randn(dim, 5, generator=generator)).Q.t()  # orthonormal
    model.known_text.copy_(directions[:3])  # three well-separated names
    known, image_direction, held_out = directions[:3], directions[3], directions[4]
    noise = 0.05 * F.normalize(torch.randn(40, dim, generator=generator), dim=-1)
    known_segments = 0.6 * known[torch.arange(20) % 3] + 1.2 * image_direction + noise[:20]
    held_segments = 0.6 * held_out + 0.1 * known[2] + 1.2 * image_direction + noise[20:]
    segments = F.normalize(torch.cat([known_segments, held_segments]), dim=-1)
    means = [F.normalize(segments[i:20:3].mean(0), dim=-1) for i in range(3)]
    means.append(F.normalize(segments[20:].mean(0), dim=-1))
    return model, segments, torch.stack(means)


@pytest.mark.parametrize("rule, known_lost, held_out_unknown", [
    ("shared", True, True),  # image prototypes win every segment, known ones included
    ("gated", False, False),  # the saturated explanation test keeps the held-out class on "car"
    ("calibrated", False, True),  # known segments stay known, the held-out class goes unknown
    ("shifted", False, True),
])
def test_unknown_target_rules_on_a_hand_built_gap(rule, known_lost, held_out_unknown):
    model, segments, unknown = unknown_rule_world()
    known = model.known_text
    model.unknown.rule = rule
    model.unknown.prototypes.copy_(unknown)
    model.unknown.initialized.fill_(True)
    model.unknown.calibrate(segments, known)
    valid = torch.ones(40, dtype=torch.bool)
    semantic = model.semantic_targets(segments, valid)
    targets, allowed, bias = semantic["targets"], semantic["allowed"], semantic["bias"]
    # the assignment recomputed from its definition: argmax of cosine + bias over the allowed targets
    logits = segments @ targets.t() + bias
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -torch.inf)
    to_unknown = logits.argmax(-1) >= 3
    assert torch.equal(to_unknown, semantic["to_unknown"])
    assert bool(to_unknown[:20].any()) is known_lost
    assert bool(to_unknown[20:].all()) is held_out_unknown
    if rule in ("calibrated", "shifted"):
        assert not to_unknown[:20].any() and to_unknown[20:].all()
        assert torch.equal(logits[:20, :3].argmax(-1), torch.arange(20) % 3)  # known segments keep their class
        # the bank is fed exactly the segments the assignment puts on unknown prototypes
        assert torch.equal(model.unknown.feeds(segments, known), to_unknown)
    loss = semantic_consistency(segments, segments, targets, 0.01, valid, allowed, bias=bias)
    assert torch.isfinite(loss) and float(loss) < 1e-4  # model = CLIP: zero divergence under any rule


def test_calibrated_gap_is_measured_on_the_known_classes_image_centroids():
    """gap = mean over segments of cos(s, m_c) − cos(s, t_c), c the segment's best known class and m_c the
    (EMA) mean of the segments put on c; recomputed here with numpy from that definition."""
    model, segments, _ = unknown_rule_world()
    known = model.known_text
    bank = model.unknown
    s, t = segments.double().numpy(), known.double().numpy()

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    best = (s @ t.T).argmax(-1)
    means = unit(np.stack([s[best == c].sum(0) for c in range(3)]))
    first = np.mean((s * means[best]).sum(-1) - (s * t[best]).sum(-1))
    bank.calibrate(segments, known)
    assert bank.gap.item() == pytest.approx(first, abs=1e-5)
    np.testing.assert_allclose(bank.known_means.numpy(), means, atol=1e-5)
    # a second batch: centroids and gap move by the EMA (momentum 0.99)
    half = s[:20]
    best2 = (half @ t.T).argmax(-1)
    means2 = unit(np.stack([unit(0.99 * means[c] + 0.01 * unit(half[best2 == c].sum(0))) for c in range(3)]))
    second = np.mean((half * means2[best2]).sum(-1) - (half * t[best2]).sum(-1))
    bank.calibrate(segments[:20], known)
    np.testing.assert_allclose(bank.known_means.numpy(), means2, atol=1e-5)
    assert bank.gap.item() == pytest.approx(0.99 * first + 0.01 * second, abs=1e-5)
