"""Trident (Shi, Dong, Xu, "Harnessing Vision Foundation Models for High-Performance, Training-Free Open Vocabulary
Segmentation", ICCV 2025, arXiv 2411.09219), as its released code computes it (github.com/YuHengsss/Trident:
``trident.py`` ``Trident.get_trident_seg`` / ``get_sam_feat`` / ``get_windowed_imgs``, ``open_clip/transformer.py``
``VisionTransformer.forward`` / ``custom_attn`` / ``guidance_attn`` / ``get_sam_sim``, ``seg_utils/utils.py``
``preprocess_image``):

1. The protocol-resized image is resized (bilinear) so both sides are multiples of CLIP's patch and at least the
   window (:func:`clip_input_size`, ``preprocess_image``) and cut into ``crop``×``crop`` windows on mmseg's slide grid
   (336, stride 224; VOC20 112).
2. Each window runs CLIP's blocks but the last, then ProxyCLIP's proxy attention (:func:`~ovseg.models.attention.
   proxy_attention`) with DINO ViT-B/16's last-layer features of the window (read as the reference hands it over,
   :meth:`Trident.dino_images`) as the proxy — the similarity mean taken
   over all windows of the image at once, as ``custom_attn`` gets them as one batch — and the block's ``out_proj``
   (no residual, no MLP).
3. The windows' tokens are spliced into one grid of the whole image, each position the mean over the windows that
   cover it (:func:`splice_windows`), and resized bilinearly to SAM's token grid.
4. SAM's image encoder reads the image at its **original** resolution (the evaluator hands it over:
   :meth:`Trident.reading_originals`): sides rounded up to multiples of CLIP's patch with cv2, then SAM's own
   ``ResizeLongestSide(1024)``, normalisation and padding (``SamPredictor.set_image``). Its last block's attention
   probabilities and values (:class:`SAMLastAttention`, a forward hook on the unmodified ``segment_anything`` encoder;
   the reference edits SAM to store them) cropped to the image's tokens give the affinity (:func:`sam_affinity`); the
   spliced tokens are aggregated with it, then ``ln_post`` and the projection: dense features on SAM's token grid.
   Cityscapes: SAM reads the left and right halves separately and each half of the spliced grid is aggregated with
   its own half's affinity (:attr:`TridentSettings.sam_halves`).

Per-dataset settings (``configs/cfg_*.py``): :data:`DATASET_SETTINGS`, read for the dataset being scored
(:meth:`Trident.scoring`). SAM refinement (``eval.py --sam_refine``; off in ``configs/base_config.py``):
``Trident(sam_refinement=True)``, :mod:`ovseg.methods.sam_refinement` on the evaluator's label map and class
probabilities (:attr:`Trident.label_refinement`); SAM's image encoder reads the image once more for it (the reference
keeps ``set_image``'s features; on Cityscapes it also reads the whole image then).

Departures, for inputs the reference does not take: a window smaller than ``crop`` (an image smaller than the window
whose sides are already multiples of the patch) is used as it is, where the reference pads it to a multiple of 56
and then fails to splice it; batches hold several images (each its own windows, mean and SAM pass). Precision: the
reference runs CLIP, DINO and SAM in fp16 on a GPU; ovseg runs them in the precision their configs give (fp32 by
default). Without an original image (``dense_logits`` called directly, a sliding-window protocol) SAM reads the image
the method is given.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.eval.inference import resize_image, slide_windows, to_uint8_hwc
from ovseg.methods.base import PerDatasetSettings, cosine_logits
from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.methods.proxyclip import proxy_last_block
from ovseg.methods.sam_refinement import SamRefinementSettings, sam_prompting, sam_refine_labels
from ovseg.models.clip import CLIPConfig, TransformerBlockView
from ovseg.models.vfm import VFMConfig, VisionFoundationModel

#: segment-anything ``Sam.pixel_mean`` / ``pixel_std`` (0-255 RGB), what ``SamPredictor.set_image`` normalises with
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
#: trident.py ``SegDataPreProcessor(mean=[122.771, 116.746, 104.094], std=[68.501, 66.632, 70.323])``: the 0-255 image
#: normalised with these, then ``UnNormalize`` with CLIP's exact mean/std and ImageNet's ``Normalize`` for DINO. The two
#: means/stds differ in the 6th digit, so DINO reads ``x · (1 + 5e-6) + offset``, not ``x``; kept (:meth:`Trident.
#: dino_images`): the proxy attention's mask (similarities below the mean set to -inf) turns such a change of a random
#: DINO's features into a 3e-4 change of the spliced tokens (``ovseg parity``)
SEG_PREPROCESSOR_MEAN = (122.771, 116.746, 104.094)
SEG_PREPROCESSOR_STD = (68.501, 66.632, 70.323)
#: get_sam_sim: the per-row cosine threshold is capped here, and replaced by this where negative with
#: ``refine_neg_cos`` off
THRESHOLD_CAP = 0.9
NEGATIVE_THRESHOLD = 0.6


@dataclass(frozen=True)
class TridentSettings:
    """Trident's per-dataset settings (the released ``configs/cfg_*.py`` model keys over ``base_config.py``).

    Args:
        cos_fac: SAM affinity: a pair is kept where the values' cosine exceeds ``cos_fac`` times the row's mean.
        refine_neg_cos: keep a negative threshold (off: a negative one becomes 0.6).
        slide_stride: window stride in pixels.
        slide_crop: window side in pixels.
        sam_halves: SAM reads the left and right halves of the image separately (Cityscapes' ``dataset_type``).
        coarse_thresh: SAM refinement (:mod:`ovseg.methods.sam_refinement`): classes and pixels below this top
            probability are not refined (``cfg_*.py``' ``coarse_thresh``; ``base_config.py`` 0.2).
    """

    cos_fac: float = 1.2
    refine_neg_cos: bool = True
    slide_stride: int = 224
    slide_crop: int = 336
    sam_halves: bool = False
    coarse_thresh: float = 0.2


#: configs/cfg_<dataset>.py (ovseg dataset names); the others keep base_config.py's values
DATASET_SETTINGS: dict[str, TridentSettings] = {
    "voc20": TridentSettings(cos_fac=0.0, slide_stride=112),  # cfg_voc20.py
    "cityscapes": TridentSettings(cos_fac=3.0, refine_neg_cos=False, sam_halves=True,
                                  coarse_thresh=0.10),  # cfg_city_scapes.py
    "ade150": TridentSettings(refine_neg_cos=False, coarse_thresh=0.05),  # cfg_ade20k.py
    "context59": TridentSettings(coarse_thresh=0.15),  # cfg_context59.py
    "context60": TridentSettings(coarse_thresh=0.15),  # cfg_context60.py
    "coco_object": TridentSettings(coarse_thresh=0.25),  # cfg_coco_object.py
    "coco_stuff171": TridentSettings(coarse_thresh=0.05),  # cfg_coco_stuff164k.py
}
#: any other dataset (the toy world, ``ovseg predict``): base_config.py
DEFAULT_SETTINGS = TridentSettings()


# -- geometry ---------------------------------------------------------------------------------------------------
def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def clip_input_size(height: int, width: int, patch: int, crop: int) -> tuple[int, int]:
    """``preprocess_image``: an image whose sides are multiples of ``patch`` keeps its size; otherwise the long side
    is rounded up to a multiple, the short one scaled alike (truncated) and rounded up, each at least ``crop``."""
    if height % patch == 0 and width % patch == 0:
        return height, width
    longer = max(height, width)
    target = round_up(longer, patch)
    new_h, new_w = int(height * target / longer), int(width * target / longer)
    return max(round_up(new_h, patch), crop), max(round_up(new_w, patch), crop)


def splice_windows(windows: Tensor, boxes: list[tuple[int, int, int, int]], size: tuple[int, int]) -> Tensor:
    """``guidance_attn``'s splicing: window maps ``[B, C, h, w]`` placed at ``boxes`` ``(y1, y2, x1, x2)`` (grid units,
    ``y2 - y1 = h``) of a ``size`` grid -> ``[1, C, H, W]``, each position the mean of the windows covering it (added
    in the windows' order, as the reference)."""
    total = windows.new_zeros(1, windows.shape[1], *size)
    count = windows.new_zeros(1, 1, *size)
    for window, (y1, y2, x1, x2) in zip(windows, boxes):
        total[0, :, y1:y2, x1:x2] += window
        count[:, :, y1:y2, x1:x2] += 1
    return total / count


def window_grid(vfm_grid: tuple[int, int], clip_grid: tuple[int, int]) -> tuple[int, tuple[int, int] | None]:
    """``guidance_attn``: the proxy attention's tokens are on the VFM's grid; where its width is not a multiple of
    CLIP's, they are resized to CLIP's grid times ``round(vfm rows / clip rows)``. Returns that ratio and the size to
    resize to (None: kept, the ratio is the widths' quotient)."""
    if vfm_grid[1] % clip_grid[1] != 0:
        ratio = int(round(vfm_grid[0] / clip_grid[0]))
        return ratio, (clip_grid[0] * ratio, clip_grid[1] * ratio)
    return vfm_grid[1] // clip_grid[1], None


# -- SAM --------------------------------------------------------------------------------------------------------
def sam_affinity(values: Tensor, attention: Tensor, cos_fac: float, refine_neg_cos: bool = True) -> Tensor:
    """``get_sam_sim``: SAM's last-block values ``[B, heads, h, w, d]`` and attention probabilities ``[B, heads, n, n]``
    (``n = h·w``) -> the aggregation weights ``[B, n, n]`` (the reference repeats them per CLIP head: all equal).

    Per head, the attention of a pair is kept where the cosine of the two positions' values exceeds the row's
    threshold ``cos_fac`` × (the cosines' mean over heads, then over the row), capped at 0.9 (a negative threshold
    becomes 0.6 with ``refine_neg_cos`` off); the kept attention is averaged over heads and each row normalised
    to sum 1 (the diagonal, cosine 1, is always kept)."""
    unit = F.normalize(values.flatten(2, 3), dim=-1)
    cosine = torch.einsum("bhmc,bhnc->bhmn", unit, unit)
    threshold = cos_fac * cosine.mean(dim=1, keepdim=True).mean(dim=-1, keepdim=True)
    if not refine_neg_cos:
        threshold = torch.where(threshold < 0.0, NEGATIVE_THRESHOLD, threshold)
    threshold = torch.where(threshold > THRESHOLD_CAP, THRESHOLD_CAP, threshold)
    kept = torch.where(cosine > threshold, attention, torch.zeros_like(attention)).mean(dim=1)
    return kept / kept.sum(dim=-1, keepdim=True)


def last_block_attention(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """segment-anything ``Attention.forward`` on its input ``x`` ``[B, H, W, C]`` up to the probabilities:
    ``softmax(q kᵀ · scale + decomposed relative positions)`` ``[B, heads, HW, HW]`` and the values
    ``[B, heads, H, W, d]`` (what Trident's modified SAM stores as ``last_attn`` / ``last_v``)."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    batch, height, width, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * heads, height * width, -1).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.use_rel_pos:
        logits = add_decomposed_rel_pos(logits, q, attn.rel_pos_h, attn.rel_pos_w, (height, width), (height, width))
    probs = logits.softmax(dim=-1)
    return probs.view(batch, heads, height * width, height * width), v.view(batch, heads, height, width, -1)


class SAMLastAttention(nn.Module):
    """SAM's image encoder read as ``SamPredictor.set_image`` + Trident's ``get_sam_feat``: a uint8 RGB image ->
    the last block's attention probabilities ``[1, heads, n, n]`` and values ``[1, heads, h, w, d]`` over the image's
    own tokens (``h, w``: the resized image's sides // 16; the padding's tokens are cut from both, rows and columns,
    the probabilities not renormalised)."""

    def __init__(self, config: VFMConfig):
        """The encoder loaded (:mod:`ovseg.models.vfm`, ``kind='sam'``)."""
        super().__init__()
        if config.kind != "sam":
            raise ValueError(f"Trident's guidance model must be a SAM image encoder (kind 'sam'), got {config.kind!r}")
        self.config = config
        self.encoder = VisionFoundationModel(config).model
        if self.encoder.blocks[-1].window_size != 0:
            raise ValueError("Trident reads SAM's last block as global attention: its last block is windowed "
                             "(global_attn_indexes must name the last block)")
        self.patch_size = int(self.encoder.patch_embed.proj.kernel_size[0])
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """``ResizeLongestSide.get_preprocess_shape``: the long side to the encoder's input, each side rounded."""
        from segment_anything.utils.transforms import ResizeLongestSide

        return ResizeLongestSide.get_preprocess_shape(height, width, self.encoder.img_size)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """``SamPredictor.set_image``: a uint8 RGB image -> the encoder's output ``[1,256,64,64]`` (``features``), its
        last block's input and the resized image's size (``input_size``)."""
        from segment_anything.utils.transforms import ResizeLongestSide

        resized = ResizeLongestSide(self.encoder.img_size).apply_image(image)
        height, width = resized.shape[:2]
        x = torch.as_tensor(resized, device=self.pixel_mean.device).permute(2, 0, 1).contiguous()[None]
        x = (x - self.pixel_mean) / self.pixel_std
        side = self.encoder.img_size
        x = F.pad(x, (0, side - width, 0, side - height))
        captured: dict[str, Tensor] = {}
        handle = self.encoder.blocks[-1].attn.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
        try:
            embedding = self.encoder(x.to(self.encoder.patch_embed.proj.weight.dtype))
        finally:
            handle.remove()
        return embedding, captured["x"], (height, width)

    @torch.no_grad()
    def forward(self, image: np.ndarray) -> tuple[Tensor, Tensor]:
        return self.read(image)[:2]

    @torch.no_grad()
    def read(self, image: np.ndarray) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """:meth:`forward`'s probabilities and values, with :meth:`embed`'s embedding and input size (the SAM
        refinement's prompts read the same encoder pass)."""
        embedding, last_input, (height, width) = self.embed(image)
        probs, values = last_block_attention(self.encoder.blocks[-1].attn, last_input)
        grid_h, grid_w = values.shape[2:4]
        rows, cols = height // self.patch_size, width // self.patch_size
        heads = probs.shape[1]
        probs = probs.view(1, heads, grid_h, grid_w, grid_h, grid_w)[:, :, :rows, :cols, :rows, :cols]
        return probs.flatten(2, 3).flatten(3, 4), values[:, :, :rows, :cols], embedding, (height, width)


#: SAM embeddings kept from the dense pass for the refinement (4 MiB each at ViT-B's 256x64x64 in float32)
MAX_CACHED_SAM_EMBEDDINGS = 64


# -- the method -------------------------------------------------------------------------------------------------
class Trident(PerDatasetSettings, ZeroShotCLIP):
    """Trident: CLIP windows with DINO proxy attention, spliced, aggregated with SAM's affinity; the ``trident``
    protocol (its mmseg pipeline)."""

    default_protocol = "trident"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(),
        vfm: VFMConfig = VFMConfig(kind="dino", name="vit_base_patch16_224.dino"),
        sam: VFMConfig = VFMConfig(kind="sam", name="vit_b", weights=None),
        beta: float = 1.2,
        gamma: float = 3.0,
        dataset_settings: dict[str, dict[str, Any]] | None = None,
        default_settings: dict[str, Any] | None = None,
        sam_refinement: bool = False,
        refinement: dict[str, Any] | None = None,
        **evaluation: Any,
    ):
        """A dense CLIP whose last block is ProxyCLIP's over DINO, its windows spliced and aggregated with SAM.

        Args:
            clip: the CLIP (an open_clip ViT; its ``last_block``/``residual``/``ffn`` are not read: Trident's last
                block replaces them).
            vfm: the proxy model (released: DINO ViT-B/16, ``torch.hub`` ``dino_vitb16`` = timm
                ``vit_base_patch16_224.dino``).
            sam: the guidance model, a SAM image encoder (released: ViT-B, ``sam_vit_b_01ec64.pth`` as ``weights``).
            beta: the proxy attention's mean scale (``base_config.py`` beta=1.2).
            gamma: the proxy attention's temperature (the segmentor's default 3.0).
            dataset_settings: per dataset, changes to :data:`DATASET_SETTINGS` (``cos_fac``, ``refine_neg_cos``,
                ``slide_stride``, ``slide_crop``, ``sam_halves``; a dataset not there starts from the defaults).
            default_settings: changes to the settings of any dataset without its own (``base_config.py``'s).
            sam_refinement: refine the label map with SAM's prompt encoder and mask decoder (``eval.py
                --sam_refine``; their weights from ``sam.weights``, the same checkpoint).
            refinement: changes to :class:`~ovseg.methods.sam_refinement.SamRefinementSettings` (``minimal_area``,
                ``sam_mask_coff``, ``sam_iou_thresh``; ``coarse_thresh`` is per dataset, :class:`TridentSettings`).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
        if self.encoder.kind != "vit":
            raise NotImplementedError(f"Trident needs an open_clip ViT, {clip.name!r} is {self.encoder.kind!r}")
        self.vfm = VisionFoundationModel(vfm)
        self.sam = SAMLastAttention(sam)
        self.prompting = sam_prompting(self.sam.encoder.img_size, sam.weights) if sam_refinement else None
        self.refinement = dataclasses.replace(SamRefinementSettings(), **(refinement or {}))
        self.beta, self.gamma = float(beta), float(gamma)
        self.settings = {name: dataclasses.replace(s, **(dataset_settings or {}).get(name, {}))
                         for name, s in DATASET_SETTINGS.items()}
        for name, changes in (dataset_settings or {}).items():
            if name not in self.settings:
                self.settings[name] = dataclasses.replace(DEFAULT_SETTINGS, **changes)
        self.default = dataclasses.replace(DEFAULT_SETTINGS, **(default_settings or {}))
        self.current = self.default
        self._originals: list[Tensor] | None = None
        # original image (by identity) -> (image, SAM embedding, input size) of the dense pass, for the refinement of
        # the same image: one SAM encoder pass per image instead of two (bounded: entries are popped when read)
        self._sam_embeddings: dict[int, tuple[Tensor, Tensor, tuple[int, int]]] = {}
        self._proxy: Tensor | None = None
        self.encoder.last_stage = self._last_stage

    def train(self, mode: bool = True):
        super().train(mode)
        self.vfm.eval()
        self.sam.eval()
        return self

    @property
    def weights_id(self) -> str:
        vfm, sam = self.vfm.config, self.sam.config
        return (f"{self.encoder.weights_id}+{vfm.kind}:{vfm.model_name}:{vfm.weights}"
                f"+sam:{sam.model_name}:{sam.weights}")

    @contextmanager
    def reading_originals(self, images: list[Tensor]) -> Iterator[None]:
        """The evaluator's images before its resize (``[3,H,W]`` in [0,1], in batch order): SAM reads them (the
        reference reads the image file again, ``get_trident_seg``'s ``img_path``)."""
        previous, self._originals = self._originals, list(images)
        try:
            yield
        finally:
            self._originals = previous

    @property
    def label_refinement(self) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        """The evaluator's hook after the label map (:func:`ovseg.eval.evaluator.label_refinement`): SAM refinement
        when on."""
        return self.refine_labels if self.prompting is not None else None

    @torch.no_grad()
    def refine_labels(self, labels: Tensor, probs: Tensor, original: Tensor) -> Tensor:
        """``postprocess_result``'s ``sam_refinement``: labels ``[H,W]`` and class probabilities ``[C,H,W]`` at the
        original image ``[3,H,W]``'s size -> refined labels; SAM reads the image as ``get_trident_seg``'s
        ``set_image`` (sides rounded up to CLIP's patch)."""
        sam_image = self.sam_image(original)
        cached = self._sam_embeddings.pop(id(original), None)
        if cached is not None and cached[0] is original:
            embedding, input_size = cached[1], cached[2]
        else:
            embedding, _, input_size = self.sam.embed(sam_image)
        settings = dataclasses.replace(self.refinement, coarse_thresh=self.current.coarse_thresh)
        return sam_refine_labels(labels, probs, self.prompting, embedding, input_size, sam_image.shape[:2],
                                 settings)[0]

    def sam_image(self, original: Tensor) -> np.ndarray:
        """get_trident_seg: the original image ``[3,H,W]``, sides rounded up to multiples of CLIP's patch (cv2
        INTER_LINEAR), as uint8 ``[H',W',3]``."""
        patch = self.encoder.patch_size
        return to_uint8_hwc(resize_image(original[None], (round_up(original.shape[-2], patch),
                                                           round_up(original.shape[-1], patch)), "cv2")[0])

    #: the image side does not depend on the words, but SAM reads the original image, which the feature cache's key
    #: (the resized batch) does not name
    reuses_features = False

    @torch.no_grad()
    def dense_logits(self, images: Tensor, text: Tensor) -> Tensor:
        originals = self._originals if self._originals is not None else list(images)
        if len(originals) != len(images):
            raise ValueError(f"{len(originals)} original images for a batch of {len(images)}")
        return torch.cat([cosine_logits(self.image_features(image[None], original), text)
                          for image, original in zip(images, originals)])

    @torch.no_grad()
    def image_features(self, image: Tensor, original: Tensor) -> Tensor:
        """One image: the protocol-resized ``[1,3,h,w]`` and the original ``[3,H,W]`` (both in [0,1]) -> dense
        features ``[1, D, h', w']`` on SAM's token grid (before L2 normalisation)."""
        s = self.current
        spliced = self.spliced_tokens(image)
        sam_image = self.sam_image(original)
        parts = np.split(sam_image, 2, axis=1) if s.sam_halves else [sam_image]
        columns = spliced.shape[-1] // 2
        pieces = [spliced[..., :columns], spliced[..., columns:]] if s.sam_halves else [spliced]
        out = []
        for part, piece in zip(parts, pieces):
            probs, values, embedding, input_size = self.sam.read(part)
            if self.prompting is not None and not s.sam_halves:  # the refinement reads the whole image's pass
                if len(self._sam_embeddings) >= MAX_CACHED_SAM_EMBEDDINGS:
                    self._sam_embeddings.pop(next(iter(self._sam_embeddings)))
                self._sam_embeddings[id(original)] = (original, embedding, input_size)
            weights = sam_affinity(values, probs, s.cos_fac, s.refine_neg_cos)
            grid = tuple(values.shape[2:4])
            piece = F.interpolate(piece, size=grid, mode="bilinear", align_corners=False)
            mixed = weights.to(piece.dtype) @ piece.flatten(2).transpose(1, 2)  # [1, n, C]
            out.append(mixed.view(1, *grid, -1))
        tokens = torch.cat(out, dim=2)  # halves side by side
        visual = self.encoder.model.visual
        features = visual.ln_post(tokens) @ visual.proj
        return features.permute(0, 3, 1, 2)

    def spliced_tokens(self, image: Tensor) -> Tensor:
        """The windows' proxy-attention tokens (before ``ln_post``) spliced over the image ``[1, C, H', W']``
        (CLIP's grid of :func:`clip_input_size`, times :func:`window_grid`'s ratio)."""
        s, patch = self.current, self.encoder.patch_size
        height, width = clip_input_size(*image.shape[-2:], patch, s.slide_crop)
        if (height, width) != tuple(image.shape[-2:]):
            image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
        boxes = slide_windows(height, width, s.slide_crop, s.slide_stride)
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
        self._proxy = self.vfm(self.dino_images(crops))
        vfm_grid = tuple(self._proxy.shape[-2:])
        try:
            tokens = self.encoder.encode_tokens(self.encoder.normalize(crops), project=False)  # [B, N_vfm, C]
        finally:
            self._proxy = None
        clip_grid = self.encoder.token_grid(*crops.shape[-2:])
        maps = tokens.transpose(1, 2).reshape(len(crops), -1, *vfm_grid)
        ratio, size = window_grid(vfm_grid, clip_grid)
        if size is not None:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        grid_boxes = [(y1 // patch * ratio, y2 // patch * ratio, x1 // patch * ratio, x2 // patch * ratio)
                      for y1, y2, x1, x2 in boxes]
        return splice_windows(maps, grid_boxes, (height // patch * ratio, width // patch * ratio))

    def dino_images(self, images: Tensor) -> Tensor:
        """The [0, 1] windows as the reference hands them to DINO: normalised with its data preprocessor's constants
        (:data:`SEG_PREPROCESSOR_MEAN`), un-normalised with the CLIP's mean/std (``myutils.UnNormalize``); the VFM
        then normalises with ImageNet's. Under a protocol that normalises CLIP's input otherwise, the images
        themselves."""
        if self.encoder.options.normalization != "model":
            return images
        mean = images.new_tensor(SEG_PREPROCESSOR_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(SEG_PREPROCESSOR_STD).view(1, 3, 1, 1)
        return (images * 255 - mean) / std * self.encoder.std + self.encoder.mean

    def _last_stage(self, hidden: list[Tensor], last: TransformerBlockView, grid: tuple[int, int]) -> Tensor:
        """``custom_attn``: the last block's values mixed by the windows' DINO similarities (one mean over all of the
        image's windows), through ``out_proj``; no class token, no residual, no MLP -> ``[B, H·W, C]`` on the VFM's
        grid."""
        if self._proxy is None:
            raise RuntimeError("Trident's last block needs the proxy model's features: call dense_logits")
        return proxy_last_block(hidden[-1], last, grid, self._proxy.to(hidden[-1].dtype), self.beta, self.gamma,
                                mean_over_batch=True)
