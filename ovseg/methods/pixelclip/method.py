"""PixelCLIP (Shin et al., NeurIPS 2024): CLIP's image encoder fine-tuned from unlabeled images and masks.

A training step (arXiv:2409.19846, Sec. 3, as the authors' code runs it; ``ovseg parity`` checks it against
cvlab-kaist/PixelCLIP):

1. teacher ← EMA of the student's visual encoder; teacher dense features of the weak view;
2. masks (SA-1B / SAM from the batch, or DINO k-means computed here) pooled over the teacher features,
   scored against the prompt prototypes (``eps · cos``), balanced with distributed Sinkhorn-Knopp, hard-assigned;
   per image and cluster the union of its masks is the target;
3. the student's dense features of the strong view give one cosine map per cluster, the ConvHead decodes each
   to a mask logit map; BCE with logits only at pixels under at least one mask.

At inference only the student's dense features and the frozen text encoder are used.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.data.files import DataError
from ovseg.methods.base import OVSegMethod, cosine_logits
from ovseg.methods.pixelclip.dino import DinoConfig, DinoMasker
from ovseg.methods.pixelclip.head import ConvHead
from ovseg.methods.pixelclip.prompts import LearnablePrompts
from ovseg.methods.pixelclip.sinkhorn import distributed_sinkhorn
from ovseg.utils.precision import float32
from ovseg.models.clip import CLIPConfig, DenseCLIP
from ovseg.models.text import TextBank

__all__ = ["PixelCLIP", "trainable_visual_names", "cluster_targets"]

Trainable = Literal["auto", "attention", "full", "none"]

_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d)


def trainable_visual_names(visual: nn.Module, kind: str, trainable: str) -> set[str]:
    """Names (relative to ``visual``) of the visual encoder's parameters that train.

    ``attention`` (ViT default): the q/k/v/out projections of every block and the positional embedding, as the
    authors select them (parameter name contains ``attn`` or ``position``); ``full`` (ConvNeXt default): all.
    """
    if trainable == "auto":
        trainable = "attention" if kind in ("vit", "hf_vit") else "full"
    names = [name for name, _ in visual.named_parameters()]
    if trainable == "full":
        return set(names)
    if trainable == "none":
        return set()
    if trainable == "attention":
        if kind not in ("vit", "hf_vit"):
            raise ValueError("trainable='attention' needs a ViT; use 'full' for ConvNeXt")
        return {n for n in names if ".attn." in f".{n}" or "self_attn" in n or "position" in n}
    raise ValueError(f"trainable must be auto|attention|full|none, got {trainable!r}")


#: the norm layers of the authors' optimizer (train_net.py ``build_optimizer``: ``norm_module_types``)
_D2_NORM_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
                                    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
                                    nn.LocalResponseNorm)
WeightDecayRule = Literal["detectron2", "norm_embed"]


def _is_no_decay(module: nn.Module, name: str, rule: str = "norm_embed") -> bool:
    """Whether ``module``'s parameter ``name`` gets ``weight_decay_norm_embed`` instead of ``weight_decay``.

    ``detectron2`` (the authors' train_net.py ``build_optimizer``): norm layers (``norm_module_types``),
    ``nn.Embedding`` and parameters named ``relative_position_bias_table`` / ``absolute_pos_embed``; everything
    else decays, the ViT's ``positional_embedding`` and the prompt tokens included. ``norm_embed`` (ovseg's old
    rule): norm layers, embeddings and every parameter whose name contains ``embedding``.
    """
    if rule == "detectron2":
        return isinstance(module, (*_D2_NORM_TYPES, nn.Embedding)) or "relative_position_bias_table" in name \
            or "absolute_pos_embed" in name
    if rule != "norm_embed":
        raise ValueError(f"weight_decay_rule must be 'detectron2' or 'norm_embed', got {rule!r}")
    return isinstance(module, (*_NORM_TYPES, nn.Embedding)) or type(module).__name__.startswith("LayerNorm") \
        or "embedding" in name.rsplit(".", 1)[-1]


def cluster_targets(
    teacher_features: Tensor,
    masks: list[Tensor],
    prototypes: Tensor,
    eps: float,
    mask_resolution: int,
    sinkhorn_iterations: int = 3,
    min_mask_pixels: int = 2,
) -> tuple[Tensor, dict[str, Any]]:
    """Teacher-side clustering (no gradient): targets [B, K, R, R] (float 0/1) and diagnostics.

    ``masks[i]`` is image i's [N_i, H, W] bool stack (any resolution; nearest-resized to R×R); masks with fewer
    than ``min_mask_pixels`` pixels at R×R are dropped. The Sinkhorn runs over all masks of all processes.
    """
    with torch.no_grad(), float32(teacher_features.device):  # ε-scaled logits: bf16 would move assignments
        res = (mask_resolution, mask_resolution)
        feats = F.interpolate(teacher_features.float(), size=res, mode="bilinear", align_corners=False)
        prototypes = F.normalize(prototypes.detach().float(), dim=-1)
        batch, num_clusters = feats.shape[0], prototypes.shape[0]
        targets = feats.new_zeros(batch, num_clusters, *res)
        kept, logits = [], []
        for i, image_masks in enumerate(masks):
            m = image_masks.to(feats.device)
            if m.numel() and tuple(m.shape[-2:]) != res:
                m = F.interpolate(m[None].float(), size=res, mode="nearest")[0]
            m = m.float().reshape(-1, *res)
            m = m[m.sum(dim=(1, 2)) >= min_mask_pixels]
            kept.append(m)
            if len(m):
                weights = m / m.sum(dim=(1, 2), keepdim=True)
                pooled = torch.einsum("chw,nhw->nc", feats[i], weights)
                logits.append(eps * F.normalize(pooled, dim=-1) @ prototypes.t())
        logits = torch.cat(logits) if logits else feats.new_zeros(0, num_clusters)
        assignment = distributed_sinkhorn(logits, sinkhorn_iterations)
        hard = assignment.argmax(dim=-1)
        start = 0
        for i, m in enumerate(kept):
            if len(m):
                targets[i].index_add_(0, hard[start:start + len(m)], m)
                start += len(m)
        targets.clamp_(max=1.0)
        info = {"num_masks": int(logits.shape[0]), "assignment": hard,
                "clusters_used": int(hard.unique().numel()) if hard.numel() else 0}
    return targets, info


class PixelCLIP(OVSegMethod):
    """PixelCLIP. Defaults are the paper's ViT-B/16 settings; see ``configs/pixelclip_*.yaml``."""

    default_protocol = "pixelclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(name="ViT-B-16", pretrained="openai", last_block="value", residual="cls",
                                      ffn=True),
        trainable: Trainable = "auto",
        clip_resolution: int = 320,
        mask_resolution: int = 256,
        num_clusters: int = 64,
        prompt_length: int = 4,
        prompt_template: str = "A photo of a {} in the scene",
        prompt_seed: int = 0,
        prompt_init_words: list[str] | None = None,
        eps: float | None = None,
        sinkhorn_iterations: int = 3,
        min_mask_pixels: int = 2,
        ema_momentum: float = 0.999,
        decoder_channels: tuple[int, int, int] = (64, 64, 32),
        decoder_group_channels: int = 16,
        masks: Literal["batch", "dino"] = "batch",
        dino: DinoConfig | None = None,
        lr: float = 2e-4,
        clip_lr_multiplier: float = 0.01,
        prompt_lr_multiplier: float = 10.0,
        weight_decay: float = 1e-4,
        weight_decay_norm_embed: float = 0.0,
        weight_decay_rule: WeightDecayRule = "detectron2",
        betas: tuple[float, float] = (0.9, 0.999),
        lr_end_factor: float = 0.5,
        max_steps: int | None = None,
        inference_feature_size: int = 64,
        **evaluation: Any,
    ):
        """PixelCLIP on ``clip``, its prompts, decoder, masks and optimiser settings.

        Args:
            clip: the CLIP (student; the teacher is a copy of its visual encoder). Dense path: value-only last block,
                class-token residual.
            trainable: visual parameters that train: ``auto`` (ViT: ``attention``; ConvNeXt: ``full``).
            clip_resolution: both views are resized to this square before the encoders (ViT-B/16: 320; ConvNeXt-B:
                640); also the evaluation square of the ``pixelclip`` protocol.
            mask_resolution: masks, teacher features and predictions meet at this square (256).
            num_clusters: learnable prompts, one per mask cluster (64).
            prompt_length: learnable token embeddings per prompt (4).
            prompt_template: the text each prompt's tokens are inserted into (at ``{}``).
            prompt_seed: seed of the prompts' initial token draw.
            prompt_init_words: draw the prompts' initial token embeddings from these words' tokens instead of the
                whole vocabulary (None, the authors' choice) — for a CLIP trained on a small vocabulary (the toy CLIP).
            eps: Sinkhorn score scale (``eps · cos``); None: 100 for ViTs, 1 for ConvNeXt.
            sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
            min_mask_pixels: masks with fewer pixels at ``mask_resolution`` are dropped (2: "≤ 1 pixel dropped").
            ema_momentum: teacher θ_t ← γ θ_t + (1−γ) θ_s before each teacher pass (0.999).
            decoder_channels: ConvHead widths (64, 64, 32).
            decoder_group_channels: ConvHead GroupNorm channels per group.
            masks: ``batch`` (SA-1B / SAM masks from the data) or ``dino`` (k-means on DINO features of the weak view).
            dino: the DINO model for ``masks: dino``.
            lr: base learning rate (decoder).
            clip_lr_multiplier: the visual encoder's learning rate, times ``lr`` (0.01).
            prompt_lr_multiplier: the prompts' learning rate, times ``lr`` (10).
            weight_decay: AdamW weight decay (1e-4).
            weight_decay_norm_embed: the weight decay of the parameters ``weight_decay_rule`` exempts (norm layers,
                embeddings; 0).
            weight_decay_rule: which parameters decay: ``detectron2`` (the authors' train_net.py ``build_optimizer``:
                all but norm layers and ``nn.Embedding``, so the ViT positional embedding and the prompt tokens decay)
                or ``norm_embed`` (ovseg's old rule: neither of those two decays).
            betas: AdamW betas.
            lr_end_factor: cosine decay from 1× to this × each group's LR (0.5), no warm-up.
            max_steps: schedule length; None: the trainer's ``max_steps`` (10,000 in the paper).
            inference_feature_size: dense features are bilinearly upsampled to this square before the cosine (64).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(**evaluation)
        self.skipped_samples = 0  # broken SA-1B samples left out of batches in this process
        self._left_out_counted, self._masks_this_epoch = False, 0
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {ema_momentum}")
        self.encoder = DenseCLIP(clip)
        if self.encoder.kind == "hf_vit":
            raise NotImplementedError("PixelCLIP needs an open_clip CLIP (learnable prompts use its text modules)")
        self.kind = self.encoder.kind
        self.clip_resolution = clip_resolution
        self.mask_resolution = mask_resolution
        self.eps = float(eps) if eps is not None else (100.0 if self.kind == "vit" else 1.0)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.min_mask_pixels = min_mask_pixels
        self.ema_momentum = ema_momentum
        self.masks_from = masks
        self.lr, self.clip_lr_multiplier, self.prompt_lr_multiplier = lr, clip_lr_multiplier, prompt_lr_multiplier
        self.weight_decay, self.weight_decay_norm_embed, self.betas = weight_decay, weight_decay_norm_embed, betas
        _is_no_decay(nn.Identity(), "", weight_decay_rule)  # validates the rule
        self.weight_decay_rule = weight_decay_rule
        self.lr_end_factor, self.max_steps = lr_end_factor, max_steps
        self.inference_feature_size = inference_feature_size

        # what trains: selected visual parameters; never the text encoder
        self.encoder.requires_grad_(False)
        visual = self.encoder.model.visual
        self._trainable_visual = trainable_visual_names(visual, self.kind, trainable)
        for name, param in visual.named_parameters():
            param.requires_grad_(name in self._trainable_visual)

        self.prompts = LearnablePrompts(self.encoder.model, self.encoder._get_tokenizer(), num_clusters,
                                        prompt_length, prompt_template, prompt_seed, prompt_init_words)
        self.head = ConvHead(1, 1, tuple(decoder_channels), decoder_group_channels)

        # teacher: a copy of the student's visual encoder (the text tower is stripped), never trained
        self.teacher = copy.deepcopy(self.encoder)
        for name in [n for n in self.teacher.model._modules if n != "visual"]:
            delattr(self.teacher.model, name)
        for name in list(self.teacher.model._parameters):
            delattr(self.teacher.model, name)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self._ema_pairs: list[tuple[Tensor, Tensor]] | None = None

        self.dino = DinoMasker(dino) if masks == "dino" else None
        self._text_banks: dict[tuple[str, ...], TextBank] = {}

    # -- checkpoints --------------------------------------------------------------------------------
    # -- modes --------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if self.dino is not None:
            self.dino.eval()
        return self

    # -- the evaluator contract ---------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.clip_resolution

    @property
    def weights_id(self) -> str:
        ckpt = getattr(self.trainer, "ckpt_path", None) if self._trainer is not None else None
        return f"checkpoint:{ckpt}" if ckpt else f"{self.encoder.weights_id}+pixelclip:untrained"

    @torch.no_grad()
    def encode_text(self, names: list[str], templates: list[str]) -> Tensor:
        key = tuple(templates)
        if key not in self._text_banks:
            self._text_banks[key] = TextBank(self.encoder.encode_text, templates)
        return self._text_banks[key].embed(names)

    @torch.no_grad()
    def dense_logits(self, images: Tensor, text: Tensor) -> Tensor:
        return self.logits_from_features(self.dense_features(images), text)

    reuses_features = True

    @torch.no_grad()
    def dense_features(self, images: Tensor) -> Tensor:
        features = self.encoder.encode_dense(self.encoder.normalize(images))
        size = self.inference_feature_size
        if size:
            features = F.interpolate(features.float(), size=(size, size), mode="bilinear", align_corners=False)
        return features

    @torch.no_grad()
    def logits_from_features(self, features: Tensor, text: Tensor) -> Tensor:
        return cosine_logits(features, text)

    # -- training -----------------------------------------------------------------------------------
    def _ema_parameter_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(teacher, student) pairs of the visual parameters that can change (the student's trainable ones);
        the frozen ones are equal in both and γ·θ + (1−γ)·θ = θ, so they are skipped."""
        if self._ema_pairs is None:
            student = dict(self.encoder.model.visual.named_parameters())
            teacher = dict(self.teacher.model.visual.named_parameters())
            if student.keys() != teacher.keys():
                raise RuntimeError("teacher and student visual encoders differ in structure")
            self._ema_pairs = [(teacher[n], student[n]) for n in student if n in self._trainable_visual]
        return self._ema_pairs

    @torch.no_grad()
    def update_teacher(self) -> None:
        """θ_t ← γ θ_t + (1 − γ) θ_s (in place, so cached resized positional embeddings are invalidated)."""
        gamma = self.ema_momentum
        for t, s in self._ema_parameter_pairs():
            t.mul_(gamma).add_(s.detach().to(t.dtype), alpha=1.0 - gamma)

    def prototypes(self) -> Tensor:
        return self.prompts(self.encoder.model)

    def _resize(self, images: Tensor) -> Tensor:
        size = (self.clip_resolution, self.clip_resolution)
        if tuple(images.shape[-2:]) == size:
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def _clip_input(self, encoder: DenseCLIP, images: Tensor) -> Tensor:
        """Normalise, then resize to ``clip_resolution``, in the authors' order and arithmetic (pixelclip/pixelclip.py
        ``forward``: ``(x - CLIP_PIXEL_MEAN) / CLIP_PIXEL_STD`` on 0-255 values, then ``F.interpolate``)."""
        normalised = encoder.normalize_255(images) if images.dtype == torch.uint8 else encoder.normalize(images.float())
        return self._resize(normalised)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """The PixelCLIP loss of one (per-process) batch; returns (loss, diagnostics)."""
        weak = _unit(batch["image"])
        if self.masks_from == "dino":
            if self.dino is None:
                raise RuntimeError("masks='dino' needs a DINO model")
            masks = list(self.dino(weak))
        else:
            if "masks" not in batch:
                raise KeyError("the batch has no 'masks': use an SA-1B/SAM source or set masks: dino")
            masks = batch["masks"]

        self.update_teacher()
        with torch.no_grad():
            teacher_features = self.teacher.encode_dense(self._clip_input(self.teacher, batch["image"]))
        prototypes = self.prototypes()  # [K, D], gradient to the prompts
        targets, info = cluster_targets(teacher_features, masks, prototypes, self.eps, self.mask_resolution,
                                        self.sinkhorn_iterations, self.min_mask_pixels)

        strong_raw = batch["image_strong"] if batch.get("image_strong") is not None else batch["image"]
        student = self.encoder.encode_dense(self._clip_input(self.encoder, strong_raw))  # [B, D, h, w]
        cost = torch.einsum("bdhw,kd->bkhw", F.normalize(student, dim=1), F.normalize(prototypes, dim=-1))
        batch_size, num_clusters, h, w = cost.shape
        logits = self.head(cost.reshape(batch_size * num_clusters, 1, h, w))
        res = (self.mask_resolution, self.mask_resolution)
        logits = F.interpolate(logits, size=res, mode="bilinear", align_corners=False)
        logits = logits.reshape(batch_size, num_clusters, *res)
        valid = targets.sum(dim=1) > 0  # [B, R, R]: pixels under at least one (kept) mask
        if valid.any():
            pred = logits.permute(0, 2, 3, 1)[valid]
            target = targets.permute(0, 2, 3, 1)[valid]
            loss = F.binary_cross_entropy_with_logits(pred, target)
        else:  # no mask anywhere in this batch: a zero that keeps every parameter in the graph (DDP)
            loss = logits.sum() * 0.0
        info.update(valid_fraction=float(valid.float().mean()))
        return loss, info

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, info = self.compute_loss(batch)
        batch_size = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/masks", float(info["num_masks"]), batch_size=batch_size)
        self.log("train/clusters_used", float(info["clusters_used"]), batch_size=batch_size)
        skipped = int(batch.get("skipped", 0))  # broken SA-1B samples the loader left out of this batch
        if not self._left_out_counted:  # and, once an epoch, those the reader left out when indexing
            dataset = getattr(getattr(self.trainer, "datamodule", None), "train_dataset", None)
            skipped += int(getattr(dataset, "left_out", 0))
            self._left_out_counted = True
        self.skipped_samples += skipped
        self._masks_this_epoch += int(info["num_masks"])
        self.log("train/skipped_samples", float(skipped), reduce_fx="sum", on_step=True, on_epoch=True,
                 batch_size=batch_size)
        return loss

    def on_train_epoch_start(self) -> None:
        self._left_out_counted, self._masks_this_epoch = False, 0

    def on_train_epoch_end(self) -> None:
        # a loss of 0 from batches without masks trains nothing: a run whose data gives no mask at all must stop
        total = self.trainer.strategy.reduce(torch.tensor(float(self._masks_this_epoch), device=self.device),
                                             reduce_op="sum")
        if float(total) == 0:
            raise DataError(f"training data: no mask in any training crop of epoch {self.current_epoch} (every mask "
                            f"broken, empty or under min_mask_pixels?); nothing to learn from, see the warnings above")

    def on_train_end(self) -> None:
        if self.skipped_samples:
            rank_zero_warn(f"{self.skipped_samples} broken training sample(s) were left out on this process (see the "
                           "warnings naming them, and train/skipped_samples)")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: visual (lr × clip_lr_multiplier), prompts (× prompt_lr_multiplier), decoder (× 1),
        each split into decayed and not decayed parameters by ``weight_decay_rule``."""
        groups: list[dict[str, Any]] = []

        def add(role: str, module: nn.Module, multiplier: float, prefix: str = "") -> None:
            decay, no_decay = [], []
            for _, sub in module.named_modules():
                for name, param in sub.named_parameters(recurse=False):
                    if not param.requires_grad:
                        continue
                    (no_decay if _is_no_decay(sub, name, self.weight_decay_rule) else decay).append(param)
            lr = self.lr * multiplier
            for params, wd, suffix in ((decay, self.weight_decay, ""), (no_decay, self.weight_decay_norm_embed,
                                                                         "_no_decay")):
                if params:
                    groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": role + suffix})

        add("clip", self.encoder.model.visual, self.clip_lr_multiplier)
        # the prompt tokens are a plain parameter of the authors' predictor (not an nn.Embedding): they decay there
        prompt_decay = self.weight_decay if self.weight_decay_rule == "detectron2" else self.weight_decay_norm_embed
        groups.append({"params": [self.prompts.tokens], "lr": self.lr * self.prompt_lr_multiplier,
                       "weight_decay": prompt_decay, "name": "prompts"})
        add("decoder", self.head, 1.0)
        return groups

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=tuple(self.betas),
                                      weight_decay=self.weight_decay)
        total = self.max_steps
        if total is None:
            total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else \
                int(self.trainer.estimated_stepping_batches)
        end = self.lr_end_factor
        total = max(1, int(total))

        def factor(step: int) -> float:
            t = min(step, total) / total
            return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _unit(images: Tensor) -> Tensor:
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
