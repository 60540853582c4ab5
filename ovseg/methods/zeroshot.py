"""Training-free baselines: dense vanilla CLIP and MaskCLIP (Zhou et al., ECCV 2022).

Both are a frozen CLIP whose patch tokens are compared with the class text embeddings by cosine
similarity; they differ only in the last vision block (``CLIPConfig.last_block``): CLIP runs it as
trained, MaskCLIP skips the query-key attention and keeps the value path (for CLIP ResNets, the attention
pool's value and output projections per position). MaskCLIP's two refinements, prompt denoising and key
smoothing, are :func:`prompt_denoising` and :func:`key_smoothing`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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

    reuses_features = True

    @torch.no_grad()
    def dense_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.dense_features(images), text)

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_dense(self.encoder.normalize(images))

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
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


#: MaskCLIP's confidence temperature: its refinements compare ``softmax(100 · cosine)`` with their thresholds
#: (``mmseg/models/decode_heads/maskclip_head.py`` ``refine_output``)
REFINE_TEMPERATURE = 100.0
#: the logit MaskCLIP writes over a denoised class at every position (``refine_output``: ``output[...] = -100``)
DENOISED_LOGIT = -100.0


def prompt_denoising(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """MaskCLIP's prompt denoising (``maskclip_head.py`` ``refine_output``, ``pd_thresh``): a class whose
    confidence ``softmax(100·logits)`` stays below ``threshold`` at every position of the image is removed (its
    logit set to -100 everywhere). ``logits``: ``[B, Q, h, w]`` cosines; a new tensor is returned."""
    confidence = F.softmax(logits * REFINE_TEMPERATURE, dim=1).flatten(2).amax(dim=-1)  # [B, Q]
    return logits.masked_fill((confidence < threshold)[:, :, None, None], DENOISED_LOGIT)


def key_smoothing(logits: torch.Tensor, keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """MaskCLIP's key smoothing (``maskclip_head.py`` ``refine_output``, ``ks_thresh``): the class
    probabilities ``softmax(100·logits)`` of each position whose top probability is below ``threshold`` are
    replaced by their sum over all positions weighted by key similarity. Returns probabilities ``[B, Q, h, w]``.

    The similarity is ``k̂ k̂ᵀ`` with the keys ``[B, C, h, w]`` L2-normalised **over positions** (per channel): the
    reference calls ``F.normalize(k, p=2)`` on ``[B, h·w, C]`` keys, whose default ``dim=1`` is the position axis;
    the released numbers were made so, and it is kept.
    """
    batch, classes, height, width = logits.shape
    probs = F.softmax(logits * REFINE_TEMPERATURE, dim=1).flatten(2).transpose(1, 2)  # [B, hw, Q]
    k = F.normalize(keys.flatten(2).transpose(1, 2).to(probs.dtype), p=2, dim=1)  # [B, hw, C], over positions
    smoothed = (k @ k.transpose(1, 2)) @ probs
    uncertain = probs.amax(dim=-1, keepdim=True) < threshold
    probs = torch.where(uncertain, smoothed, probs)
    return probs.transpose(1, 2).reshape(batch, classes, height, width)


class MaskCLIP(ZeroShotCLIP):
    """MaskCLIP: the last block's query-key attention skipped; value path, own residual, MLP (ViT) or the attention
    pool's value and output projections per position (ResNet); optionally prompt denoising and key smoothing."""

    default_protocol = "maskclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(last_block="value", residual="token", ffn=True),
        ks_thresh: float = 0.0,
        pd_thresh: float = 0.0,
        **evaluation: Any,
    ):
        """A dense CLIP, MaskCLIP's last block.

        Args:
            clip: the CLIP and its last block (default: value-only attention, token residual, MLP kept; a CLIP
                ResNet such as ``RN50`` takes the attention pool's value path whatever ``last_block`` says).
            ks_thresh: key smoothing (:func:`key_smoothing`) of positions whose top class probability is below it;
                0 turns it off (MaskCLIP's released configs; its ``kspd`` configs use 1.0).
            pd_thresh: prompt denoising (:func:`prompt_denoising`) of classes whose top probability over the image
                is below it; 0 turns it off (the ``kspd`` configs use 0.5). Applied before key smoothing, as in
                MaskCLIP.
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        if ks_thresh < 0 or pd_thresh < 0:
            raise ValueError(f"ks_thresh and pd_thresh must be >= 0 (0 = off), got {ks_thresh}, {pd_thresh}")
        super().__init__(clip, **evaluation)
        self.ks_thresh, self.pd_thresh = float(ks_thresh), float(pd_thresh)

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if self.ks_thresh <= 0 and self.pd_thresh <= 0:
            return super().dense_features(images)
        return self.encoder.encode_dense_keys(self.encoder.normalize(images), keys=self.ks_thresh > 0)

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None],
                             text: torch.Tensor) -> torch.Tensor:
        if self.ks_thresh <= 0 and self.pd_thresh <= 0:
            return super().logits_from_features(features, text)
        features, keys = features
        logits = super().logits_from_features(features, text)
        if self.pd_thresh > 0:
            logits = prompt_denoising(logits, self.pd_thresh)
        if self.ks_thresh > 0:
            logits = key_smoothing(logits, keys, self.ks_thresh)
        return logits
