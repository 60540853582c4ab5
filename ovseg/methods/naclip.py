"""NACLIP (Hajimiri et al., "Pay Attention to Your Neighbours: Training-Free Open-Vocabulary Semantic
Segmentation", WACV 2025, arXiv 2404.08181): the last block's attention is key-key attention plus a Gaussian
neighbourhood bias over the patch grid (Sec. 3, "neighbourhood attention"), and the block keeps neither its
residual nor its MLP (the released code's ``arch='reduced'``). PAMR post-processing is a setting of the ``naclip``
protocol (``pamr_steps``, :mod:`ovseg.eval.pamr`), not part of the model.

This module registers the attention (``last_block: naclip``): the whole method is this file plus its configs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.models.attention import AttentionTokens, register_attention
from ovseg.models.clip import CLIPConfig

#: standard deviation of the neighbourhood Gaussian, in patches (the released code's ``gaussian_std`` default)
GAUSSIAN_STD = 5.0


def neighbourhood_bias(grid: tuple[int, int], std: float, device: torch.device | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """``[1+N, 1+N]`` attention-logit bias: exp(-|p - p'|² / (2 std²)) between patches p, p' of the grid (in
    patch units), 0 on the class token's row and column (which the released code leaves unbiased)."""
    rows, cols = grid
    position = torch.stack(torch.meshgrid(torch.arange(rows, dtype=torch.float64),
                                          torch.arange(cols, dtype=torch.float64), indexing="ij"), -1).reshape(-1, 2)
    squared_distance = (position[:, None] - position[None]).pow(2).sum(-1)
    bias = F.pad(torch.exp(-squared_distance / (2 * std**2)), (1, 0, 1, 0))
    return bias.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _cached_bias(grid: tuple[int, int], std: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    return neighbourhood_bias(grid, std, device, dtype)


def neighbourhood_attention(tokens: AttentionTokens, std: float = GAUSSIAN_STD) -> Tensor:
    """softmax(k kᵀ s + Ω) v with Ω the Gaussian :func:`neighbourhood_bias` (the same for every head)."""
    k = tokens.k
    bias = _cached_bias(tuple(tokens.grid), float(std), k.device, k.dtype)
    return F.scaled_dot_product_attention(k, k, tokens.v, attn_mask=bias)


register_attention("naclip")(neighbourhood_attention)


class NACLIP(ZeroShotCLIP):
    """NACLIP: neighbourhood attention in the last block, no residual, no MLP (PAMR: the protocol's ``pamr_steps``)."""

    default_protocol = "naclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(last_block="naclip", residual="none", ffn=False),
        **evaluation: Any,
    ):
        """A dense CLIP, NACLIP's last block.

        Args:
            clip: the CLIP and its last block (default: neighbourhood attention, no residual, no MLP).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
