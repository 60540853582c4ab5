"""CLIPtrase (Shao et al., "Explore the Potential of CLIP for Training-Free Open Vocabulary Semantic Segmentation",
ECCV 2024, arXiv 2407.08268), as its released code computes it (github.com/leaves162/CLIPtrase at 2b7de61).

The checkout holds two pipelines. The README's table (CLIP ViT-B/16, resolutions 224 and 336, nine datasets) is
``clip_self_correlation.py`` ``self_clip`` (``self_clip_test``: ``image_size=224, eps=0.7, min=3`` and
``image_size=336, eps=1.1, min=7``) on its CLIP fork ``clip_utils/`` (``model.py`` ``VisionTransformer.forward``,
``attn2.py`` ``multi_head_attention_forward``); the detectron2 variant ``cliptrase_d2/`` (640 short side, padded to
640 multiples, half-resolution CLIP input, cluster *logit averaging* instead of voting) is, in the README's words,
"slightly different from those in the paper due to differences in preprocessing and resolution". ovseg follows
``clip_self_correlation.py``:

1. **Recalibrated self-correlation** in the last block (``idx==12``, ``self_qk_weight=True``): its attention
   probabilities are softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s) (summed;
   :func:`ovseg.models.attention.qq_kk_vv_attention`, ``clip.last_block: qq_kk_vv``). The block keeps its token
   residual and its MLP (``ResidualAttentionBlock.forward`` is unchanged), then ``ln_post`` and the projection.
2. **Patch clustering**: the block before it (``idx==11``, ``self_out_weight=True``) runs as trained but reports
   the head-mean of (cos(q, q) + cos(k, k) + cos(v, v)) / 3 over its tokens (:func:`self_correlation`, read at the
   block's ``ln_1`` input). Each patch's row minus the class token's row, clipped at 0 (:func:`patch_affinity`: the
   "global patch" removal), is a point for DBSCAN (euclidean, ``eps``/``min_samples``; :func:`dbscan`).
   Each cluster's map is the mean row of its members on the patch grid, bilinearly upsampled x4, median-filtered
   (7x7, scipy), bilinearly resized to the label map; every pixel takes its highest cluster
   (:func:`cluster_maps`, :func:`cluster_index`).
3. **Voting**: every pixel of a cluster takes the cluster's most frequent predicted class (:func:`vote_labels`).
   The class predictions are the argmax of cosine(patch, text) upsampled bilinearly; on VOC20 (``dataset ==
   'VOC20'``) each class's patch score is multiplied by the class token's score for it
   (:data:`CLASS_TOKEN_DATASETS`).

Where ovseg departs: ``self_clip`` runs one image at a time; ovseg clusters each image of a batch. The reference's
``sklearn.cluster.DBSCAN`` is :func:`dbscan` here (the same labels: core points by ``eps``-neighbourhoods including
the point itself, clusters numbered by their first core point, a border point in the lowest-numbered cluster that
reaches it; scikit-learn is not an ovseg dependency). The vote's tie break is the reference's: the smallest class id
of ITS order, where the background (its queries after the ``C`` foreground classes) comes last; ovseg's datasets put
the background at id 0, so :func:`vote_labels` ranks it last. Their ``idx==11``/``idx==12`` are hard-wired block
numbers (ViT-B/16's last two); ovseg takes the last block and :attr:`CLIPtrase.correlation_block` (default the one
before it) for any depth.

Evaluation pipeline: ``self_clip`` resizes the short side to ``image_size`` (torchvision ``Resize``, PIL bicubic),
centre-crops a square of that side, and scores that crop against the ground truth resized (nearest) and cropped the
same way: the ``cliptrase`` protocol. With background (VOC21, Context60, COCO-Object) the reference counts the ground
truth's ignore pixels (255) as background, a scoring rule of its own that ovseg's datasets do not follow (ignored
stays ignored); its ``COCO80_val`` reads the 171-class COCO-Stuff maps, so its "COCO-Object" scores the first stuff
class as background and ignores the other stuff classes. Checked by ``ovseg parity --ref CLIPtrase=DIR``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.methods.base import cosine_logits
from ovseg.methods.zeroshot import ZeroShotCLIP
from ovseg.models.attention import AttentionTokens
from ovseg.models.clip import CLIPConfig, TransformerBlockView, dense_last_block

#: clip_self_correlation.py self_clip_test: ``self_clip(..., image_size=224, eps=0.7, min=3)`` (and 336: 1.1, 7)
DBSCAN_EPS = 0.7
DBSCAN_MIN_SAMPLES = 3
#: the 336 run of self_clip_test (``configs/eval/cliptrase_vitb16_336.yaml``)
DBSCAN_336 = (1.1, 7)
#: self_clip: ``ratio = 4``: cluster maps upsampled x4, then ``median_filter(size=ratio*2-1)``
SMOOTHING_RATIO = 4
#: self_clip: ``if dataset=='VOC20'``: patch scores times the class token's scores (ovseg dataset names)
CLASS_TOKEN_DATASETS = ("voc20",)
#: rows of the pairwise distances computed at once (a whole 2048x1024 image at 224 short side is still small, but a
#: protocol without the crop may give thousands of patches)
DISTANCE_BLOCK_ROWS = 1024


def self_correlation(tokens: AttentionTokens) -> Tensor:
    """The token self-correlation CLIPtrase reads from a block (``attn2.py``, ``self_out_weight``): per head the
    mean of the cosine similarities of the queries, of the keys and of the values, averaged over heads,
    ``[B, 1+N, 1+N]``."""
    maps = sum(F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).transpose(-1, -2)
               for x in (tokens.q, tokens.k, tokens.v)) / 3.0
    return maps.mean(dim=1)


def patch_affinity(correlation: Tensor) -> Tensor:
    """Each patch's correlation row minus the class token's row, clipped at 0 (``self_clip``: "global patch
    denoise"): ``[B, 1+N, 1+N]`` -> ``[B, N, N]``."""
    return (correlation[:, 1:, 1:] - correlation[:, :1, 1:]).clamp_min(0)


def dbscan(points: Tensor, eps: float, min_samples: int) -> Tensor:
    """scikit-learn's ``DBSCAN(eps, min_samples).fit_predict`` (euclidean) on ``points`` ``[N, D]`` -> labels
    ``[N]`` (long, -1 noise): neighbours within ``eps`` (inclusive, the point itself included), core points with at
    least ``min_samples`` of them, clusters = connected core points numbered in the order of their first core point
    (``dbscan_inner``'s scan), a border point in the lowest-numbered cluster among its core neighbours."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    x = points.double()
    n = x.shape[0]
    squared = (x * x).sum(dim=1)
    near = torch.cat([(squared[r:r + DISTANCE_BLOCK_ROWS, None] + squared[None]
                       - 2 * x[r:r + DISTANCE_BLOCK_ROWS] @ x.T).clamp_min(0) <= eps * eps
                      for r in range(0, n, DISTANCE_BLOCK_ROWS)]).cpu()
    labels = torch.full((n,), -1, dtype=torch.long)
    core = near.sum(dim=1) >= min_samples
    if not core.any():
        return labels.to(points.device)
    core_index = core.nonzero()[:, 0]
    graph = near[core_index][:, core_index].numpy()
    _, component = connected_components(csr_matrix(graph), directed=False)
    component = torch.from_numpy(component).long()
    # number the components by their first (lowest-index) core point, as dbscan_inner scans i = 0, 1, ...
    first = torch.full((int(component.max()) + 1,), n, dtype=torch.long).scatter_reduce(
        0, component, core_index, reduce="amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(first.numel())
    labels[core_index] = rank[component]
    # border points: the lowest cluster number among their core neighbours
    border = (~core) & near[:, core_index].any(dim=1)
    if border.any():
        numbered = torch.where(near[border][:, core_index], rank[component][None], torch.tensor(n))
        labels[border] = numbered.min(dim=1).values
    return labels.to(points.device)


def cluster_maps(affinity: Tensor, labels: Tensor, grid: tuple[int, int], ratio: int = SMOOTHING_RATIO
                 ) -> Tensor | None:
    """The clusters' smoothed maps ``[n, ratio*h, ratio*w]`` (``self_clip``'s "clusters post process" and
    "smooth"): each cluster's mean affinity row ``[N]`` on the patch grid, bilinearly upsampled ``ratio`` times,
    median-filtered with a ``2*ratio - 1`` square (``scipy.ndimage.median_filter``, reflect border). None when
    DBSCAN found no cluster."""
    from scipy.ndimage import median_filter

    count = int(labels.max()) + 1 if labels.numel() else 0
    if count <= 0:
        return None
    means = torch.stack([affinity[labels == c].mean(dim=0) for c in range(count)]).reshape(count, *grid)
    upsampled = F.interpolate(means[None].float(), size=(ratio * grid[0], ratio * grid[1]), mode="bilinear",
                              align_corners=False)[0]
    smoothed = np.stack([median_filter(m, size=2 * ratio - 1) for m in upsampled.cpu().numpy()])
    return torch.from_numpy(smoothed).to(affinity.device)


def cluster_index(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Each pixel's cluster ``[H, W]``: the argmax of the maps ``[n, h', w']`` bilinearly resized to ``size``."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0].argmax(dim=0)


def vote_labels(labels: Tensor, clusters: Tensor, count: int, background_index: int | None = None) -> Tensor:
    """Every pixel of a cluster takes the cluster's most frequent label in ``labels`` ``[H, W]`` (``self_clip``'s
    "vote": ``torch.unique`` counts, the first maximum = the smallest of tied labels, with ``background_index``
    ranked after every other class as in the reference's class order). Returns a new map."""
    out = labels.clone()
    for c in range(count):
        member = clusters == c
        if not member.any():
            continue
        counts = torch.bincount(labels[member].flatten())
        tied = counts == counts.max()
        if background_index is not None and background_index < tied.numel() and int(tied.sum()) > 1:
            tied[background_index] = False
        out[member] = int(tied.nonzero()[0, 0])
    return out


class CLIPtrase(ZeroShotCLIP):
    """CLIPtrase: the q-q + k-k + v-v self-correlation in the last block (token residual and MLP kept), DBSCAN
    clusters of the penultimate block's patch self-correlation, and a per-cluster vote on the label map; the
    ``cliptrase`` protocol (short side 224, centre crop)."""

    default_protocol = "cliptrase"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(last_block="qq_kk_vv", residual="token", ffn=True),
        eps: float = DBSCAN_EPS,
        min_samples: int = DBSCAN_MIN_SAMPLES,
        clustering: bool = True,
        correlation_block: int = -2,
        class_token_datasets: tuple[str, ...] = CLASS_TOKEN_DATASETS,
        **evaluation: Any,
    ):
        """A dense CLIP, CLIPtrase's last block, its patch clusters and vote.

        Args:
            clip: the CLIP (an open_clip ViT) and its last block (released: ``qq_kk_vv``, token residual, MLP).
            eps: DBSCAN's neighbourhood radius (released 0.7 at 224, 1.1 at 336).
            min_samples: DBSCAN's core-point count (released 3 at 224, 7 at 336).
            clustering: cluster the patches and vote (off: the argmax of the patch scores alone).
            correlation_block: the block (index into the ViT's blocks, released -2 = ViT-B/16's 11th) whose
                self-correlation is clustered; it must have an earlier block (its input is that block's output).
            class_token_datasets: datasets whose patch scores are multiplied by the class token's (released VOC20).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(clip, **evaluation)
        if self.encoder.kind != "vit":
            raise NotImplementedError(f"CLIPtrase needs an open_clip ViT, {clip.name!r} is {self.encoder.kind!r}")
        layers = len(self.encoder.model.visual.transformer.resblocks)
        block = correlation_block % layers if -layers <= correlation_block < layers else -1
        if not 1 <= block <= layers - 1:
            raise ValueError(f"correlation_block {correlation_block} must be a block after the first of "
                             f"{clip.name!r} (1 … {layers - 1}, or negative from the end)")
        if eps <= 0 or min_samples < 1:
            raise ValueError(f"DBSCAN needs eps > 0 and min_samples >= 1, got {eps}, {min_samples}")
        self.eps, self.min_samples, self.clustering = float(eps), int(min_samples), bool(clustering)
        self.correlation_block = block
        self.class_token_datasets = tuple(class_token_datasets)
        self.dataset: str | None = None
        self._originals: list[Tensor] | None = None
        self._correlation: Tensor | None = None
        self._pending: list[tuple[Tensor, Tensor | None]] = []
        self.encoder.last_stage = self._last_stage

    #: the clusters are kept per image for the label vote; the split into features and logits is not used
    reuses_features = False

    @contextmanager
    def scoring(self, dataset: str) -> Iterator[None]:
        """The evaluator scores ``dataset`` inside the block (VOC20's class-token weighting, the vote's background)."""
        previous, self.dataset = self.dataset, dataset
        try:
            yield
        finally:
            self.dataset = previous

    @contextmanager
    def reading_originals(self, images: list[Tensor]) -> Iterator[None]:
        """The evaluator's images of a whole-image batch (in batch order): each one's clusters are kept under it
        until :meth:`refine_labels` votes on its label map."""
        previous, self._originals = self._originals, list(images)
        try:
            yield
        finally:
            self._originals = previous

    @torch.no_grad()
    def dense_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[B,3,H,W]`` in [0,1] -> projected tokens ``[B, 1+N, D]`` (class first) and the patch affinity
        ``[B, N, N]`` (:func:`patch_affinity` of :attr:`correlation_block`'s self-correlation)."""
        self._correlation = None
        try:
            tokens = self.encoder.encode_tokens(self.encoder.normalize(images))
            return tokens, patch_affinity(self._correlation)
        finally:
            self._correlation = None

    @torch.no_grad()
    def dense_logits(self, images: Tensor, text: Tensor) -> Tensor:
        tokens, affinity = self.dense_tokens(images)
        grid = self.encoder.token_grid(*images.shape[-2:])
        features = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        logits = cosine_logits(features, text)
        if self.dataset in self.class_token_datasets:
            cls = F.normalize(tokens[:, 0], dim=-1) @ F.normalize(text.to(tokens.dtype), dim=-1).T  # [B, Q]
            logits = logits * cls[:, :, None, None]
        if self.clustering and self._originals is not None:
            if len(self._originals) != len(images):
                raise RuntimeError("CLIPtrase's vote needs one original image per batch image")
            for original, points in zip(self._originals, affinity):
                labels = dbscan(points, self.eps, self.min_samples)
                self._pending.append((original, cluster_maps(points, labels, grid)))
        return logits

    @property
    def label_refinement(self) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        """The evaluator's hook after the label map (:func:`ovseg.eval.evaluator.label_refinement`): the vote."""
        return self.refine_labels if self.clustering else None

    @torch.no_grad()
    def refine_labels(self, labels: Tensor, probs: Tensor, original: Tensor) -> Tensor:
        """The per-cluster vote on the label map ``[H, W]`` of ``original`` (the clusters its dense scores left)."""
        for i, (image, _) in enumerate(self._pending):
            if image is original:
                maps = self._pending.pop(i)[1]
                break
        else:
            raise RuntimeError("CLIPtrase votes on whole-image label maps: its clusters come from the whole-image "
                               "pass (protocol mode: whole)")
        if maps is None:
            return labels
        background = None
        if self.dataset is not None:
            from ovseg.data.specs import SPECS

            spec = SPECS.get(self.dataset)
            background = spec.background_index if spec is not None else None
        clusters = cluster_index(maps, tuple(labels.shape[-2:]))
        return vote_labels(labels, clusters, maps.shape[0], background)

    # -- the encoder's last stage -------------------------------------------------------------------------
    def _last_stage(self, hidden: list[Tensor], last: TransformerBlockView, grid: tuple[int, int]) -> Tensor:
        """``hidden``: the outputs of blocks 0 … L-2; keeps the correlation block's self-correlation, returns the
        last block's output (before ``ln_post``)."""
        block = self.correlation_block
        resblocks = self.encoder.model.visual.transformer.resblocks
        view = TransformerBlockView.from_open_clip(resblocks[block])
        self._correlation = self_correlation(AttentionTokens(view.ln_1(hidden[block - 1]), view, grid))
        cfg = self.encoder.config
        return dense_last_block(hidden[-1], last, cfg.last_block, cfg.residual, cfg.ffn, grid)
