"""CLIP-S4 (He et al., CVPR 2023): language-guided self-supervised semantic segmentation.

No public code exists; this implementation reconstructs the method from the paper's abstract and supplementary
(its numbers: ``benchmarks/sources/clips4.md``) and the authors' earlier work (SegSort / HSG). Every reconstructed
choice (marked **(R)** below) is a named constructor setting, so a user holding the paper can change it from a
config.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.data.folds import resolve_vocabulary
from ovseg.methods.clips4.views import correspondence, warp_labels_to_view, warp_to_view
from ovseg.eval.metrics import scores_from_confusion
from ovseg.eval.protocols import MODEL_NATIVE_SETTINGS
from ovseg.utils.precision import float32
from ovseg.methods.base import OVSegMethod, cosine_logits
from ovseg.methods.clips4.backbones import Backbone, CLIPDenseEncoder
from ovseg.methods.clips4.dist import gather_detached, gather_with_grad, global_max, global_mean, world
from ovseg.methods.clips4.losses import (embedding_consistency, pixel_segment_infonce, pixel_segment_multi_positive,
                                         pixel_segment_segsort_plus, semantic_consistency)
from ovseg.methods.clips4.prototypes import UNKNOWN_TARGETS, UnknownPrototypes
from ovseg.models.segments import SEGMENTATIONS, cut_by_regions, segment_mean, segment_pixels, segment_sizes
from ovseg.models.clip import CLIPConfig, DenseCLIP
from ovseg.models.text import TextBank

__all__ = ["CLIPS4", "vocabulary_split_scores"]

#: ``pixel_loss``: HSG's ``segsort+`` over visually coherent regions (the paper's S+: the segments of the pixel's
#: region in both views), SegSort's rule (``segsort``: the own segment against the segments of other regions), the
#: multi-positive form over the own + corresponding segment, or InfoNCE with one cross-view positive
PIXEL_LOSSES = ("segsort_plus", "segsort", "segsort_multi_positive", "infonce")
#: the pixel losses that group segments by the images' regions
REGION_LOSSES = {"segsort_plus": "segsort+", "segsort": "segsort"}
#: group id of a segment under ``segsort_plus``: global image index · REGION_SPAN + region
REGION_SPAN = 1 << 24


class CLIPS4(OVSegMethod):
    """CLIP-S4: pixel-segment contrastive learning across two views, tied to a frozen CLIP teacher by
    embedding consistency and semantic consistency (known + unknown prototypes).

    Training step: the backbone embeds both views (L2-normalised, stride 8). Each view is cut into segments by
    SegSort's clustering (``segments: segsort``: spherical k-means on embeddings plus normalised coordinates from a
    grid; :mod:`ovseg.models.segments`), and the clusters are cut by the image's over-segmentation regions
    carried into the view (``region_cut``; regions from :class:`~ovseg.methods.clips4.views.TwoViews`), as HSG cuts
    its k-means clusters by its region labels. Pixel-segment loss (``pixel_loss: segsort_plus``, HSG's rule at
    κ = 16): a pixel's positives are the other segments of its visually coherent region in both views (its own
    segment only when the region holds no other), the segments of other regions of all images on all processes
    are its negatives. The frozen CLIP teacher's MaskCLIP features of the un-augmented image are warped into each
    view; pooled over the model's segments they give CLIP segment embeddings. Embedding consistency: the model's
    segment embedding must pick its own CLIP segment embedding among the batch's (R: InfoNCE, τ 0.1; or
    ``cosine``). Semantic consistency: KL(p_CLIP ‖ p_model) over K known prototypes (text embeddings of the
    training vocabulary) and M unknown prototypes (image-side, learned without names), one assignment over both,
    made comparable across CLIP's image–text gap by ``unknown_targets`` (:mod:`ovseg.methods.clips4.prototypes`:
    ``calibrated``, ``shifted``; ``gated`` and ``shared`` are the earlier forms). Total (R): L_pix + λ_emb L_emb +
    λ_sem L_sem. SGD (momentum 0.9, weight decay 1e-3; confirmed), poly-0.9, the backbone at ×0.1 (R). Under DDP
    the segment prototypes are gathered with gradient and the losses divided by global counts, so N processes
    train as one process with the N-fold batch (:mod:`ovseg.methods.clips4.dist`). Logged: the pixel, embedding
    and semantic losses, ``train/unknown_argmax`` (segments whose CLIP argmax is an unknown prototype, before any
    masking) and ``train/unknown_target`` (after it: what trains).

    Inference: per-pixel cosine between the backbone's embeddings and the class text embeddings (the
    teacher's text encoder, the protocol's templates), like MaskCLIP.

    No public code exists: every setting marked (R) is a reconstruction from the paper's abstract and supplementary
    and the authors' earlier SegSort / HSG code; ``ovseg toyworld clips4-study`` measures the choices.
    """

    HPARAMS_IGNORE = ("backbone",)
    default_protocol = "maskclip"
    #: CLIP-S4 released no code: its CLIP is read as ovseg trained it (its own normalisation and activation),
    #: not with the released MaskCLIP model's ImageNet normalisation / GELU / LayerNorm eps
    NATIVE_SETTINGS = MODEL_NATIVE_SETTINGS

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(name="ViT-B-16", pretrained="openai", last_block="value", residual="token"),
        known_classes: list[str] | str = "voc20",
        backbone: Backbone | None = None,
        train_templates: str = "maskclip85",
        num_segments: int = 36,
        kmeans_iterations: int = 20,
        segments: Literal["segsort", "embedding"] = "segsort",
        location_weight: float = 1.0,
        pixel_loss: Literal["segsort_plus", "segsort", "segsort_multi_positive", "infonce"] = "segsort_plus",
        region_cut: bool = True,
        concentration: float = 16.0,
        pixel_temperature: float = 0.1,
        own_segment: Literal["exclude", "negative"] = "exclude",
        prototype_grad: bool = True,
        embedding_loss: Literal["infonce", "cosine"] = "infonce",
        embedding_temperature: float = 0.1,
        semantic_temperature: float = 0.01,
        num_unknown: int = 32,
        unknown_threshold: float = 0.5,
        unknown_momentum: float = 0.99,
        unknown_init_segments: int | None = None,
        unknown_seed: int = 0,
        unknown_targets: Literal["calibrated", "shifted", "gated", "shared"] = "calibrated",
        lambda_embedding: float = 1.0,
        lambda_semantic: float = 1.0,
        lr: float = 0.01,
        backbone_lr_mult: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-3,
        poly_power: float = 0.9,
        strict_vocabulary: bool = False,
        **evaluation: Any,
    ):
        """CLIP-S4 with its reconstructed settings (R) as defaults.

        Args:
            clip: the CLIP teacher (MaskCLIP-style dense output: ``last_block=value``); the default backbone
                starts from a copy of it.
            known_classes: the training vocabulary — a list of names, a class-name file (``voc20``) or
                ``context59-fold{i}`` (the other three Pascal Context folds). Only these names are encoded during
                training.
            backbone: a :class:`Backbone` (default :class:`CLIPDenseEncoder`: the last 4 blocks + an upsampling head
                to stride 8; or :class:`ovseg.models.deeplab.DeepLabResNet`).
            train_templates: templates of the known prototypes (CLIP-S4: the 85 MaskCLIP templates).
            num_segments: k-means clusters per view before the region cut (R: 36; HSG trains with 4 × 4 = 16).
            kmeans_iterations: k-means iterations (R: 20; HSG trains with 15).
            segments: ``segsort`` (k-means on embeddings + coordinates from a grid, HSG) or ``embedding``
                (embeddings only, random starts: the earlier form).
            location_weight: weight of the coordinates beside the embeddings (HSG: 1).
            pixel_loss: ``segsort_plus`` (HSG's rule over regions), ``segsort`` (SegSort's: the own segment against
                the segments of other regions), ``segsort_multi_positive`` (own segment + the other view's segment at
                the same point) or ``infonce`` (one cross-view positive).
            region_cut: cut the k-means clusters by the over-segmentation regions the batch carries (needed by
                ``segsort_plus``; the training source must give regions).
            concentration: κ of the SegSort losses (HSG: 16).
            pixel_temperature: τ of ``pixel_loss: infonce`` (R: 0.1).
            own_segment: ``pixel_loss: infonce`` only — ``exclude`` the pixel's own segment from its negatives, or
                keep it as a ``negative``.
            prototype_grad: gradients flow through the segment prototypes (R: true).
            embedding_loss: ``infonce`` (R) or ``cosine``.
            embedding_temperature: τ of the embedding InfoNCE (R: 0.1).
            semantic_temperature: τ_s of the semantic softmaxes (R: 0.01, CLIP's logit scale 100).
            num_unknown: M unknown prototypes (R: 32; 0 disables them).
            unknown_threshold: a segment is explained when CLIP's best known probability reaches it (the bank's
                initialisation, ``gated``, ``shifted``'s confident segments; R: 0.5).
            unknown_momentum: EMA momentum of the unknown prototypes and their calibration (R: 0.99).
            unknown_init_segments: unexplained segments collected before the bank's k-means start (None: 4 × M).
            unknown_seed: seed of the unknown-prototype k-means initialisation (same on every process).
            unknown_targets: which segments meet the unknown prototypes and feed the bank: ``calibrated``,
                ``shifted``, ``gated`` or ``shared`` (:mod:`ovseg.methods.clips4.prototypes`).
            lambda_embedding: λ_emb (R: 1).
            lambda_semantic: λ_sem (R: 1). With both λ at 0 and ``num_unknown: 0`` no CLIP loss is left: the teacher
                is not run while training and the backbone may have its own width (the SegSort baseline,
                ``configs/segsort_voc.yaml``).
            lr: learning rate of the head; see the configs for the values used and why.
            backbone_lr_mult: the fine-tuned CLIP blocks' learning rate relative to ``lr`` (R: 0.1).
            momentum: SGD momentum (0.9, supplementary).
            weight_decay: SGD weight decay (1e-3, supplementary).
            poly_power: power of the poly learning-rate decay (R: 0.9).
            strict_vocabulary: while fitting, refuse to encode names outside the training vocabulary (turn on
                for held-out protocols, where validation must not run during fit).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(**evaluation)
        if segments not in SEGMENTATIONS:
            raise ValueError(f"segments must be one of {SEGMENTATIONS}, got {segments!r}")
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {pixel_loss!r}")
        if unknown_targets not in UNKNOWN_TARGETS:
            raise ValueError(f"unknown_targets must be one of {UNKNOWN_TARGETS}, got {unknown_targets!r}")
        if pixel_loss in REGION_LOSSES and not region_cut:
            raise ValueError(f"pixel_loss {pixel_loss} groups segments by region: it needs region_cut: true")
        if own_segment not in ("exclude", "negative"):
            raise ValueError(f"own_segment must be 'exclude' or 'negative', got {own_segment!r}")
        if embedding_loss not in ("infonce", "cosine"):
            raise ValueError(f"embedding_loss must be 'infonce' or 'cosine', got {embedding_loss!r}")
        # ``encoder``: the method's CLIP, as in every method (frozen here: CLIP-S4's teacher)
        self.encoder = DenseCLIP(clip)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self._register_load_state_dict_pre_hook(_rename_teacher_keys)
        self.backbone = backbone if backbone is not None else CLIPDenseEncoder()
        self.backbone.build(self.encoder)
        if getattr(self.backbone, "embed_dim", None) not in (None, self.encoder.embed_dim) and self.uses_clip:
            raise ValueError(f"the backbone's width {self.backbone.embed_dim} differs from CLIP's "
                             f"{self.encoder.embed_dim}: the CLIP losses compare them (set both lambdas and "
                             "num_unknown to 0 for a CLIP-free baseline)")
        self.hparams["backbone"] = self.backbone.settings

        self.known_names: list[str] = resolve_vocabulary(known_classes)
        self._known_set = set(self.known_names)
        self.strict_vocabulary = strict_vocabulary
        #: every prompt this method ever sent to the text encoder (what the vocabulary tests assert on)
        self.encoded_prompts: list[str] = []
        self._text_banks: dict[tuple[str, ...], TextBank] = {}
        self.register_buffer("known_text", self._bank(train_templates).embed(self.known_names).float())
        self.unknown = UnknownPrototypes(num_unknown, self.encoder.embed_dim, unknown_momentum, unknown_threshold,
                                         semantic_temperature, unknown_init_segments, kmeans_iterations,
                                         unknown_targets, len(self.known_names))
        self._unknown_generator = torch.Generator().manual_seed(unknown_seed)

    # -- text --------------------------------------------------------------------------------------
    def _encode_prompts(self, prompts: list[str]) -> Tensor:
        self.encoded_prompts.extend(prompts)
        return self.encoder.encode_text(prompts)

    def _bank(self, templates: str | list[str]) -> TextBank:
        key = (templates,) if isinstance(templates, str) else tuple(templates)
        if key not in self._text_banks:
            self._text_banks[key] = TextBank(self._encode_prompts, templates)
        return self._text_banks[key]

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit"

    @torch.no_grad()
    def encode_text(self, names: list[str], templates: list[str]) -> Tensor:
        if self.strict_vocabulary and self._fitting():
            # a tuple (one class's synonyms, protocol setting `synonyms: mean_embedding`) encodes each of them
            outside = [n for n in names if not {*((n,) if isinstance(n, str) else n)} <= self._known_set]
            if outside:
                raise ValueError(f"strict_vocabulary: names outside the training vocabulary must not be encoded "
                                 f"while fitting (disable validation during fit): {outside[:5]}")
        return self._bank(list(templates)).embed(names)

    # -- inference ---------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.encoder.input_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def embed(self, images01: Tensor) -> Tensor:
        """Images in [0, 1] -> L2-normalised pixel embeddings ``[B, D, h, w]`` (stride 8)."""
        return F.normalize(self.backbone(images01).float(), dim=1)

    @torch.no_grad()
    def dense_logits(self, images: Tensor, text: Tensor) -> Tensor:
        return self.logits_from_features(self.dense_features(images), text)

    reuses_features = True

    @torch.no_grad()
    def dense_features(self, images: Tensor) -> Tensor:
        return self.backbone(images).float()

    @torch.no_grad()
    def logits_from_features(self, features: Tensor, text: Tensor) -> Tensor:
        return cosine_logits(features, text)

    # -- training ----------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_features(self, teacher_images: list[Tensor]) -> list[Tensor]:
        """Un-augmented images (uint8 or [0, 1], sizes may differ) -> per-pixel unit-norm MaskCLIP features
        ``[D, h, w]`` each; images of equal size run as one batch."""
        out: list[Tensor | None] = [None] * len(teacher_images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(teacher_images):
            groups.setdefault(tuple(image.shape), []).append(i)
        for indices in groups.values():
            batch = torch.stack([teacher_images[i] for i in indices]).to(self.device)
            batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
            features = F.normalize(self.encoder.encode_dense(self.encoder.normalize(batch)).float(), dim=1)
            for i, f in zip(indices, features):
                out[i] = f
        return out  # type: ignore[return-value]

    def view_regions(self, regions: list[Tensor] | None, geometry: Tensor, grid: tuple[int, int]) -> Tensor | None:
        """Each image's region labels (``[Ht, Wt]``, from :class:`~ovseg.methods.clips4.views.TwoViews`) at the cells
        of its two views: ``[2B, h·w]`` in the views' order (image0 A, image0 B, ...), or None without regions."""
        if regions is None:
            return None
        return torch.cat([warp_labels_to_view(r.to(geometry.device), geometry[b], grid).flatten(1)
                          for b, r in enumerate(regions)])

    def compute_losses(self, views: Tensor, geometry: Tensor, teacher_images: list[Tensor],
                       regions: list[Tensor] | None = None) -> dict[str, Tensor]:
        """views ``[B, 2, 3, S, S]`` in [0, 1], geometry ``[B, 2, 5]``, regions (optional) a list of B label maps
        ``[Ht, Wt]`` -> the loss terms and diagnostics."""
        hp = self.hparams
        z = self.embed(views.flatten(0, 1))  # [2B, D, h, w], order: image0 A, image0 B, image1 A, ...
        # the CLIP teacher may run in bf16 (no gradient); without a CLIP loss it does not run
        teacher = self.teacher_features(teacher_images) if self.uses_clip else []
        # the losses in float32: softmaxes at temperature 0.01-0.1 (see ovseg/utils/precision.py)
        with float32(z.device):
            height, width = z.shape[-2:]
            n, dim = height * width, z.shape[1]
            zf = z.flatten(2).transpose(1, 2)  # [2B, N, D]
            k = min(hp.num_segments, n)
            clusters = segment_pixels(zf.detach(), height, width, k, hp.kmeans_iterations, hp.segments,
                                      hp.location_weight)
            region = self.view_regions(regions, geometry, (height, width)) if hp.region_cut else None
            if hp.pixel_loss in REGION_LOSSES and region is None:
                raise ValueError(f"pixel_loss {hp.pixel_loss} needs the images' regions: the training source must "
                                 "give them (TwoViewImages regions: slic | felzenszwalb, not none)")
            index, segment_view, segment_region = cut_by_regions(clusters, region)
            # one segment count on every process (gathers need one shape): padding segments are empty, hence invalid
            count = global_max(len(segment_view), z.device)
            prototypes = segment_mean((zf if hp.prototype_grad else zf.detach()).reshape(1, -1, dim),
                                      index.reshape(1, -1), count)[0]  # [S, D]
            valid = segment_sizes(index.reshape(1, -1), count)[0] > 0  # [S]
            all_prototypes, offset = gather_with_grad(prototypes)
            all_valid = gather_detached(valid)
            groups = None
            if hp.pixel_loss in REGION_LOSSES:
                image = world()[0] * views.shape[0] + segment_view // 2
                local_groups = torch.full((count,), -1, dtype=torch.long, device=z.device)
                local_groups[:len(segment_view)] = image * REGION_SPAN + segment_region
                groups = gather_detached(local_groups)
            loss_pixel, overlap = self._pixel_loss(zf, index, geometry, all_prototypes, offset, all_valid,
                                                   (height, width), groups)
            if not self.uses_clip:  # the SegSort baseline: the pixel loss alone, the teacher never runs
                zero = loss_pixel.new_zeros(())
                return {"loss": loss_pixel, "pixel": loss_pixel, "embedding": zero, "semantic": zero,
                        "overlap": overlap, "unknown_argmax": zero, "unknown_target": zero,
                        "segments": valid.sum().float() / zf.shape[0]}

            # CLIP teacher features warped into each view, pooled over the model's segments
            with torch.no_grad():
                warped = torch.cat([warp_to_view(f[None].expand(2, -1, -1, -1), geometry[b], (height, width))
                                    for b, f in enumerate(teacher)])  # [2B, D, h, w]
                warped = F.normalize(warped, dim=1).flatten(2).transpose(1, 2)
                clip_segments = segment_mean(warped.reshape(1, -1, dim), index.reshape(1, -1), count)[0]  # [S, D]
                all_clip = gather_detached(clip_segments)

            positive = offset + torch.arange(count, device=z.device)
            loss_embedding = global_mean(embedding_consistency(
                prototypes, all_clip, positive, all_valid, hp.embedding_loss, hp.embedding_temperature,
                reduction="none"))
            semantic = self.semantic_targets(clip_segments, valid)
            loss_semantic = global_mean(semantic_consistency(
                prototypes, clip_segments, semantic["targets"], hp.semantic_temperature, valid, semantic["allowed"],
                reduction="none", bias=semantic["bias"]))
            total = loss_pixel + hp.lambda_embedding * loss_embedding + hp.lambda_semantic * loss_semantic
            return {"loss": total, "pixel": loss_pixel, "embedding": loss_embedding, "semantic": loss_semantic,
                    "overlap": overlap, "all_clip": all_clip[all_valid],
                    "unknown_argmax": semantic["unknown_argmax"], "unknown_target": semantic["unknown_target"],
                    "segments": valid.sum().float() / zf.shape[0]}

    def _pixel_loss(self, zf: Tensor, index: Tensor, geometry: Tensor, all_prototypes: Tensor, offset: int,
                    all_valid: Tensor, grid: tuple[int, int], groups: Tensor | None) -> tuple[Tensor, Tensor]:
        """The pixel-segment loss (``pixel_loss``) of this process's share, and the views' mean overlap. ``index``
        ``[2B, N]``: each pixel's segment among this process's (``offset`` places them in ``all_prototypes``)."""
        hp = self.hparams
        batch, n, dim = zf.shape[0] // 2, zf.shape[1], zf.shape[2]
        index_v = index.view(batch, 2, n)
        per_view_losses, positives, overlap = [], [], []
        for src, dst in ((0, 1), (1, 0)):
            cell, inside = correspondence(geometry[:, src], geometry[:, dst], *grid)  # [B, N]
            other = offset + torch.gather(index_v[:, dst], 1, cell)
            own = offset + index_v[:, src]
            overlap.append(inside.float().mean())
            if hp.pixel_loss == "segsort_multi_positive":
                # S+: the pixel's segment in its view and, inside the overlap, the other view's segment holding the
                # same point; outside the overlap only the within-view part remains
                positives.append(torch.stack([own, torch.where(inside, other, torch.full_like(other, -1))], -1))
            elif hp.pixel_loss == "infonce":
                per_view_losses.append(global_mean(pixel_segment_infonce(
                    zf.view(batch, 2, n, dim)[:, src][inside], all_prototypes, other[inside], all_valid,
                    own[inside] if hp.own_segment == "exclude" else None, hp.pixel_temperature, reduction="none")))
        if hp.pixel_loss in REGION_LOSSES:
            # segsort+: S+ = the other segments of the pixel's region, in both views (HSG); segsort: the own segment
            # against other regions' segments (SegSort); every pixel counts
            loss = global_mean(pixel_segment_segsort_plus(zf.reshape(-1, dim), all_prototypes,
                                                          offset + index.reshape(-1), groups, all_valid,
                                                          hp.concentration, reduction="none",
                                                          group_mode=REGION_LOSSES[hp.pixel_loss]))
        elif hp.pixel_loss == "segsort_multi_positive":
            # zf's order is image0 A, image0 B, ...: positives per image, then view
            positive_sets = torch.stack(positives, dim=1).reshape(-1, 2)
            loss = global_mean(pixel_segment_multi_positive(zf.reshape(-1, dim), all_prototypes, positive_sets,
                                                            all_valid, hp.concentration, reduction="none"))
        else:
            loss = (per_view_losses[0] + per_view_losses[1]) / 2
        return loss, torch.stack(overlap).mean()

    def semantic_targets(self, clip_segments: Tensor, valid: Tensor | None = None) -> dict[str, Tensor | None]:
        """The semantic-consistency targets of CLIP segment embeddings ``[S, D]`` under ``unknown_targets``:
        ``targets`` (known text ∪ unknown prototypes, ``[T, D]``), their cosine ``bias`` ``[T]``, the ``allowed``
        mask (``gated``) or None, ``to_unknown`` ``[S]`` (the segments whose target is an unknown prototype) and, over
        the ``valid`` segments, the share whose CLIP argmax is an unknown prototype before any masking
        (``unknown_argmax``) and after it (``unknown_target``: what trains)."""
        known = self.known_text
        targets = torch.cat([known, self.unknown.targets(known)])
        bias = self.unknown.target_bias(len(known)).to(known.device)
        allowed = self.unknown.allowed(clip_segments, known)
        logits = self.unknown.logits(clip_segments, known)  # the assignment: cosines to ``targets`` plus ``bias``
        valid = torch.ones(len(clip_segments), dtype=torch.bool, device=logits.device) if valid is None else valid
        is_unknown = logits.argmax(dim=-1) >= len(known)
        if allowed is not None:
            is_target = logits.masked_fill(~allowed, -torch.inf).argmax(dim=-1) >= len(known)
        else:
            is_target = is_unknown
        count = valid.sum().clamp_min(1)
        return {"targets": targets, "bias": bias, "allowed": allowed, "to_unknown": is_target,
                "unknown_argmax": (is_unknown & valid).sum() / count,
                "unknown_target": (is_target & valid).sum() / count}

    @property
    def uses_clip(self) -> bool:
        """Whether training reads the CLIP teacher (any CLIP loss or unknown prototypes)."""
        hp = self.hparams
        return bool(hp.lambda_embedding or hp.lambda_semantic or hp.num_unknown)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.compute_losses(batch["image"], batch["geometry"], batch["teacher_image"], batch.get("regions"))
        fed = False
        if self.uses_clip:
            with float32(self.device):
                fed = self.unknown.update(out["all_clip"], self.known_text, self._unknown_generator)
        size = batch["image"].shape[0]
        self.log_dict({f"train/{k}": out[k].detach() for k in ("loss", "pixel", "embedding", "semantic")},
                      prog_bar=True, batch_size=size)
        self.log_dict({"train/overlap": out["overlap"], "train/segments": out["segments"],
                       "train/unknown_argmax": out["unknown_argmax"], "train/unknown_target": out["unknown_target"],
                       "train/unknown_fed": float(fed),
                       "train/unknown_ready": float(bool(self.unknown.initialized))}, batch_size=size)
        return out["loss"]

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.backbone.param_groups()
        param_groups = [{"params": groups["head"], "lr": hp.lr},
                        {"params": groups["backbone"], "lr": hp.lr * hp.backbone_lr_mult}]
        param_groups = [g for g in param_groups if g["params"]]
        optimizer = torch.optim.SGD(param_groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def poly(step: int) -> float:
            return max(0.0, 1.0 - step / total) ** hp.poly_power

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- scores over known / unknown classes -------------------------------------------------------
    def extra_metrics(self, dataset: str, confmat: Any, class_names: list[list[str]]) -> dict[str, Any]:
        return vocabulary_split_scores(confmat, class_names, self._known_set)


def vocabulary_split_scores(confmat: Any, class_names: list[list[str]], known: set[str]) -> dict[str, Any]:
    """mIoU over the classes whose names were in the training vocabulary (known), over the others
    (unknown; a class named "background" counts as neither) and their harmonic mean (hIoU), from the
    dataset's full confusion matrix — per-class IoU is the usual one, the means just split the classes."""
    iou = scores_from_confusion(confmat).iou
    is_known = [any(s in known for s in synonyms) for synonyms in class_names]
    is_unknown = [not k and synonyms[0] != "background" for k, synonyms in zip(is_known, class_names)]

    def mean(mask: list[bool]) -> float | None:
        values = [v for v, m in zip(iou, mask) if m and v == v]
        return round(float(sum(values) / len(values)), 2) if values else None

    known_miou, unknown_miou = mean(is_known), mean(is_unknown)
    harmonic = None
    if known_miou is not None and unknown_miou is not None:
        harmonic = round(2 * known_miou * unknown_miou / (known_miou + unknown_miou), 2) if known_miou + unknown_miou \
            else 0.0
    return {
        "known_mIoU": known_miou,
        "unknown_mIoU": unknown_miou,
        "hIoU": harmonic,
        "known_classes": [c[0] for c, k in zip(class_names, is_known) if k],
        "unknown_classes": [c[0] for c, u in zip(class_names, is_unknown) if u],
    }


def _rename_teacher_keys(state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the frozen CLIP was named ``encoder`` (as in every method) call it ``teacher``."""
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        state_dict[prefix + "encoder." + key[len(prefix) + len("teacher."):]] = state_dict.pop(key)
