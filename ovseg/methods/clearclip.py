"""ClearCLIP (Lan et al., "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language Inference",
ECCV 2024, arXiv 2407.12442): the last block with self-self (query-query) attention, its residual connection and
its feed-forward network removed (Sec. 3.3-3.4). The attention is ``qq`` in :mod:`ovseg.models.attention`; the
paper's numbers come from the authors' own mmseg pipeline, the ``clearclip`` protocol."""

from __future__ import annotations

from typing import Any

from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.models.clip import CLIPConfig


class ClearCLIP(ZeroShotCLIP):
    """ClearCLIP: q-q attention in the last block, no residual, no MLP."""

    default_protocol = "clearclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(last_block="qq", residual="none", ffn=False),
        **evaluation: Any,
    ):
        """A dense CLIP, ClearCLIP's last block.

        Args:
            clip: the CLIP and its last block (default: ``qq`` attention, no residual, no MLP).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
