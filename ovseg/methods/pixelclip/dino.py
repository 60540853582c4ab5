"""DINO k-means masks: last-layer DINO ViT patch tokens clustered per image, one-hot masks that tile the image.

PixelCLIP's ``get_dino_masks`` (``pixelclip/pixelclip.py``): ``torch.hub`` DINO ViT-S/16 (facebookresearch/dino
``vision_transformer.py``), the image resized to whole patches, ``get_intermediate_layers(x)[0][:, 1:]`` (the last
block through the final norm, without the class token), ``fast_pytorch_kmeans.KMeans(n_clusters=16)``
``fit_predict`` per image, one-hot masks upsampled nearest. The same ViT runs here as a timm model (the hub
checkpoint's keys are timm's), with DINO's own positional-embedding resize (``pos_embed_interpolation``), loaded by
:func:`ovseg.models.vfm.load_timm_vit` (the VFM loader ProxyCLIP's DINO shares).
``ovseg parity --ref DINO=DIR`` compares features and masks with the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.models.vfm import FrozenImageModel, class_token_pos_embed, load_timm_vit

__all__ = ["DinoConfig", "DinoMasker", "authors_kmeans", "dino_pos_embed", "kmeans"]


@dataclass
class DinoConfig:
    """DINO ViT for k-means masks.

    Args:
        name: a timm model name (DINO ViT-S/16: ``vit_small_patch16_224.dino``).
        weights: ``"hub"`` (timm downloads or reads its Hugging Face cache), a local weights file (``.pth``/
            ``.safetensors``: timm's or the original DINO checkpoint), or None for random weights (tests).
        clusters: k-means clusters per image (PixelCLIP: 16).
        iterations: k-means iterations (Euclidean).
        kmeans: ``fast_pytorch_kmeans`` (the authors' library, the ``[dino]`` extra: ``KMeans(n_clusters)``
            ``fit_predict`` per image, its random start drawn from torch's global generator; what PixelCLIP's
            ``get_dino_masks`` runs) or ``ovseg`` (:func:`kmeans`: batched, stops when no point moves, an empty
            cluster keeps its centroid; seeded by the ``generator`` given to ``forward``).
        pos_embed_interpolation: ``dino`` (facebookresearch/dino ``vision_transformer.py``
            ``interpolate_pos_encoding``: bicubic by ``scale_factor`` (grid + 0.1) / 14, the hub model PixelCLIP
            loads) or ``timm`` (timm's ``resample_abs_pos_embed``: bicubic to the grid size, antialiased).
        model_kwargs: extra ``timm.create_model`` arguments (tiny test models: ``{depth: 1, embed_dim: 32}``).
    """

    name: str = "vit_small_patch16_224.dino"
    weights: str | None = "hub"
    clusters: int = 16
    iterations: int = 100
    kmeans: str = "ovseg"
    pos_embed_interpolation: str = "dino"
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kmeans not in ("ovseg", "fast_pytorch_kmeans"):
            raise ValueError(f"DinoConfig.kmeans must be 'ovseg' or 'fast_pytorch_kmeans', got {self.kmeans!r}")
        if self.pos_embed_interpolation not in ("dino", "timm"):
            raise ValueError(f"DinoConfig.pos_embed_interpolation must be 'dino' or 'timm', got "
                             f"{self.pos_embed_interpolation!r}")


def kmeans(x: Tensor, k: int, iterations: int = 100, generator: torch.Generator | None = None) -> Tensor:
    """Batched Euclidean k-means. ``x`` [B, N, C] -> cluster index per point [B, N] (k ≤ N).

    Centroids start at k distinct random points of each item; an empty cluster keeps its centroid.
    """
    batch, num, _ = x.shape
    if k > num:
        raise ValueError(f"k-means with k={k} needs at least k points, got {num}")
    x = x.float()
    starts = torch.stack([torch.randperm(num, generator=generator, device="cpu")[:k] for _ in range(batch)])
    centroids = torch.gather(x, 1, starts.to(x.device)[..., None].expand(-1, -1, x.shape[-1]))
    assign = torch.cdist(x, centroids).argmin(dim=-1)
    for _ in range(iterations):
        one_hot = F.one_hot(assign, k).to(x.dtype)  # [B, N, k]
        counts = one_hot.sum(dim=1)  # [B, k]
        sums = one_hot.transpose(1, 2) @ x  # [B, k, C]
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centroids)
        new = torch.cdist(x, centroids).argmin(dim=-1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def authors_kmeans(x: Tensor, k: int, iterations: int = 100) -> Tensor:
    """PixelCLIP's clustering: ``fast_pytorch_kmeans.KMeans(n_clusters=k)`` (Euclidean, ``max_iter`` 100, ``tol``
    1e-4, ``init_method='random'``: k rows drawn with ``torch.randint``), one ``fit_predict`` per item of ``x``
    [B, N, C] in order -> cluster index per point [B, N]."""
    try:
        from fast_pytorch_kmeans import KMeans
    except ImportError as err:
        raise ImportError(f"DinoConfig(kmeans='fast_pytorch_kmeans') needs the [dino] extra: pip install -e "
                          f"'.[dino]' (fast-pytorch-kmeans, PixelCLIP's k-means; {err})") from None
    clusterer = KMeans(n_clusters=k, max_iter=iterations)
    return torch.stack([clusterer.fit_predict(item) for item in x])


def dino_pos_embed(vit: nn.Module, x: Tensor) -> Tensor:
    """timm ``VisionTransformer._pos_embed`` (patch tokens [B, h, w, C] -> class token + patches, positional
    embedding added) resizing the embedding as DINO's ``interpolate_pos_encoding`` does: bicubic by
    ``scale_factor`` (grid + 0.1) / trained grid (the scale itself sets the sampling positions), not to a size
    (:func:`ovseg.models.vfm.pos_embed_resized`, rule ``dino``)."""
    return class_token_pos_embed(vit, x, "dino")


class DinoMasker(FrozenImageModel):
    """Images in [0,1] [B,3,H,W] -> k-means masks [B, k, H, W] (bool; every pixel in exactly one mask)."""

    def __init__(self, config: DinoConfig | None = None):
        """The DINO model.

        Args:
            config: which DINO and how it clusters (None: :class:`DinoConfig`'s defaults).
        """
        config = config or DinoConfig()
        super().__init__(load_timm_vit(config.name, config.weights, config.model_kwargs,
                                       config.pos_embed_interpolation, what="DINO"))
        self.config = config

    @torch.no_grad()
    def features(self, images01: Tensor) -> Tensor:
        """Last-layer patch tokens [B, h*w, C] (after the final norm) and the grid."""
        x = (images01.float() - self.mean) / self.std
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = F.interpolate(x, size=(h * self.patch_size, w * self.patch_size), mode="bilinear", align_corners=False)
        tokens = self.model.forward_features(x)
        return tokens[:, getattr(self.model, "num_prefix_tokens", 1):], (h, w)

    @torch.no_grad()
    def forward(self, images01: Tensor, generator: torch.Generator | None = None) -> Tensor:
        tokens, (h, w) = self.features(images01)
        k = self.config.clusters
        if self.config.kmeans == "fast_pytorch_kmeans":
            assign = authors_kmeans(tokens, k, self.config.iterations)  # [B, h*w]
        else:
            assign = kmeans(tokens, k, self.config.iterations, generator)
        masks = F.one_hot(assign, k).permute(0, 2, 1).reshape(len(images01), k, h, w)
        return F.interpolate(masks.float(), size=images01.shape[-2:], mode="nearest").bool()
