"""LPOSS's graph, propagation and Lab conversion (ovseg.models.label_propagation) against float64 numpy
recomputations on small non-square grids, and the method's plumbing on a tiny random CLIP and DINO."""

import numpy as np
import pytest
import torch

from ovseg.models.label_propagation import (
    conjugate_gradient,
    knn_inner_product,
    normalized_edge_weights,
    patch_graph,
    pixel_graph,
    propagate_labels,
    rgb_to_lab,
    sparse_matvec,
)


def _unit(rows: int, dims: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, dims, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def test_knn_is_the_exact_inner_product_top_k():
    features = _unit(35, 6, 0)
    sims, idx = knn_inner_product(features, 5, row_chunk=8)  # chunks of rows give the same answer
    gram = features.double().numpy() @ features.double().numpy().T
    expected = np.argsort(-gram, axis=1)[:, :5]
    assert np.array_equal(idx.numpy(), expected)
    assert np.allclose(sims.numpy(), np.take_along_axis(gram, expected, 1), atol=1e-6)
    assert knn_inner_product(features, 99)[1].shape == (35, 35)  # k above N: every node


def _dense_patch_graph(features, positions, k, gamma, sigma):
    """W + Wᵀ without the diagonal, from loops in float64."""
    f, p = features.double().numpy(), positions.double().numpy()
    n = len(f)
    w = np.zeros((n, n))
    for i in range(n):
        sims = f @ f[i]
        for j in np.argsort(-sims)[:k]:
            w[i, j] = max(sims[j], 0.0) ** gamma * np.exp(-sigma * np.hypot(*(p[i] - p[j])))
    w = w + w.T
    np.fill_diagonal(w, 0.0)
    return w


def _grid_positions(rows: int, cols: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([8 + 16 * yy.flatten(), 8 + 16 * xx.flatten()], 1).float()


def _dense(graph, values) -> np.ndarray:
    out = np.zeros((graph.num_nodes, graph.num_nodes))
    out[graph.rows.numpy(), graph.cols.numpy()] = values.double().numpy()
    return out


def test_patch_graph_and_its_normalisation_match_a_float64_recomputation():
    features, positions = _unit(5 * 7, 8, 1), _grid_positions(5, 7)
    graph = patch_graph(features, positions, k=6, gamma=3.0, sigma=0.01)
    expected = _dense_patch_graph(features, positions, 6, 3.0, 0.01)
    assert np.allclose(_dense(graph, graph.weights), expected, rtol=1e-5, atol=1e-7)
    degree = expected.sum(1)
    d = 1 / np.sqrt(np.where(degree == 0, 1, degree))
    normalized = 0.95 * d[:, None] * expected * d[None]
    assert np.allclose(_dense(graph, normalized_edge_weights(graph, 0.95)), normalized, rtol=1e-5, atol=1e-7)
    everyone = patch_graph(features, positions, k=35, gamma=3.0, sigma=0.01)  # negative similarities weigh 0
    assert np.allclose(_dense(everyone, everyone.weights), _dense_patch_graph(features, positions, 35, 3.0, 0.01),
                       rtol=1e-5, atol=1e-7)


def _numpy_cg(a, b, tol, maxiter):
    """cupy's cg recurrence for one right-hand side, float64."""
    if np.linalg.norm(b) == 0:
        return b
    atol = tol * np.linalg.norm(b)
    x, r = np.zeros_like(b), b.copy()
    p, rho = None, None
    for step in range(maxiter):
        rho_old, rho = rho, r @ r
        p = r.copy() if step == 0 else r + rho / rho_old * p
        q = a @ p
        alpha = rho / (p @ q)
        x, r = x + alpha * p, r - alpha * q
        if np.linalg.norm(r) <= atol:
            break
    return x


def test_propagation_runs_cupys_cg_per_column_and_converges_to_the_solve():
    features, positions = _unit(4 * 9, 8, 2), _grid_positions(4, 9)
    graph = patch_graph(features, positions, k=5, gamma=3.0, sigma=0.01)
    values = normalized_edge_weights(graph, 0.95)
    labels = torch.randn(36, 3, generator=torch.Generator().manual_seed(3))
    labels[:, 2] = 0  # a zero column is returned as is
    system = np.eye(36) - _dense(graph, values)
    few_steps = propagate_labels(sparse_matvec(graph, values), labels, tol=1e-6, maxiter=4, column_chunk=2)
    expected = np.stack([_numpy_cg(system, labels[:, c].double().numpy(), 1e-6, 4) for c in range(3)], 1)
    assert few_steps.dtype == torch.float64
    assert np.allclose(few_steps.numpy(), expected, rtol=1e-10, atol=1e-12)
    solved = propagate_labels(sparse_matvec(graph, values), labels, tol=1e-12, maxiter=500)
    assert np.allclose(solved.numpy(), np.linalg.solve(system, labels.double().numpy()), atol=1e-8)


def test_cg_stops_each_column_on_its_own():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, tol=1e-6, maxiter=2)
    assert torch.allclose(x[:, 0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))  # done after one step
    expected = _numpy_cg(a.numpy(), b[:, 1].numpy(), 1e-6, 2)
    assert np.allclose(x[:, 1].numpy(), expected, rtol=1e-12)


def _numpy_lab(rgb):
    """sRGB [..., 3] in [0, 1] -> CIE Lab (D65), float64."""
    rgb = np.asarray(rgb, np.float64)
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                  [0.019334, 0.119193, 0.950227]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def test_rgb_to_lab_matches_the_cie_formulas():
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(4))
    image[:, 0, 0] = torch.tensor([0.01, 0.02, 0.003])  # the linear branches (dark colours)
    lab = rgb_to_lab(image)
    assert np.allclose(lab.permute(1, 2, 0).numpy(), _numpy_lab(image.permute(1, 2, 0).numpy()), atol=1e-3)
    known = rgb_to_lab(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).view(3, 3, 1))
    assert torch.allclose(known[:, 0, 0], torch.tensor([100.0, 0.0, 0.0]), atol=2e-2)  # white
    assert torch.allclose(known[:, 1, 0], torch.tensor([53.24, 80.09, 67.20]), atol=5e-2)  # sRGB red
    assert torch.allclose(known[:, 2, 0], torch.tensor([0.0, 0.0, 0.0]), atol=1e-4)  # black


@pytest.mark.parametrize("radius", [1, 2])
def test_pixel_graph_stencil_matches_explicit_pixel_pairs(radius):
    image = torch.rand(3, 4, 6, generator=torch.Generator().manual_seed(5))
    graph = pixel_graph(image, radius, tau=0.1)
    lab = _numpy_lab(image.permute(1, 2, 0).numpy()) / np.array([100, 128, 128])
    h, w = 4, 6
    dense = np.zeros((h * w, h * w))
    for y in range(h):
        for x in range(w):
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    if (dy, dx) != (0, 0) and 0 <= y + dy < h and 0 <= x + dx < w:
                        dense[y * w + x, (y + dy) * w + x + dx] = np.exp(
                            -np.linalg.norm(lab[y, x] - lab[y + dy, x + dx]) / 0.1)
    values = torch.randn(h * w, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert np.allclose(graph.matvec(values).numpy(), dense @ values.numpy(), rtol=1e-4, atol=1e-6)
    d = 1 / np.sqrt(dense.sum(1))
    normalized = graph.normalized(0.9)
    assert np.allclose(normalized.matvec(values).numpy(), (0.9 * d[:, None] * dense * d[None]) @ values.numpy(),
                       rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_lposs():
    from ovseg.methods.lposs import LPOSS
    from ovseg.models.clip import CLIPConfig
    from ovseg.models.vfm import VFMConfig

    torch.manual_seed(0)
    return LPOSS(clip=CLIPConfig(name="tiny-vit", pretrained=None, last_block="value"),
                 vfm=VFMConfig(kind="dino", name="vit_base_patch16_224.dino", weights=None, features="v",
                               model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}),
                 window=64, stride=32, k=12, pixel_refine=True, pixel_window=3).eval()


def test_vfm_values_are_the_last_blocks_qkv_values(tiny_lposs):
    vfm = tiny_lposs.vfm
    image = torch.rand(1, 3, 48, 80)
    captured = []
    hook = vfm.model.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, out: captured.append(out))
    vfm.model.forward_features(vfm.normalize(image))
    hook.remove()
    channels = captured[0].shape[-1] // 3
    expected = captured[0][0, 1:, 2 * channels:].T.reshape(channels, 3, 5)
    assert torch.allclose(vfm(image)[0], expected, atol=1e-6)


def test_window_patch_centres_follow_the_windows():
    from ovseg.methods.lposs import window_patch_centres

    centres = window_patch_centres([(0, 32, 0, 48), (16, 48, 32, 80)], (2, 3), 16)
    assert centres[:6].tolist() == [[8, 8], [8, 24], [8, 40], [24, 8], [24, 24], [24, 40]]
    assert centres[6].tolist() == [24, 40] and centres[-1].tolist() == [40, 72]


def test_lposs_scores_each_image_on_its_own_graph(tiny_lposs):
    text = tiny_lposs.encode_text(["cat", "dog", "sky"], ["a {}"])
    images = torch.rand(2, 3, 80, 112, generator=torch.Generator().manual_seed(7))
    batch = tiny_lposs.dense_logits(images, text)
    assert batch.shape == (2, 3, 80, 112)
    assert torch.allclose(batch[1], tiny_lposs.dense_logits(images[1:], text)[0], atol=1e-6)
