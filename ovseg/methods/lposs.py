"""LPOSS and LPOSS+ (Stojnic, Kalantidis, Tolias, "LPOSS: Label Propagation Over Patches and Pixels for
Open-vocabulary Semantic Segmentation", CVPR 2025), as its released code computes them (github.com/vladan-stojnic/
LPOSS: ``models/lposs/lposs.py`` ``LPOSS``, ``models/maskclip/maskclip.py`` ``MaskClip``, ``segmentation/evaluation/
lposs_eval.py`` ``LPOSS_Infrencer.slide_inference``, ``configs/lposs.yaml`` / ``lposs_plus.yaml``):

1. The protocol-resized image (``lposs`` protocol: short side 448, [0, 1], no normalisation in the pipeline) is cut
   into ``window``×``window`` windows on mmseg's slide grid (224, stride 112), all read at once.
2. Per window: MaskCLIP features of open_clip ViT-B/16 (laion2b_s34b_b88k; ``MaskClip.extract_feat``: the last
   block's value path ``out_proj(v)`` with the token residual and the MLP, ``ln_post``, the projection:
   ``CLIPConfig(last_block="value")``), and DINO ViT-B/16's last-block attention values (``extract_feats('v')``:
   :class:`~ovseg.models.vfm.VFMConfig` ``features="v"``), both L2-normalised; the CLIP grid resized bilinearly to
   DINO's where they differ. Each patch's initial scores are the cosine similarities with the class embeddings.
3. LPOSS: one graph over the patches of **all** windows (:func:`~ovseg.models.label_propagation.patch_graph`: DINO
   kNN, ``k`` = 400, similarities ``^gamma`` (3) times ``exp(-sigma · distance)`` of the patch centres in the
   resized image, sigma = 0.01), label propagation ``(I - alpha·Wn) X = Y`` (alpha 0.95) by 10 conjugate-gradient
   steps per class (:func:`~ovseg.models.label_propagation.propagate_labels`).
4. Each window's propagated scores bilinear to the window, summed over windows and divided by the window count.
5. LPOSS+ (``pixel_refine``): a second propagation over the pixels of the resized image, each joined to its 13×13
   neighbourhood by ``exp(-‖Lab_p - Lab_q‖ / tau)`` (tau 0.01; :func:`~ovseg.models.label_propagation.
   pixel_graph`), started from step 4's scores.

The scores (per query: a background synonym is a query of its own, the evaluator takes the class maximum) are
returned at the resized image's size; the protocol upsamples them to the label size.

Departures: the reference takes the maximum over background synonyms before its last bilinear resize to the label
size, ovseg's evaluator after it (pixels where two background synonyms swap within one interpolation stencil may
differ; measured by ``ovseg parity``). A window whose sides are not multiples of 16 (only an image smaller than the
window) drops the remainder rows/columns where the reference pads zeros; ``k`` larger than the number of patches is
clipped to it (the reference then fails). Batches hold several images, each its own graph. The reference runs
faiss / cupy on a GPU; ovseg's kNN is exact (ties in similarity may order differently than faiss at the k-th
neighbour) and its solver runs on the images' device, in float64 as the reference's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.eval.inference import slide_windows
from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.models.clip import CLIPConfig
from ovseg.models.label_propagation import (
    normalized_edge_weights,
    patch_graph,
    pixel_graph,
    propagate_labels,
    sparse_matvec,
)
from ovseg.models.vfm import VFMConfig, VisionFoundationModel

__all__ = ["LPOSS", "window_patch_centres"]

#: configs/maskclip.yaml: open_clip ViT-B-16, laion2b_s34b_b88k
LPOSS_CLIP = CLIPConfig(name="ViT-B-16", pretrained="laion2b_s34b_b88k", last_block="value")
#: models/lposs/lposs.py: torch.hub dino_vitb16, enc_type_feats "v" (configs/lposs*.yaml)
LPOSS_DINO = VFMConfig(kind="dino", name="vit_base_patch16_224.dino", features="v")
#: memory cap of one CG batch of columns (float64 vectors, about five alive at once)
CG_CHUNK_BYTES = 1 << 30


def window_patch_centres(windows: list[tuple[int, int, int, int]], grid: tuple[int, int], patch: int,
                         device: torch.device | str = "cpu") -> Tensor:
    """``get_lposs_laplacian``'s patch locations: for each window (y1, y2, x1, x2) and each patch (i, j) of its
    ``grid`` (row-major, windows in order), ``(y1 + patch//2 + i·patch, x1 + patch//2 + j·patch)``, float32 [N, 2]."""
    rows = torch.arange(grid[0], device=device).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], device=device).repeat(grid[0])
    centres = [torch.stack([y1 + patch // 2 + rows * patch, x1 + patch // 2 + cols * patch], 1)
               for y1, _, x1, _ in windows]
    return torch.cat(centres).float()


class LPOSS(ZeroShotCLIP):
    """LPOSS / LPOSS+: MaskCLIP scores propagated over a DINO kNN graph of the windows' patches, then (LPOSS+) over
    the image's pixels (see the module docstring); the ``lposs`` protocol (whole resized image: the windows are the
    method's, all of them in one graph)."""

    default_protocol = "lposs"
    reuses_features = False

    def __init__(
        self,
        clip: CLIPConfig = LPOSS_CLIP,
        vfm: VFMConfig = LPOSS_DINO,
        window: int = 224,
        stride: int = 112,
        k: int = 400,
        gamma: float = 3.0,
        sigma: float = 0.01,
        distance_power: float = 1.0,
        alpha: float = 0.95,
        pixel_refine: bool = False,
        tau: float = 0.01,
        pixel_window: int = 13,
        cg_tol: float = 1e-6,
        cg_maxiter: int = 10,
        window_batch_size: int = 16,
        **evaluation: Any,
    ):
        """LPOSS (``pixel_refine=False``, ``configs/lposs.yaml``) or LPOSS+ (``pixel_refine=True``,
        ``configs/lposs_plus.yaml``).

        Args:
            clip: the CLIP (MaskCLIP features: ``last_block="value"``, token residual, MLP kept).
            vfm: the VFM whose features make the kNN graph (DINO ViT-B/16's last-block attention values).
            window: the windows' side (the datasets' ``test_cfg``: crop 224).
            stride: the slide grid's step (``stride=(112, 112)``).
            k: neighbours per patch (``k: 400``).
            gamma: power of the clipped similarities (``gamma: 3.0``).
            sigma: geometric affinity ``exp(-sigma · distance^distance_power)`` of patch centres in pixels
                (``sigma: 0.01``).
            distance_power: the distance's power there (``pix_dist_pow: 1.0``).
            alpha: propagation strength (``alpha: 0.95``), both propagations.
            pixel_refine: LPOSS+ (``pixel_refine``).
            tau: the pixel affinity's temperature (``tau: 0.01``).
            pixel_window: the pixel neighbourhood's side (``r: 13``, radius ``r // 2``).
            cg_tol: the conjugate-gradient solver's relative tolerance (``dfs_search(tol=1e-6)``).
            cg_maxiter: its step limit (``dfs_search(maxiter=10)``).
            window_batch_size: windows through CLIP and DINO at once (memory only).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
        if self.encoder.kind not in ("vit", "hf_vit"):
            raise ValueError(f"LPOSS needs a ViT image tower (MaskCLIP features), {clip.name!r} is "
                             f"{self.encoder.kind!r}")
        if window < 1 or stride < 1 or k < 1 or pixel_window < 1 or cg_maxiter < 1:
            raise ValueError("LPOSS: window, stride, k, pixel_window and cg_maxiter must be positive")
        self.vfm = VisionFoundationModel(vfm)
        self.vfm.requires_grad_(False)
        self.vfm.eval()
        self.window, self.stride, self.k = int(window), int(stride), int(k)
        self.gamma, self.sigma, self.distance_power, self.alpha = float(gamma), float(sigma), float(distance_power), \
            float(alpha)
        self.pixel_refine, self.tau, self.pixel_radius = bool(pixel_refine), float(tau), int(pixel_window) // 2
        self.cg_tol, self.cg_maxiter = float(cg_tol), int(cg_maxiter)
        self.window_batch_size = int(window_batch_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vfm.eval()
        return self

    @property
    def weights_id(self) -> str:
        vfm = self.vfm.config
        return f"{self.encoder.weights_id}+{vfm.kind}:{vfm.model_name}:{vfm.weights}:{vfm.features}"

    @torch.no_grad()
    def window_features(self, crops: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Windows [n, 3, h, w] in [0, 1] -> (DINO features [N, C], CLIP features [N, D], DINO's grid): N = n·gh·gw
        patches, row-major per window, on DINO's grid, L2-normalised as ``LPOSS.forward`` and ``slide_inference``
        normalise them (each twice)."""
        dino, clip = [], []
        for start in range(0, len(crops), self.window_batch_size):
            batch = crops[start:start + self.window_batch_size]
            d = self.vfm(batch).float()
            c = self.encoder.encode_dense(self.encoder.normalize(batch)).float()
            d = d / d.norm(dim=1, keepdim=True)  # get_dino_features
            d = F.normalize(d.flatten(2).transpose(1, 2), dim=-1).unflatten(1, d.shape[-2:])
            c = F.normalize(c.flatten(2).transpose(1, 2), dim=-1).unflatten(1, c.shape[-2:])
            if c.shape[1:3] != d.shape[1:3]:
                c = F.interpolate(c.permute(0, 3, 1, 2), size=d.shape[1:3], mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            dino.append(d)
            clip.append(c)
        grid = tuple(dino[0].shape[1:3])
        return (F.normalize(torch.cat(dino).flatten(0, 2), dim=-1), F.normalize(torch.cat(clip).flatten(0, 2), dim=-1),
                grid)

    @torch.no_grad()
    def patch_propagation(self, dino: Tensor, scores: Tensor, positions: Tensor) -> Tensor:
        """LPOSS's propagation over the patch graph: initial scores [N, Q] -> propagated [N, Q] (float64)."""
        graph = patch_graph(dino, positions, self.k, self.gamma, self.sigma, self.distance_power)
        matvec = sparse_matvec(graph, normalized_edge_weights(graph, self.alpha))
        return propagate_labels(matvec, scores, self.cg_tol, self.cg_maxiter, self._column_chunk(scores.shape[0]))

    @torch.no_grad()
    def pixel_propagation(self, image01: Tensor, scores: Tensor) -> Tensor:
        """LPOSS+: scores [Q, H, W] of the resized image [3, H, W] propagated over its pixel graph (float64)."""
        q, h, w = scores.shape
        graph = pixel_graph(image01.float(), self.pixel_radius, self.tau).normalized(self.alpha)
        flat = scores.permute(1, 2, 0).reshape(h * w, q)
        out = propagate_labels(graph.matvec, flat, self.cg_tol, self.cg_maxiter, self._column_chunk(h * w))
        return out.reshape(h, w, q).permute(2, 0, 1)

    @staticmethod
    def _column_chunk(rows: int) -> int:
        return max(1, CG_CHUNK_BYTES // (5 * 8 * rows))

    @torch.no_grad()
    def segment(self, image01: Tensor, text: Tensor) -> Tensor:
        """One resized image [3, H, W] in [0, 1] -> query scores [Q, H, W] (``slide_inference``)."""
        _, height, width = image01.shape
        windows = slide_windows(height, width, self.window, self.stride)
        crops = torch.stack([image01[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
        dino, clip, grid = self.window_features(crops)
        scores = clip @ F.normalize(text.float(), dim=-1).T
        positions = window_patch_centres(windows, grid, self.vfm.patch_size, dino.device)
        propagated = self.patch_propagation(dino, scores, positions)
        # resize and overlap the window predictions: a float32 sum of the float64 window scores, as the reference's
        # ``preds += F.pad(crop_seg_logit, ...)``
        total = image01.new_zeros((text.shape[0], height, width), dtype=torch.float32)
        count = image01.new_zeros((1, height, width), dtype=torch.float32)
        per_window = propagated.reshape(len(windows), *grid, -1).permute(0, 3, 1, 2)
        for (y1, y2, x1, x2), window_scores in zip(windows, per_window):
            total[:, y1:y2, x1:x2] += F.interpolate(window_scores[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                    align_corners=False)[0]
            count[:, y1:y2, x1:x2] += 1
        scores = total / count
        if self.pixel_refine:
            return self.pixel_propagation(image01, scores)
        return scores

    @torch.no_grad()
    def dense_logits(self, images: Tensor, text: Tensor) -> Tensor:
        """Resized images [B, 3, H, W] in [0, 1] -> query scores [B, Q, H, W] (float32), each image its own graph."""
        return torch.stack([self.segment(image, text).float() for image in images])
