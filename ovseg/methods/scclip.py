"""SC-CLIP (Bai et al., "Self-Calibrated CLIP for Training-Free Open-Vocabulary Segmentation", arXiv 2411.15869):
CLIP's last block is replaced by a self-calibration that reads the earlier blocks' outputs (the released
``clip/model.py`` ``VisionTransformer.forward`` of github.com/SuleBai/SC-CLIP):

1. **anomaly tokens**: the penultimate block's patch tokens with the highest local outlier factor (:func:`lof_scores`,
   top 5 %) are replaced by the mean of their non-anomalous 8-neighbours (:func:`resolve_anomalies`), in that output
   and in the intermediate block ``pre_adjust_idx`` whose token similarities guide the rest;
2. **self-adjusting**: the patch tokens are averaged over their intermediate-feature neighbours (cosine ≥ ``beta``,
   :func:`aggregate`), then the last block's attention mixes them with (softmax(intermediate similarity) +
   softmax(k kᵀ s)) / 2 (:func:`calibrated_attention`), without the block's residual and MLP, plus ``res_cls`` times
   the class token; the result is averaged again over the shallow block ``post_adjust_idx``'s neighbours;
3. **multi-level fusion**: the sum of blocks ``multi_start_idx … multi_end_idx - 1`` goes through the same attention
   and aggregation and is added.

The class token itself is not an output of SC-CLIP (its forward returns patch tokens only); the class slot of
``encode_tokens`` holds the penultimate block's class token through ``ln_post`` and the projection.

Where the reference only runs one square window at a time, ovseg is written for any batch and grid, and equals it
on one square window: the anomaly positions are row-major on any grid (the reference's ``index // feat_w`` with
``feat_w`` the number of rows is row-major on square grids only; its windows are always 224×224 squares), and the
centring of the intermediate similarity (``(s - mean(s)) * 3``) uses each image's own mean (the reference's mean
runs over the whole batch, which is one image there).

Its evaluation pipeline is SCLIP's mmseg code with SC-CLIP's own logit scales, thresholds and COCO-Stuff size: the
``scclip`` protocol. This module is the whole method (plus its configs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.models.attention import AttentionTokens
from ovseg.models.clip import CLIPConfig, TransformerBlockView, _merge_heads

#: the pairwise squared distances of :func:`lof_scores` are computed in row blocks of at most this many bytes of
#: differences (a 2048-wide whole image has 8192 tokens: 8192² × 768 floats at once would be 200 GB)
DISTANCE_BLOCK_BYTES = 256 * 2**20
#: the temperature on the centred intermediate similarity (clip/model.py custom_attn: ``* 3.0``)
SIMILARITY_SHARPNESS = 3.0
#: clip/model.py adaptively_aggregate: ``corrs / (corrs.sum(dim=-1, keepdim=True) + 1e-6)``
AGGREGATION_EPS = 1e-6


def lof_scores(x: Tensor, n_neighbors: int = 30) -> Tensor:
    """Local outlier factors of the tokens ``x`` [B, N, C] (per image) as SC-CLIP computes them (``lof_pytorch``):
    squared Euclidean distances, the ``n_neighbors`` nearest other tokens, and a reachability distance that is the
    token's **own** k-distance (``max(d(i, j), k-dist(i))``, not k-dist(j) as in Breunig et al.), so the score is
    the mean over the neighbours j of k-dist(i) / k-dist(j). Fewer than ``n_neighbors + 1`` tokens: every other
    token is a neighbour (the reference needs ``n_neighbors + 1``). Returns [B, N]."""
    batch, tokens, channels = x.shape
    k = min(n_neighbors, tokens - 1)
    if k < 1:
        raise ValueError(f"local outlier factors need at least 2 tokens, got {tokens}")
    rows = max(1, DISTANCE_BLOCK_BYTES // (tokens * channels * x.element_size()))
    scores = []
    for image in x:
        # the reference's expression, row block by row block (each distance computed the same way)
        distances = torch.cat([torch.norm(image[r0:r0 + rows, None] - image[None], dim=2, p=2) ** 2
                               for r0 in range(0, tokens, rows)])
        knn_distances, knn_indices = torch.topk(distances, k=k + 1, largest=False)
        knn_distances, knn_indices = knn_distances[:, 1:], knn_indices[:, 1:]  # the first is the token itself
        k_distances = knn_distances[:, -1:].expand_as(knn_distances)
        reach_distances = torch.max(knn_distances, k_distances)
        density = k / torch.nan_to_num(reach_distances.mean(dim=1), nan=1e-6)
        scores.append((density[knn_indices] / density[:, None]).mean(dim=1))
    return torch.stack(scores)


def anomaly_tokens(x: Tensor, n_neighbors: int = 30, contamination: float = 0.05) -> Tensor:
    """Boolean [B, N]: tokens whose :func:`lof_scores` exceed their image's ``1 - contamination`` quantile
    (``torch.quantile``, linear interpolation, in float32 as the reference)."""
    scores = lof_scores(x, n_neighbors)
    threshold = torch.quantile(scores.float(), 1 - contamination, dim=1, keepdim=True)
    return scores > threshold


def resolve_anomalies(patches: Tensor, anomalous: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patch tokens [B, N, C] (row-major over ``grid``) with each anomalous token (``anomalous`` [B, N]) replaced by
    the mean of its 8-neighbours that are not anomalous; one without such a neighbour is kept (clip/model.py
    ``mean_interpolation``). A new tensor."""
    batch, _, channels = patches.shape
    rows, cols = grid
    feature_map = patches.transpose(1, 2).reshape(batch, channels, rows, cols)
    anomalous = anomalous.reshape(batch, 1, rows, cols).to(feature_map.dtype)
    keep = 1 - anomalous
    kernel = torch.ones(channels, 1, 3, 3, dtype=feature_map.dtype, device=feature_map.device)
    kernel[:, 0, 1, 1] = 0
    neighbour_sum = F.conv2d(F.pad(feature_map * keep, (1, 1, 1, 1)), kernel, groups=channels)
    neighbour_count = F.conv2d(F.pad(keep, (1, 1, 1, 1)), kernel[:1])
    update = anomalous * (neighbour_count > 0).to(feature_map.dtype)
    neighbour_mean = neighbour_sum / neighbour_count.clamp(min=1)
    resolved = feature_map * (1 - update) + neighbour_mean * update
    return resolved.reshape(batch, channels, rows * cols).transpose(1, 2)


def cosine_similarity_matrix(tokens: Tensor) -> Tensor:
    """[B, N, C] -> [B, N, N] cosine similarities (each token divided by its norm, as the reference)."""
    tokens = tokens / tokens.norm(dim=-1, keepdim=True)
    return tokens @ tokens.transpose(1, 2)


def aggregate(tokens: Tensor, similarity: Tensor, beta: float) -> Tensor:
    """Each token [B, N, C] replaced by the average of all tokens weighted by ``similarity`` [B, N, N] where it is at
    least ``beta`` (0 elsewhere), the weights normalised per row (clip/model.py ``adaptively_aggregate``)."""
    weights = similarity.masked_fill(similarity < beta, 0.0)
    return (weights / (weights.sum(dim=-1, keepdim=True) + AGGREGATION_EPS)) @ tokens


def calibrated_attention(tokens: AttentionTokens, similarity: Tensor) -> Tensor:
    """clip/model.py ``custom_attn``: (softmax(S) + softmax(k kᵀ s)) / 2 applied to the values, with S the
    intermediate similarity [B, N, N] centred on its image's mean, times 3, and -inf where that is negative (the
    same for every head). Returns the attended values [B, heads, N, head_dim]."""
    centred = (similarity - similarity.mean(dim=(1, 2), keepdim=True)) * SIMILARITY_SHARPNESS
    centred = centred.masked_fill(centred < 0, float("-inf"))
    k = tokens.k
    weights = F.softmax(centred, dim=-1)[:, None] + F.softmax(k @ k.transpose(-1, -2) * tokens.scale, dim=-1)
    return (weights / 2) @ tokens.v


@dataclass
class SelfCalibration:
    """SC-CLIP's self-calibrated last stage (a :data:`~ovseg.models.clip.LastStage`). Block indices count from 0
    (block ``i``'s output); the defaults are the released ViT-B/16 settings (``configs/base_config.py``,
    ``clip/model.py``).

    Args:
        pre_adjust_idx: the intermediate block whose (anomaly-resolved) token similarities guide the first
            aggregation and the attention.
        post_adjust_idx: the shallow block whose token similarities guide the aggregation after the attention.
        multi_start_idx: the first block of the multi-level fusion.
        multi_end_idx: one past the last block of the multi-level fusion.
        res_cls: weight of the class token added to the attention output.
        beta: similarities below it do not take part in an aggregation (clip/model.py ``self.beta``).
        n_neighbors: neighbours of the local outlier factor (``lof_pytorch``).
        contamination: share of tokens treated as anomalies (``lof_pytorch``).
    """

    pre_adjust_idx: int = 8
    post_adjust_idx: int = 3
    multi_start_idx: int = 3
    multi_end_idx: int = 10
    res_cls: float = 0.3
    beta: float = 0.4
    n_neighbors: int = 30
    contamination: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.multi_start_idx < self.multi_end_idx:
            raise ValueError(f"SC-CLIP needs 0 <= multi_start_idx < multi_end_idx, got {self.multi_start_idx}, "
                             f"{self.multi_end_idx}")
        if min(self.pre_adjust_idx, self.post_adjust_idx) < 0 or self.n_neighbors < 1:
            raise ValueError("SC-CLIP block indices must be >= 0 and n_neighbors >= 1")
        if not 0 < self.contamination < 1:
            raise ValueError(f"SC-CLIP contamination must be in (0, 1), got {self.contamination}")

    def check_depth(self, blocks: int) -> None:
        """Every index must name one of the ``blocks - 1`` blocks before the last."""
        largest = max(self.pre_adjust_idx, self.post_adjust_idx, self.multi_end_idx - 1)
        if largest > blocks - 2:
            raise ValueError(f"SC-CLIP block indices (pre_adjust_idx={self.pre_adjust_idx}, post_adjust_idx="
                             f"{self.post_adjust_idx}, multi_end_idx={self.multi_end_idx}) need blocks 0..{largest} "
                             f"before the last; this ViT has {blocks} blocks (0..{blocks - 2} before the last)")

    def _attend(self, tokens: Tensor, cls: Tensor, last: TransformerBlockView, similarity: Tensor,
                grid: tuple[int, int]) -> Tensor:
        """The last block's calibrated attention on patch tokens [B, N, C] (no residual, no MLP) + res_cls·cls."""
        attended = calibrated_attention(AttentionTokens(last.ln_1(tokens), last, grid), similarity)
        return last.out_proj(_merge_heads(attended)) + self.res_cls * cls

    def __call__(self, hidden: list[Tensor], last: TransformerBlockView, grid: tuple[int, int]) -> Tensor:
        self.check_depth(len(hidden) + 1)
        penultimate = hidden[-1]
        cls = penultimate[:, :1]
        anomalous = anomaly_tokens(penultimate[:, 1:], self.n_neighbors, self.contamination)
        patches = resolve_anomalies(penultimate[:, 1:], anomalous, grid)
        deep_similarity = cosine_similarity_matrix(resolve_anomalies(hidden[self.pre_adjust_idx][:, 1:], anomalous,
                                                                     grid))
        shallow_similarity = cosine_similarity_matrix(hidden[self.post_adjust_idx][:, 1:])

        x = aggregate(patches, deep_similarity, self.beta)
        x = aggregate(self._attend(x, cls, last, deep_similarity, grid), shallow_similarity, self.beta)
        fused = hidden[self.multi_start_idx]
        for block_output in hidden[self.multi_start_idx + 1:self.multi_end_idx]:  # summed in the reference's order
            fused = fused + block_output
        fused = self._attend(fused[:, 1:], fused[:, :1], last, deep_similarity, grid)
        x = x + aggregate(fused, shallow_similarity, self.beta)
        return torch.cat([cls, x], dim=1)


class SCCLIP(ZeroShotCLIP):
    """SC-CLIP: CLIP's last block replaced by :class:`SelfCalibration` (anomaly tokens resolved, intermediate-feature
    aggregation and attention, multi-level fusion); the ``scclip`` protocol."""

    default_protocol = "scclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(),
        calibration: SelfCalibration = SelfCalibration(),
        **evaluation: Any,
    ):
        """A dense CLIP, SC-CLIP's self-calibrated last stage.

        Args:
            clip: the CLIP (a ViT; its ``last_block``, ``residual`` and ``ffn`` are not used: the self-calibration
                replaces the last block).
            calibration: the self-calibration's block indices and constants (default: the released ViT-B/16 ones).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
        if self.encoder.kind not in ("vit", "hf_vit"):
            raise ValueError(f"SC-CLIP needs a ViT image tower, {clip.name!r} is {self.encoder.kind!r}")
        visual = self.encoder.model.visual if self.encoder.kind == "vit" else self.encoder.model.vision_model
        blocks = visual.transformer.resblocks if self.encoder.kind == "vit" else visual.encoder.layers
        calibration.check_depth(len(blocks))
        self.calibration = calibration
        self.encoder.last_stage = calibration
