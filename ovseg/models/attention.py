"""Last-block attentions: the registry behind ``CLIPConfig.last_block``.

Most training-free OVSS papers change one thing: how CLIP's last ViT block mixes tokens. Each variant here is a
function of the block's queries, keys and values (``[B, heads, 1+N, head_dim]``, class token first, patches
row-major over ``grid``) that returns the attended values in the same shape; the block's output projection,
residual and MLP stay in :func:`ovseg.models.clip.dense_last_block`.

A new variant is one registered function, from any module::

    from ovseg.models.attention import register_attention

    @register_attention("my_attention")
    def my_attention(tokens: AttentionTokens) -> Tensor:
        return F.scaled_dot_product_attention(tokens.k, tokens.k, tokens.v)

and ``clip.last_block: my_attention`` in a config. A config may also name ``"package.module:function"``: the
module is imported (registering whatever it defines) and the function is used, so a variant outside ovseg needs
no code in ovseg at all.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol

import torch.nn.functional as F
from torch import Tensor


class BlockWeights(Protocol):
    """The projection weights and head count of the block an attention reads (``ovseg.models.clip``'s
    ``TransformerBlockView`` is one; a protocol, so that this module imports nothing of clip.py, which imports it)."""

    q_weight: Tensor
    q_bias: Tensor | None
    k_weight: Tensor
    k_bias: Tensor | None
    v_weight: Tensor
    v_bias: Tensor | None
    num_heads: int


@dataclass
class AttentionTokens:
    """The last block's inputs to its attention; ``q``/``k``/``v`` are computed on first use (the value path never
    computes ``q`` or ``k``)."""

    normed: Tensor  #: ``ln_1(x)``, ``[B, 1+N, C]``
    block: BlockWeights  #: the block's projection weights and head count
    grid: tuple[int, int]  #: the patch grid ``(rows, cols)``, ``N = rows * cols``

    def _heads(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        batch, length, _ = self.normed.shape
        x = F.linear(self.normed, weight, bias)
        return x.view(batch, length, self.block.num_heads, -1).transpose(1, 2)

    @cached_property
    def q(self) -> Tensor:
        return self._heads(self.block.q_weight, self.block.q_bias)

    @cached_property
    def k(self) -> Tensor:
        return self._heads(self.block.k_weight, self.block.k_bias)

    @cached_property
    def v(self) -> Tensor:
        return self._heads(self.block.v_weight, self.block.v_bias)

    @property
    def scale(self) -> float:
        """``head_dim ** -0.5``, the scale of CLIP's own attention (and SDPA's default)."""
        return (self.block.q_weight.shape[0] // self.block.num_heads) ** -0.5


AttentionFn = Callable[[AttentionTokens], Tensor]

#: name -> attention; ``CLIPConfig.last_block`` takes any key (or ``"module:function"``)
LAST_BLOCK_ATTENTIONS: dict[str, AttentionFn] = {}


def register_attention(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator: make ``fn`` selectable as ``CLIPConfig(last_block=name)``. Re-registering a name with another
    function is an error (two modules claiming one name would silently change numbers)."""

    def add(fn: AttentionFn) -> AttentionFn:
        existing = LAST_BLOCK_ATTENTIONS.get(name)
        if existing is not None and existing.__qualname__ != fn.__qualname__:
            raise ValueError(f"last-block attention {name!r} is already registered by {existing.__module__}."
                             f"{existing.__qualname__}")
        LAST_BLOCK_ATTENTIONS[name] = fn
        return fn

    return add


def get_attention(name: str) -> AttentionFn:
    """The attention registered as ``name``, or the function ``"module:function"`` names (importing the module)."""
    if name in LAST_BLOCK_ATTENTIONS:
        return LAST_BLOCK_ATTENTIONS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"last_block {name!r}: cannot import {attr!r} from {module_name!r} ({error})") from error
        if not callable(fn):
            raise ValueError(f"last_block {name!r} is not a function")
        return fn
    raise ValueError(f"last_block must be one of {sorted(LAST_BLOCK_ATTENTIONS)} or 'module:function', got {name!r}")


# -- the variants of the papers ovseg ships ------------------------------------------------------------------


@register_attention("vanilla")
def vanilla_attention(tokens: AttentionTokens) -> Tensor:
    """CLIP's attention as trained: softmax(q kᵀ s) v."""
    return F.scaled_dot_product_attention(tokens.q, tokens.k, tokens.v)


@register_attention("value")
def value_attention(tokens: AttentionTokens) -> Tensor:
    """MaskCLIP (Zhou et al., ECCV 2022; PixelCLIP's dense path): attention replaced by the identity, each token
    keeps its own value; q·k is never computed."""
    return tokens.v


@register_attention("qq_kk")
def qq_kk_attention(tokens: AttentionTokens) -> Tensor:
    """SCLIP's correlative self-attention (Wang et al., ECCV 2024, Eq. 4): (softmax(q qᵀ s) + softmax(k kᵀ s)) v."""
    return (F.scaled_dot_product_attention(tokens.q, tokens.q, tokens.v)
            + F.scaled_dot_product_attention(tokens.k, tokens.k, tokens.v))


@register_attention("qq")
def qq_attention(tokens: AttentionTokens) -> Tensor:
    """ClearCLIP's self-self attention (Lan et al., ECCV 2024, Sec. 3.3): softmax(q qᵀ s) v."""
    return F.scaled_dot_product_attention(tokens.q, tokens.q, tokens.v)


@register_attention("kk")
def kk_attention(tokens: AttentionTokens) -> Tensor:
    """Key-key attention: softmax(k kᵀ s) v (NACLIP's ablation without the neighbourhood bias)."""
    return F.scaled_dot_product_attention(tokens.k, tokens.k, tokens.v)


@register_attention("qq_kk_vv")
def qq_kk_vv_attention(tokens: AttentionTokens) -> Tensor:
    """CLIPtrase's recalibrated self-correlation (Shao et al., ECCV 2024; ``clip_utils/attn2.py``
    ``multi_head_attention_forward(self_qk_weight=True)``): (softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s)) v,
    the three maps summed, not averaged."""
    return (F.scaled_dot_product_attention(tokens.q, tokens.q, tokens.v)
            + F.scaled_dot_product_attention(tokens.k, tokens.k, tokens.v)
            + F.scaled_dot_product_attention(tokens.v, tokens.v, tokens.v))


# -- attention across models -----------------------------------------------------------------------------------


def proxy_attention(values: Tensor, grid: tuple[int, int], proxy: Tensor, beta: float = 1.2,
                    gamma: float = 3.0, mean_over_batch: bool = False) -> Tensor:
    """ProxyCLIP's proxy attention (Lan et al., ECCV 2024, Eq. 3-4; ``open_clip/transformer.py``
    ``VisionTransformer.custom_attn`` of github.com/mc-lan/ProxyCLIP): CLIP's last-block values mixed by the token
    similarities of another model (a VFM's patch features).

    ``proxy`` [B, C', H, W] are the VFM's features; their cosine similarities S [B, HW, HW] are normalised
    adaptively, ``(S - mean(S)·beta)·gamma`` with the mean over all of an image's pairs, set to -inf where negative,
    and softmax-ed per row (the same weights for every head). ``values`` [B, heads, 1+N, head_dim] (class first, the
    patches row-major over CLIP's ``grid``) lose the class token and are resized bilinearly to the VFM's grid
    (``align_corners=False``) per head. Returns the attended values [B, heads, H·W, head_dim] on the VFM's grid;
    the caller applies the block's ``out_proj`` (ProxyCLIP then ``ln_post`` and ``proj``, no residual and no MLP).

    The reference takes the similarity's mean over the whole batch and reshapes the values as (width, height) rows;
    it runs one square window at a time, where both equal what is done here (each image's own mean, (rows, cols)).
    ``mean_over_batch``: one mean over every pair of the whole batch instead (Trident's ``custom_attn``, which takes
    all windows of one image as its batch and keeps ProxyCLIP's batch-wide ``torch.mean(similarity)``).
    """
    batch, heads, _, head_dim = values.shape
    rows, cols = grid
    height, width = proxy.shape[-2:]
    proxy = F.normalize(proxy.flatten(2), dim=1)  # [B, C', HW], each position a unit vector
    similarity = proxy.transpose(1, 2) @ proxy  # [B, HW, HW]
    mean = similarity.mean() if mean_over_batch else similarity.mean(dim=(1, 2), keepdim=True)
    similarity = (similarity - mean * beta) * gamma
    similarity = similarity.masked_fill(similarity < 0, float("-inf"))
    weights = F.softmax(similarity.to(values.dtype), dim=-1)
    patches = values[:, :, 1:].reshape(batch * heads, rows, cols, head_dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(height, width), mode="bilinear", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(batch, heads, height * width, head_dim)
    return weights[:, None] @ patches


__all__ = ["AttentionFn", "AttentionTokens", "LAST_BLOCK_ATTENTIONS", "get_attention", "proxy_attention",
           "register_attention"]
