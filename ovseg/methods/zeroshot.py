"""Training-free baselines: dense vanilla CLIP and MaskCLIP (Zhou et al., ECCV 2022).

Both are a frozen CLIP whose patch tokens are compared with the class text embeddings by cosine
similarity; they differ only in the last vision block (``CLIPConfig.last_block``): CLIP runs it as
trained, MaskCLIP skips the query-key attention and keeps the value path.
"""

from __future__ import annotations

from typing import Any

import torch

from ovseg.methods.base import OVSegMethod, cosine_logits
from ovseg.models.clip import CLIPConfig, DenseCLIP
from ovseg.models.text import TextBank


class ZeroShotCLIP(OVSegMethod):
    """A frozen dense CLIP scored against text embeddings (the shared body of the baselines)."""

    def __init__(
        self,
        clip: CLIPConfig,
        **evaluation: Any,
    ):
        """A frozen dense CLIP.

        Args:
            clip: the CLIP and how its last block makes dense features.
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …),
                never re-typed here.
        """
        super().__init__(**evaluation)
        self.encoder = DenseCLIP(clip)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self._text_banks: dict[tuple[str, ...], TextBank] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode (dropout, patch dropout)
        return self

    @property
    def input_size(self) -> int:
        return self.encoder.input_size

    @property
    def weights_id(self) -> str:
        return self.encoder.weights_id

    @torch.no_grad()
    def encode_text(self, names: list[str], templates: list[str]) -> torch.Tensor:
        key = tuple(templates)
        if key not in self._text_banks:
            self._text_banks[key] = TextBank(self.encoder.encode_text, templates)
        return self._text_banks[key].embed(names)

    @torch.no_grad()
    def dense_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        features = self.encoder.encode_dense(self.encoder.normalize(images))
        # text made in the text tower's precision (the maskclip protocol's fp16 ensemble) is used as made
        return cosine_logits(features, text, self.encoder.options.text_ensemble_precision == "fp32")


class CLIP(ZeroShotCLIP):
    """Vanilla CLIP: the last block as trained, patch tokens through ``ln_post`` and the projection."""

    default_protocol = "sclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(last_block="vanilla", residual="token", ffn=True),
        **evaluation: Any,
    ):
        """A dense CLIP, its last block as trained.

        Args:
            clip: the CLIP and its last block (default: the last block as trained).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)


class MaskCLIP(ZeroShotCLIP):
    """MaskCLIP: the last block's query-key attention skipped; value path, own residual, MLP."""

    default_protocol = "maskclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(last_block="value", residual="token", ffn=True),
        **evaluation: Any,
    ):
        """A dense CLIP, MaskCLIP's last block.

        Args:
            clip: the CLIP and its last block (default: value-only attention, token residual, MLP kept).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
