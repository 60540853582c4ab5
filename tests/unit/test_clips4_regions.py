"""CLIP-S4's visually coherent regions: the over-segmentation carried into both views, the clusters cut by it, and
HSG's ``segsort+`` loss over the regions — each against a straightforward re-computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.methods.clips4.losses import pixel_segment_segsort_plus
from ovseg.models.segments import cut_by_regions
from ovseg.methods.clips4.views import TwoViewImages, TwoViews, over_segment, view_grid, warp_labels_to_view


def test_clusters_cut_by_regions_equal_a_pixel_loop():
    generator = torch.Generator().manual_seed(0)
    clusters = torch.randint(0, 5, (3, 60), generator=generator)
    regions = torch.randint(0, 4, (3, 60), generator=generator)
    index, view, region = cut_by_regions(clusters, regions)
    # every (view, cluster, region) holding a pixel is one segment, numbered in sorted order
    keys = sorted({(v, int(clusters[v, p]), int(regions[v, p])) for v in range(3) for p in range(60)})
    number = {key: i for i, key in enumerate(keys)}
    expected = torch.tensor([[number[(v, int(clusters[v, p]), int(regions[v, p]))] for p in range(60)]
                             for v in range(3)])
    assert torch.equal(index, expected)
    assert view.tolist() == [k[0] for k in keys] and region.tolist() == [k[2] for k in keys]
    # a segment never spans two regions or two clusters
    for s in range(len(keys)):
        members = index == s
        assert len(set(regions[members].tolist())) == 1 and len(set(clusters[members].tolist())) == 1
    # without regions: the clusters themselves, empty ones dropped
    plain, plain_view, _ = cut_by_regions(clusters)
    assert len(plain_view) == sum(len(set(clusters[v].tolist())) for v in range(3))


def hsg_segsort_plus(pixels, prototypes, own, groups, kappa, group_mode="segsort+"):
    """HSG's ``_calculate_log_likelihood`` with ``group_mode='segsort+'`` (or ``'segsort'``), pixel by pixel."""
    losses = []
    for p in range(pixels.shape[0]):
        sims = [math.exp(kappa * float(pixels[p] @ prototypes[s])) for s in range(prototypes.shape[0])]
        own_sim = sims[own[p]]
        same = sum(v for s, v in enumerate(sims) if groups[s] == groups[own[p]]) - own_sim
        numerator = same if same > 0 and group_mode == "segsort+" else own_sim
        different = sum(v for s, v in enumerate(sims) if groups[s] != groups[own[p]])
        losses.append(-math.log(numerator / (different + numerator)))
    return torch.tensor(losses, dtype=torch.float64)


def test_segsort_plus_equals_hsg_pixel_by_pixel():
    generator = torch.Generator().manual_seed(1)
    pixels = F.normalize(torch.randn(40, 8, generator=generator), dim=-1).double()
    prototypes = F.normalize(torch.randn(9, 8, generator=generator), dim=-1).double()
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4])  # groups 2 and 4 hold one segment each
    own = torch.randint(0, 9, (40,), generator=generator)
    own[:3] = torch.tensor([5, 8, 0])  # a pixel alone in its group, and one in a group of three
    kappa = 4.0  # small enough that exp() stays finite in the reference
    ours = pixel_segment_segsort_plus(pixels, prototypes, own, groups, None, kappa, reduction="none")
    torch.testing.assert_close(ours, hsg_segsort_plus(pixels, prototypes, own, groups, kappa).to(ours.dtype),
                               rtol=1e-9, atol=1e-9)
    # an empty (invalid) segment is in no sum: the same as leaving it out
    valid = torch.ones(9, dtype=torch.bool)
    valid[4] = False
    keep = own != 4
    kept = torch.tensor([i for i in range(9) if i != 4])
    remap = torch.full((9,), -1, dtype=torch.long)
    remap[kept] = torch.arange(8)
    masked = pixel_segment_segsort_plus(pixels[keep], prototypes, own[keep], groups, valid, kappa, reduction="none")
    reference = hsg_segsort_plus(pixels[keep], prototypes[kept], remap[own[keep]], groups[kept], kappa)
    torch.testing.assert_close(masked, reference.to(masked.dtype), rtol=1e-9, atol=1e-9)


def test_segsort_rule_equals_hsg_pixel_by_pixel():
    """``group_mode='segsort'`` (SegSort, ``pixel_loss: segsort``): the own segment against other groups' segments."""
    generator = torch.Generator().manual_seed(2)
    pixels = F.normalize(torch.randn(30, 8, generator=generator), dim=-1).double()
    prototypes = F.normalize(torch.randn(7, 8, generator=generator), dim=-1).double()
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3])
    own = torch.randint(0, 7, (30,), generator=generator)
    ours = pixel_segment_segsort_plus(pixels, prototypes, own, groups, None, 4.0, reduction="none",
                                      group_mode="segsort")
    reference = hsg_segsort_plus(pixels, prototypes, own, groups, 4.0, group_mode="segsort")
    torch.testing.assert_close(ours, reference.to(ours.dtype), rtol=1e-9, atol=1e-9)
    plus = pixel_segment_segsort_plus(pixels, prototypes, own, groups, None, 4.0, reduction="none")
    assert not torch.allclose(ours, plus)  # the two rules differ wherever a group holds other segments


def test_region_labels_follow_each_views_crop_and_flip():
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 50, (30, 40), generator=generator)
    geometry = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0], [0.25, 0.1, 0.75, 0.9, 1.0]])
    warped = warp_labels_to_view(labels, geometry, (12, 16))
    # each cell takes the source label under its centre (numpy: view_grid's source position, floored to a pixel)
    xy = view_grid(geometry, 12, 16).numpy()
    col = np.clip(np.floor(xy[..., 0] * 40).astype(int), 0, 39)
    row = np.clip(np.floor(xy[..., 1] * 30).astype(int), 0, 29)
    assert np.array_equal(warped.numpy(), labels.numpy()[row, col])
    assert torch.equal(warped[1], warped[0].flip(-1))  # the mirrored view sees the mirrored regions


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_over_segmentation_follows_the_image(method):
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[:, 32:] = (250, 20, 20)  # two flat halves: no region crosses the edge
    image[:24, :32] = (20, 200, 20)
    labels = over_segment(image, method, count=8)
    assert labels.dtype == np.int32 and labels.shape == (48, 64) and labels.min() == 0
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))  # numbered from 0 without gaps
    for left in np.unique(labels[:, :32]):
        assert left not in np.unique(labels[:, 32:])
    with pytest.raises(ValueError, match="regions must be one of"):
        over_segment(image, "watershed")


def test_two_views_carry_the_teacher_images_regions(tmp_path):
    np.random.seed(0)
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    sample = TwoViews(crop_size=32, teacher_short_side=40, teacher_multiple=8)({"image": image, "meta": {}})
    assert sample["regions"].shape == sample["teacher_image"].shape[1:]
    expected = over_segment(sample["teacher_image"].permute(1, 2, 0).numpy(), "slic", 24)
    assert np.array_equal(sample["regions"].numpy(), expected)
    assert "regions" not in TwoViews(crop_size=32, regions="none")({"image": image, "meta": {}})
    batch = TwoViewImages.collate(None, [sample, sample])  # type: ignore[arg-type]
    assert len(batch["regions"]) == 2 and torch.equal(batch["regions"][0], sample["regions"])
