"""ITACLIP (Aydın et al., "ITACLIP: Boosting Training-Free Semantic Segmentation with Image, Text, and Architectural
Enhancements", CVPRW 2025, arXiv 2411.12044), as its released code computes it (github.com/m-arda-aydn/ITACLIP,
commit 521a33c: ``clip/model.py`` ``VisionTransformer.forward`` / ``custom_attn`` / ``use_saved_attn``,
``itaclip_segmentor.py`` ``ITACLIP_Segmentor``):

1. **Architecture** (:func:`itaclip_attention`): the last block's attention probabilities are the self-self maps
   softmax(q qᵀ s) + softmax(k kᵀ s) (``attn_self=True``; each row sums to 2, not re-normalised), averaged half and
   half with the mean of the same maps of blocks 7, 8 and 10 (0-based 6, 7, 9: :data:`INTERMEDIATE_LAYERS`; their
   ``layer_count in [7, 8, 10]`` counts blocks from 1), each read at its block's input; the block keeps its token
   residual and drops its MLP. The earlier blocks run unchanged.
2. **Image engineering** (:meth:`ITACLIP.dense_logits`): each window is also encoded grayscale
   (``T.Grayscale()``) and blurred (``T.GaussianBlur(11, sigma=5)``), on the normalised input; the three views'
   L2-normalised patch features are averaged (not re-normalised) and scored against the text. A vertically and a
   horizontally flipped view are scored too, their logits flipped back and averaged; the window's logits are
   ``c · views + (1 - c) · flips`` with ``c`` the per-dataset ``img_eng_coefficient``
   (:data:`IMAGE_COEFFICIENTS`).
3. **Text** (the ``itaclip`` protocol, not this module): ITACLIP's class-name files with more synonyms, and each
   name's embedding mixed with its class's LLaMA-generated definition or synonym (``auxiliary_texts`` /
   ``auxiliary_weight``: ``(1 - w) · name + w · text``, not re-normalised). The window scores are dot products with
   these embeddings as they are (``image_features @ text_features.T``): no cosine re-normalisation of either side.

Where ovseg departs from the reference, within floating-point rounding: the flipped views' logits are flipped back
and mixed on the patch grid, and the evaluator upsamples the mix to the window (the reference upsamples each view to
the window first; bilinear upsampling is linear and mirror-symmetric, so the two agree to rounding); the views of a
window batch run as one forward pass (the reference: one window, five passes). The reference seeds torch's global
generator (``torch.manual_seed(0)``) in every window, for ``GaussianBlur``'s sigma draw from [5, 5]; ovseg draws
nothing.

Evaluation pipeline: the ``itaclip`` protocol (224/28 windows, per-dataset logit scales and thresholds, PAMR, the
3x3 label closing), checked by ``ovseg parity --ref ITACLIP=DIR``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor

from ovseg.methods.base import PerDatasetSettings
from ovseg.methods.resclip import cross_correlation_attention, residual_attention
from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.models.attention import AttentionTokens
from ovseg.models.clip import CLIPConfig, TransformerBlockView, dense_last_block

#: blocks (0-based) whose attention maps are averaged into the last block's (clip/model.py forward:
#: ``selected_intermediate_layers = [7, 8, 10]``, counted from 1 over ``resblocks[:-1]``)
INTERMEDIATE_LAYERS = (6, 7, 9)
#: clip/model.py forward: ``avg_attn = 0.5 * custom_attn + 0.5 * avg_attn``
INTERMEDIATE_WEIGHT = 0.5
#: itaclip_segmentor.py: ``T.GaussianBlur(kernel_size=11, sigma=5)``
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0
#: the released configs' ``img_eng_coefficient`` (ovseg dataset names; configs/cfg_voc21.py and cfg_cityscapes.py
#: 0.7, cfg_context60.py, cfg_coco_object.py and cfg_coco_stuff164k.py 0.75); others take :data:`IMAGE_COEFFICIENT`
IMAGE_COEFFICIENTS: dict[str, float] = {"voc21": 0.7, "context60": 0.75, "coco_object": 0.75, "coco_stuff171": 0.75,
                                        "cityscapes": 0.7}
#: itaclip_segmentor.py ``ITACLIP_Segmentor(img_eng_coefficient=0.75)``
IMAGE_COEFFICIENT = 0.75


def self_self_attention(tokens: AttentionTokens) -> Tensor:
    """ITACLIP's attention probabilities with ``attn_self``: softmax(q qᵀ s) + softmax(k kᵀ s), ``[B, heads, 1+N,
    1+N]`` (clip/model.py ``custom_attn(return_attn=True, attn_self=True)``)."""
    q, k = tokens.q, tokens.k
    return (torch.softmax(q @ q.transpose(-1, -2) * tokens.scale, dim=-1)
            + torch.softmax(k @ k.transpose(-1, -2) * tokens.scale, dim=-1))


#: ``attn_self`` -> the attention-map function of the last and the intermediate blocks
ATTENTION_MAPS = {True: self_self_attention, False: cross_correlation_attention}


def itaclip_attention(tokens: AttentionTokens, intermediate: Tensor, self_self: bool = True,
                      intermediate_weight: float = INTERMEDIATE_WEIGHT) -> Tensor:
    """The last block's attended values ``[B, heads, 1+N, head_dim]``: its attention map (:data:`ATTENTION_MAPS`)
    mixed with the intermediate blocks' mean map ``[B, heads, 1+N, 1+N]``, ``(1 - w) A + w A_mid``, applied to the
    values (clip/model.py ``use_saved_attn``)."""
    probs = (1 - intermediate_weight) * ATTENTION_MAPS[self_self](tokens) + intermediate_weight * intermediate
    return probs @ tokens.v


#: the second-category views (itaclip_segmentor.py ``flip_transforms``: ``RandomVerticalFlip(p=1)``,
#: ``RandomHorizontalFlip(p=1)``): the flipped image axes, flipped back on the logits
FLIPS: tuple[tuple[int, ...], ...] = ((-2,), (-1,))


def first_category_views(images: Tensor) -> list[Tensor]:
    """The normalised images, grayscale (ITU-R 601 weights of ``T.Grayscale``, on the normalised channels, repeated to
    three) and Gaussian-blurred (``T.GaussianBlur(11, 5)``: reflect padding)."""
    gray = TF.rgb_to_grayscale(images).expand_as(images)
    blurred = TF.gaussian_blur(images, [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])
    return [images, gray, blurred]


def engineered_logits(view_features: list[Tensor], flip_features: list[Tensor], text: Tensor,
                      image_coefficient: float) -> Tensor:
    """Image engineering's window logits ``[B, Q, h, w]`` from dense features ``[B, D, h, w]``: the mean of the
    first-category views' L2-normalised features dotted with ``text`` [Q, D] as given, mixed with the mean of the
    flipped views' logits flipped back (:data:`FLIPS`), ``c · views + (1 - c) · flips``."""
    features = torch.stack([F.normalize(f, dim=1) for f in view_features]).mean(dim=0)
    logits = torch.einsum("bdhw,qd->bqhw", features, text.to(features.dtype))
    if not flip_features:
        return logits.contiguous()
    flipped = torch.stack([torch.einsum("bdhw,qd->bqhw", F.normalize(f, dim=1), text.to(f.dtype)).flip(dims)
                           for f, dims in zip(flip_features, FLIPS)]).mean(dim=0)
    return (image_coefficient * logits + (1 - image_coefficient) * flipped).contiguous()


class ITACLIP(PerDatasetSettings, ZeroShotCLIP):
    """ITACLIP: self-self attention mixed with intermediate blocks' maps in the last block (no MLP), image
    engineering; the ``itaclip`` protocol (its text mixing, windows, thresholds, PAMR, label closing).

    The per-dataset setting (:class:`~ovseg.methods.base.PerDatasetSettings`) is the image-engineering coefficient:
    ``settings`` maps datasets to it, ``current`` is the one in force (inside the evaluator's ``scoring(dataset)``)."""

    default_protocol = "itaclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(residual="token", ffn=False),
        intermediate_layers: tuple[int, ...] = INTERMEDIATE_LAYERS,
        intermediate_weight: float = INTERMEDIATE_WEIGHT,
        self_self: bool = True,
        image_engineering: bool = True,
        image_coefficients: dict[str, float] | None = None,
        image_coefficient: float = IMAGE_COEFFICIENT,
        **evaluation: Any,
    ):
        """A dense CLIP, ITACLIP's last block and image engineering.

        Args:
            clip: the CLIP (an open_clip ViT); its ``residual`` and ``ffn`` say how the last block ends (released:
                the token residual, no MLP); its ``last_block`` is not used (ITACLIP's attention replaces it).
            intermediate_layers: the blocks (0-based) whose attention maps are averaged into the last block's
                (released: 6, 7, 9 of ViT-B/16's 12).
            intermediate_weight: the intermediate mean map's share of the last block's attention (released 0.5).
            self_self: the maps are softmax(q qᵀ s) + softmax(k kᵀ s) (the released ``attn_self=True``); off:
                CLIP's softmax(q kᵀ s).
            image_engineering: encode the grayscale, blurred and flipped views too (the released configs'
                ``img_engineering=True``); off: the window alone.
            image_coefficients: per dataset, changes to the released ``img_eng_coefficient``
                (:data:`IMAGE_COEFFICIENTS`).
            image_coefficient: the weight of the first-category views for any other dataset (the segmentor's
                default 0.75).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
        if self.encoder.kind != "vit":
            raise NotImplementedError(f"ITACLIP needs an open_clip ViT, {clip.name!r} is {self.encoder.kind!r}")
        layers = len(self.encoder.model.visual.transformer.resblocks)
        if not (intermediate_layers and all(1 <= i <= layers - 2 for i in intermediate_layers)):
            raise ValueError(f"intermediate_layers {list(intermediate_layers)} must be blocks between the first and "
                             f"the last of {clip.name!r} (1 … {layers - 2})")
        self.intermediate_layers = tuple(int(i) for i in intermediate_layers)
        self.intermediate_weight = float(intermediate_weight)
        self.self_self = bool(self_self)
        self.image_engineering = bool(image_engineering)
        # the image-engineering coefficient per dataset, for the rest, and in force now
        self.settings = {name: float(c) for name, c in {**IMAGE_COEFFICIENTS, **(image_coefficients or {})}.items()}
        self.default = float(image_coefficient)
        self.current = self.default
        self.encoder.last_stage = self._last_stage

    #: the text enters unnormalised and the views are mixed after scoring: the split into features and logits
    #: holds (features do not depend on the words), so ``ovseg demo`` may keep them
    reuses_features = True

    @torch.no_grad()
    def dense_features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Dense features ``[B, D, h, w]`` of the first-category views and of the flipped views (none without image
        engineering), all views of the batch in one forward pass."""
        x = self.encoder.normalize(images)
        if not self.image_engineering:
            return [self.encoder.encode_dense(x)], []
        views = first_category_views(x) + [x.flip(dims) for dims in FLIPS]
        features = self.encoder.encode_dense(torch.cat(views)).chunk(len(views))
        return list(features[:3]), list(features[3:])

    @torch.no_grad()
    def logits_from_features(self, features: tuple[list[Tensor], list[Tensor]], text: Tensor) -> Tensor:
        views, flips = features
        return engineered_logits(views, flips, text, self.current)

    # -- the encoder's last stage -------------------------------------------------------------------------
    def _last_stage(self, hidden: list[Tensor], last: TransformerBlockView, grid: tuple[int, int]) -> Tensor:
        """``hidden``: the outputs of blocks 0 … L-2; returns the last block's output (before ``ln_post``)."""
        resblocks = self.encoder.model.visual.transformer.resblocks
        # block i reads block i-1's output
        intermediate = residual_attention([hidden[i - 1] for i in self.intermediate_layers],
                                          [TransformerBlockView.from_open_clip(resblocks[i])
                                           for i in self.intermediate_layers], grid,
                                          attention_map=ATTENTION_MAPS[self.self_self])

        def attention(tokens: AttentionTokens) -> Tensor:
            return itaclip_attention(tokens, intermediate, self.self_self, self.intermediate_weight)

        cfg = self.encoder.config
        return dense_last_block(hidden[-1], last, attention, cfg.residual, cfg.ffn, grid)
