"""Float64 numpy pieces of a CLIP residual block for the unit tests' independent recomputations (ITACLIP, CLIPtrase):
layer norm and the per-head q/k/v projections of ``nn.MultiheadAttention``'s packed weights."""

import numpy as np
import torch


def d(t: torch.Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array."""
    return t.detach().double().numpy()


def layer_norm(x: np.ndarray, ln: torch.nn.LayerNorm) -> np.ndarray:
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * d(ln.weight) + d(ln.bias)


def heads(block, x: np.ndarray) -> list[list[np.ndarray]]:
    """``[q_heads, k_heads, v_heads]`` of the block's attention on ``ln_1(x)`` (``x``: ``[tokens, width]``)."""
    y = layer_norm(x, block.ln_1)
    w, b = d(block.attn.in_proj_weight), d(block.attn.in_proj_bias)
    width = y.shape[-1]
    q, k, v = (y @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width] for i in range(3))
    h = block.attn.num_heads
    return [[t[:, j * width // h:(j + 1) * width // h] for j in range(h)] for t in (q, k, v)]


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax, one row at a time."""
    out = np.zeros_like(scores)
    for i in range(scores.shape[0]):
        e = np.exp(scores[i] - scores[i].max())
        out[i] = e / e.sum()
    return out


def grid_images(method, grid: tuple[int, int], batch: int = 2) -> torch.Tensor:
    """Random images whose patch grid is ``grid`` (rows, cols) for ``method``'s CLIP (seed 1)."""
    torch.manual_seed(1)
    patch = method.encoder.patch_size
    return torch.rand(batch, 3, grid[0] * patch, grid[1] * patch)
