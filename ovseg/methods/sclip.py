"""SCLIP (Wang et al., "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference", ECCV 2024,
arXiv 2312.01597): CLIP's last block with correlative self-attention, softmax(q qᵀ s) + softmax(k kᵀ s) applied to
the values (Sec. 3.2, Eq. 4), keeping the block's token residual and MLP as its released ``clip/model.py`` does
(``custom_attn`` with ``csa=True`` inside the unchanged residual block). The attention is ``qq_kk`` in
:mod:`ovseg.models.attention`; the ``sclip`` protocol is its evaluation pipeline."""

from __future__ import annotations

from typing import Any

from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.models.clip import CLIPConfig


class SCLIP(ZeroShotCLIP):
    """SCLIP: correlative self-attention (``qq_kk``) in the last block, token residual and MLP kept."""

    default_protocol = "sclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(last_block="qq_kk", residual="token", ffn=True),
        **evaluation: Any,
    ):
        """A dense CLIP, SCLIP's last block.

        Args:
            clip: the CLIP and its last block (default: ``qq_kk`` attention, token residual, MLP kept).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
