"""CLIPtrase (ovseg.methods.cliptrase, the ``cliptrase`` protocol) against independent float64 / plain-loop
re-computations of its released code (clip_self_correlation.py, clip_utils/attn2.py) on a small non-square grid:
the last block (softmax q qᵀ + k kᵀ + v vᵀ, token residual, MLP), the penultimate block's patch affinity, DBSCAN,
the per-cluster vote, VOC20's class-token weighting, and the centre-crop view."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg.eval.evaluator import Evaluator, dense_options
from ovseg.eval.inference import center_crop_view
from ovseg.eval.protocols import load_protocol
from ovseg.methods.cliptrase import CLIPtrase, cluster_index, cluster_maps, dbscan, vote_labels
from ovseg.models.clip import CLIPConfig
from tests.unit.clip_float64 import d, grid_images, heads, layer_norm, softmax_rows
from tests.unit.test_resclip import _block_inputs

GRID = (5, 7)  # rows, cols: non-square


def _tiny(**kwargs) -> CLIPtrase:
    torch.manual_seed(0)
    clip = CLIPConfig(name="toyworld-vit", pretrained=None, last_block="qq_kk_vv", residual="token", ffn=True)
    return CLIPtrase(clip=clip, **kwargs).eval()


def _reference(method: CLIPtrase, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 with loops over images, heads and token pairs: projected tokens (clip_utils/model.py forward, the last
    block with attn2.py's self_qk_weight maps) and the patch affinity (block -2's self_out_weight map minus the class
    row, clipped: clip_self_correlation.py self_clip)."""
    encoder = method.encoder
    visual = encoder.model.visual
    blocks = visual.transformer.resblocks
    encoder.last_stage = None  # the plain blocks, to capture their inputs
    inputs = _block_inputs(encoder, encoder.normalize(images))
    encoder.last_stage = method._last_stage
    last_in = blocks[-2](inputs[-1]).detach().double()

    def cosine(a):
        n = a.shape[0]
        out = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                out[i, j] = a[i] @ a[j] / (np.linalg.norm(a[i]) * np.linalg.norm(a[j]))
        return out

    mlp = blocks[-1].mlp.double()
    tokens, affinities = [], []
    for b in range(images.shape[0]):
        last = blocks[-1]
        qs, ks, vs = heads(last, d(last_in[b]))
        attended = []
        for q, k, v in zip(qs, ks, vs):
            s = 1 / math.sqrt(q.shape[-1])
            probs = sum(softmax_rows(a @ a.T * s) for a in (q, k, v))
            attended.append(probs @ v)
        x = d(last_in[b]) + np.concatenate(attended, -1) @ d(last.attn.out_proj.weight).T + d(last.attn.out_proj.bias)
        y = torch.from_numpy(layer_norm(x, last.ln_2))
        x = x + mlp(y).detach().numpy()
        tokens.append(layer_norm(x, visual.ln_post) @ d(visual.proj))
        qs, ks, vs = heads(blocks[-2], d(inputs[-1][b]))  # inputs[i]: block i's input
        corr = np.mean([(cosine(q) + cosine(k) + cosine(v)) / 3 for q, k, v in zip(qs, ks, vs)], axis=0)
        affinities.append(np.maximum(corr[1:, 1:] - corr[0:1, 1:], 0))
    blocks[-1].mlp.float()
    return np.stack(tokens), np.stack(affinities)


def test_last_block_and_affinity_equal_float64_loop_reference():
    method = _tiny()
    images = grid_images(method, GRID)
    with torch.no_grad():
        tokens, affinity = method.dense_tokens(images)
    theirs_tokens, theirs_affinity = _reference(method, images)
    n = GRID[0] * GRID[1]
    assert tokens.shape == (2, 1 + n, theirs_tokens.shape[-1]) and affinity.shape == (2, n, n)
    np.testing.assert_allclose(tokens.double().numpy(), theirs_tokens, rtol=0,
                               atol=2e-5 * np.abs(theirs_tokens).max())
    np.testing.assert_allclose(affinity.double().numpy(), theirs_affinity, rtol=0, atol=2e-5)


def test_voc20_weights_patch_scores_by_the_class_token():
    """self_clip, dataset 'VOC20': patch logits times the class token's logits, per class; other datasets plain."""
    method = _tiny()
    images = grid_images(method, GRID)
    torch.manual_seed(2)
    text = torch.randn(4, method.encoder.embed_dim)
    with torch.no_grad():
        tokens, _ = method.dense_tokens(images)
        with method.scoring("voc20"):
            weighted = method.dense_logits(images, text).double()
        with method.scoring("voc21"):
            plain = method.dense_logits(images, text).double()
    t = F.normalize(text.double(), dim=-1)
    f = F.normalize(tokens.double(), dim=-1)
    patch = (f[:, 1:] @ t.T).transpose(1, 2).reshape(2, 4, *GRID)
    cls = f[:, 0] @ t.T
    torch.testing.assert_close(plain, patch, rtol=0, atol=1e-5)
    torch.testing.assert_close(weighted, patch * cls[:, :, None, None], rtol=0, atol=1e-5)


def _dbscan_loops(points: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN as scikit-learn defines it, breadth-first: neighbourhoods within eps (the point included), core
    points, clusters grown from each unlabelled core point in index order."""
    n = len(points)
    near = [[j for j in range(n) if np.sqrt(((points[i] - points[j]) ** 2).sum()) <= eps] for i in range(n)]
    core = [len(nb) >= min_samples for nb in near]
    labels = [-1] * n
    cluster = 0
    for i in range(n):
        if labels[i] != -1 or not core[i]:
            continue
        queue, labels[i] = [i], cluster
        while queue:
            j = queue.pop(0)
            if not core[j]:
                continue
            for v in near[j]:
                if labels[v] == -1:
                    labels[v] = cluster
                    queue.append(v)
        cluster += 1
    return np.array(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dbscan_equals_loop_reference(seed):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-3, 3, (4, 6))
    points = np.concatenate([c + rng.normal(0, 0.35, (12, 6)) for c in centres] + [rng.uniform(-4, 4, (10, 6))])
    points = points[rng.permutation(len(points))]
    for eps, min_samples in ((0.7, 3), (1.1, 7), (1.5, 4)):
        ours = dbscan(torch.from_numpy(points).float(), eps, min_samples).numpy()
        theirs = _dbscan_loops(points.astype(np.float32).astype(np.float64), eps, min_samples)
        np.testing.assert_array_equal(ours, theirs)


def test_dbscan_border_point_joins_the_first_cluster():
    """A non-core point within eps of two clusters' core points takes the lower-numbered cluster."""
    points = torch.tensor([[0.0], [0.05], [0.1], [0.15], [0.2], [0.9], [1.6], [1.65], [1.7], [1.75], [1.8]])
    # 0.9 has 3 neighbours within 0.72 (0.2, itself, 1.6): a border point of both clusters
    expected = [0] * 5 + [0] + [1] * 5
    assert dbscan(points, eps=0.72, min_samples=4).tolist() == expected
    assert dbscan(points.flip(0), eps=0.72, min_samples=4).tolist() == expected


def test_vote_takes_each_clusters_most_frequent_label_background_last_on_ties():
    labels = torch.tensor([[1, 1, 2, 0], [3, 0, 2, 2], [0, 3, 3, 3]])
    clusters = torch.tensor([[0, 0, 0, 1], [2, 0, 1, 1], [2, 2, 2, 2]])
    out = vote_labels(labels, clusters, 3, background_index=None)
    # loops: cluster 0 holds 1, 1, 2, 0 -> 1; cluster 1 holds 0, 2, 2 -> 2; cluster 2 holds 3, 0, 3, 3, 3 -> 3
    expected = labels.clone()
    for c in range(3):
        values = labels[clusters == c].tolist()
        best = max(sorted(set(values)), key=values.count)
        expected[clusters == c] = best
    assert torch.equal(out, expected)
    tie = torch.tensor([[0, 0, 4, 4]])
    assert vote_labels(tie, torch.zeros_like(tie), 1, None).tolist() == [[0, 0, 0, 0]]
    # the reference's background (ovseg's 0) comes after its classes: the tie goes to class 4
    assert vote_labels(tie, torch.zeros_like(tie), 1, background_index=0).tolist() == [[4, 4, 4, 4]]


@pytest.mark.parametrize("size", [(37, 50), (50, 37), (40, 40), (33, 91), (40, 45), (45, 40)])  # 45: an odd margin of 3
def test_center_crop_view_equals_torchvision(size):
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    rng = np.random.default_rng(size[0])
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    label = rng.integers(0, 5, size).astype(np.uint8)
    side = 24
    theirs = np.asarray(Compose([Resize(side, InterpolationMode.BICUBIC), CenterCrop(side)])(Image.fromarray(image)))
    their_label = np.asarray(Compose([Resize(side, InterpolationMode.NEAREST), CenterCrop(side)])(
        Image.fromarray(label)))
    view, label_view = center_crop_view(torch.from_numpy(image).permute(2, 0, 1).float() / 255,
                                        torch.from_numpy(label).long(), side)
    np.testing.assert_array_equal((view * 255).round().byte().permute(1, 2, 0).numpy(), theirs)
    np.testing.assert_array_equal(label_view.numpy(), their_label)


def test_evaluator_scores_the_crop_and_votes_per_cluster():
    """Under the protocol (centre crop) the label map covers the crop and every cluster holds one label."""
    method = _tiny(min_samples=2)
    patch = method.encoder.patch_size
    side = 6 * patch
    evaluator = Evaluator(load_protocol("cliptrase"), {"center_crop": side, "short_side": side, "templates": "single"})
    evaluator.add_dataset(method, "toy", [["cat"], ["dog"], ["sky"]], None, torch.device("cpu"))
    torch.manual_seed(3)
    image = torch.rand(3, 9 * patch, 7 * patch)
    label = torch.zeros(9 * patch, 7 * patch, dtype=torch.long)
    view, _ = center_crop_view(image, None, side)
    with torch.no_grad(), dense_options(method, evaluator.settings_for("toy")):
        _, affinity = method.dense_tokens(view[None])
    method.eps = float(torch.cdist(affinity[0], affinity[0]).quantile(0.1))  # random weights: a few clusters
    assert int(dbscan(affinity[0], method.eps, 2).max()) >= 1, "the test needs clusters"
    evaluator.update(method, "toy", [image], [label])
    entry = evaluator.datasets["toy"]
    assert entry.metric.compute().sum() == side * side
    voted = evaluator.predict(method, entry, view, (side, side))
    method.clustering = False
    plain = evaluator.predict(method, entry, view, (side, side))
    assert not method._pending, "every kept cluster map is consumed by its vote"
    assert voted.shape == plain.shape == (side, side)
    maps = cluster_maps(affinity[0], dbscan(affinity[0], method.eps, 2), method.encoder.token_grid(side, side))
    assert torch.equal(voted, vote_labels(plain, cluster_index(maps, (side, side)), maps.shape[0]))
