"""ProxyCLIP (Lan et al., "ProxyCLIP: Proxy Attention Improves CLIP for Open-Vocabulary Segmentation", ECCV 2024):
CLIP's last ViT block replaced by a *proxy attention* whose weights come from a vision foundation model (VFM).

The released code (github.com/mc-lan/ProxyCLIP, ``proxyclip_segmentor.py`` ``ProxyCLIPSegmentation.forward_feature``
and ``open_clip/transformer.py`` ``VisionTransformer.forward`` / ``custom_attn``):

1. the window, un-normalised from CLIP's mean/std and normalised with ImageNet's, goes through the VFM: DINO ViT-B/8
   (their default, ``torch.hub`` ``dino_vitb8``: last-layer patch tokens of ``get_intermediate_layers``), DINOv2
   ViT-B/14 reg, MAE ViT-B/16 (resized to the window size) or SAM ViT-B's image encoder (resized to 1024²);
   :mod:`ovseg.models.vfm` reads them;
2. CLIP runs every block but the last unchanged; the last block's values (of ``ln_1(x)``) are mixed by the VFM's
   token similarities (:func:`ovseg.models.attention.proxy_attention`: cosine similarity, ``(S - mean(S)·beta)·
   gamma``, negatives masked, softmax), on the VFM's grid, then ``out_proj``, ``ln_post`` and ``proj`` with no
   residual and no MLP (:class:`ProxyLastStage`);
3. the features, on the VFM's grid, are compared with the class embeddings; the ``proxyclip`` protocol does the rest
   (windows 336/112, logit scale 40, thresholds).

Where the reference only runs one square window at a time, ovseg is written for any batch and grid and equals it on
one square window: the similarity's mean is each image's own (the reference's spans the batch, one image there), and
CLIP's values are reshaped to (rows, cols) (the reference's ``token_size`` is (cols, rows), its DINO grid
(rows, rows)). The reference runs CLIP and the VFM in fp16; here they run in the precision they are loaded in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.models.attention import AttentionTokens, proxy_attention
from ovseg.models.clip import CLIPConfig, TransformerBlockView, _merge_heads
from ovseg.models.vfm import VFMConfig, VisionFoundationModel

__all__ = ["ProxyCLIP", "ProxyLastStage", "proxy_last_block"]


def proxy_last_block(x: Tensor, block: TransformerBlockView, grid: tuple[int, int], proxy: Tensor,
                     beta: float = 1.2, gamma: float = 3.0, mean_over_batch: bool = False) -> Tensor:
    """ProxyCLIP's last block (``VisionTransformer.forward``: ``custom_attn(blk.attn, blk.ln_1(x), ...)``): the
    block's values of ``ln_1(x)`` (``x`` [B, 1+N, C], class first, patches over CLIP's ``grid``) attended by
    :func:`~ovseg.models.attention.proxy_attention` with the VFM features ``proxy`` [B, C', H, W], then ``out_proj``;
    no residual, no MLP. Returns [B, H·W, C] on the VFM's grid (before ``ln_post``). ``mean_over_batch``: see
    :func:`~ovseg.models.attention.proxy_attention` (Trident)."""
    values = AttentionTokens(block.ln_1(x), block, grid).v
    return block.out_proj(_merge_heads(proxy_attention(values, grid, proxy, beta, gamma, mean_over_batch)))


@dataclass
class ProxyLastStage:
    """A :data:`~ovseg.models.clip.LastStage` running :func:`proxy_last_block` on the VFM features set in ``proxy``
    before each image pass. The class slot of the tokens it returns holds the last block's input class token (not
    an output of ProxyCLIP, whose forward returns patch tokens only); the patch slots are on the VFM's grid."""

    beta: float = 1.2
    gamma: float = 3.0
    proxy: Tensor | None = None

    def __call__(self, hidden: list[Tensor], last: TransformerBlockView, grid: tuple[int, int]) -> Tensor:
        if self.proxy is None:
            raise RuntimeError("ProxyLastStage needs the VFM features (set .proxy before the image pass)")
        x = hidden[-1]
        return torch.cat([x[:, :1], proxy_last_block(x, last, grid, self.proxy, self.beta, self.gamma)], dim=1)


class ProxyCLIP(ZeroShotCLIP):
    """ProxyCLIP: CLIP's last block replaced by a proxy attention on a VFM's token similarities
    (:class:`ProxyLastStage`); dense features on the VFM's grid; the ``proxyclip`` protocol."""

    default_protocol = "proxyclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(),
        vfm: VFMConfig = VFMConfig(),
        beta: float = 1.2,
        gamma: float = 3.0,
        **evaluation: Any,
    ):
        """A dense CLIP whose last block attends with a VFM's token similarities.

        Args:
            clip: the CLIP (an open_clip or transformers ViT; its ``last_block``, ``residual`` and ``ffn`` are not
                used: the proxy attention replaces the last block).
            vfm: the vision foundation model (default: DINO ViT-B/8 from the hub, ProxyCLIP's
                ``configs/base_config.py`` ``vfm_model='dino'``).
            beta: the similarity's mean is scaled by it before it is subtracted (``ProxyCLIPSegmentation(beta=1.2)``).
            gamma: the centred similarity's temperature (``gamma=3.0``).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
        if self.encoder.kind not in ("vit", "hf_vit"):
            raise ValueError(f"ProxyCLIP needs a ViT image tower, {clip.name!r} is {self.encoder.kind!r}")
        self.vfm = VisionFoundationModel(vfm)
        self.vfm.requires_grad_(False)
        self.vfm.eval()
        self.beta, self.gamma = float(beta), float(gamma)
        self.stage = ProxyLastStage(self.beta, self.gamma)
        self.encoder.last_stage = self.stage

    def train(self, mode: bool = True):
        super().train(mode)
        self.vfm.eval()
        return self

    @property
    def weights_id(self) -> str:
        vfm = self.vfm.config
        return f"{self.encoder.weights_id}+{vfm.kind}:{vfm.model_name}:{vfm.weights}"

    def _vfm_images(self, images: Tensor, normalized: Tensor) -> Tensor:
        """The [0, 1] images the VFM reads: CLIP's normalised input un-normalised (``myutils.UnNormalize`` in
        ``forward_feature``; equal to ``images`` up to float rounding, and bitwise the reference's arithmetic, which
        matters where the proxy attention's mask cuts through near-zero similarities), or ``images`` themselves where
        the protocol normalises CLIP's input otherwise."""
        if self.encoder.options.normalization != "model":
            return images
        return normalized * self.encoder.std + self.encoder.mean

    @torch.no_grad()
    def dense_features(self, images: Tensor) -> Tensor:
        """[0, 1] images [B, 3, H, W] -> features [B, D, h, w] on the VFM's grid (not L2-normalised)."""
        x = self.encoder.normalize(images)
        proxy = self.vfm(self._vfm_images(images, x))
        self.stage.proxy = proxy
        try:
            tokens = self.encoder.encode_tokens(x)
        finally:
            self.stage.proxy = None
        return tokens[:, 1:].transpose(1, 2).reshape(len(images), -1, *proxy.shape[-2:])
