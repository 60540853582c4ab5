"""MaskCLIP+ (Zhou et al., ECCV 2022): a DeepLab-v2 student trained on the online pseudo labels of a frozen
MaskCLIP, annotation-free setting.

Follows the authors' released code (github.com/chongzhou96/MaskCLIP): ``mmseg/models/decode_heads/
maskclip_plus_head.py`` (``MaskClipPlusHead``: ``cls_seg``, ``assign_label``, ``forward_train``),
``configs/_base_/models/maskclip_plus_{vit16,r50}.py`` and ``configs/maskclip_plus/anno_free/*.py``. Each setting
below names the line it reproduces; ``ovseg parity --ref MaskCLIP+=DIR`` checks one training step against it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.data.folds import resolve_vocabulary
from ovseg.eval.evaluator import dense_options
from ovseg.eval.protocols import load_protocol
from ovseg.methods.base import OVSegMethod
from ovseg.methods.zeroshot import MaskCLIP
from ovseg.models.backbone import Backbone
from ovseg.models.clip import CLIPConfig
from ovseg.models.deeplab import IMAGENET_MEAN, DeepLabResNet
from ovseg.models.text import get_templates
from ovseg.utils.precision import float32

__all__ = ["MaskCLIPPlus", "pseudo_label_cross_entropy", "IGNORE_INDEX", "LOSS_AVERAGES"]

IGNORE_INDEX = 255
#: ``all_pixels``: mmseg 0.x ``CrossEntropyLoss`` (``weight_reduce_loss(reduction='mean')`` over every pixel, an
#: ignored one adding 0; what MaskCLIP+ trained with); ``labelled``: over the pixels with a pseudo label
LOSS_AVERAGES = ("all_pixels", "labelled")


def pseudo_label_cross_entropy(logits: Tensor, targets: Tensor, average: str = "all_pixels") -> Tensor:
    """mmseg ``BaseDecodeHead.losses``: class scores ``[B, K, h, w]`` upsampled bilinearly (``align_corners=False``)
    to the targets' size ``[B, H, W]`` (255 = ignored), cross-entropy per pixel, averaged as ``average`` says."""
    logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    if average == "all_pixels":
        return per_pixel.mean()
    return per_pixel.sum() / (targets != IGNORE_INDEX).sum().clamp_min(1)


def default_student() -> DeepLabResNet:
    """MaskCLIP+'s student for the ViT-B/16 teacher: ResNet-50-V1c, output stride 8, ASPP-v2 (6/12/18/24).

    ``configs/_base_/models/maskclip_plus_vit16.py`` sets ``ResNetV1c(depth=50, dilations=(1, 1, 2, 4), strides=(1, 2,
    1, 1), contract_dilation=True)`` and ``ASPPHeadV2(dilations=(6, 12, 18, 24))``; the ViT-16 annotation-free configs
    (``configs/maskclip_plus/anno_free/maskclip_plus_vit16_deeplabv2_r101-d8_*.py``) inherit it unchanged although
    their file names say r101 (only the RN50 / RN50x16 configs override ``depth=101``)."""
    return DeepLabResNet(depth=50, output_stride=8, stem="deep", head="aspp_v2", atrous_rates=(6, 12, 18, 24))


class MaskCLIPPlus(OVSegMethod):
    """MaskCLIP+: the student's features, projected to CLIP's text dimension by its ASPP-v2 head, are classified
    against the fixed CLIP text embeddings of the training classes; a frozen MaskCLIP teacher labels every crop
    online (argmax of its class scores, upsampled to the crop) and the student learns them with cross-entropy.

    Training step (``MaskClipPlusHead.forward_train`` with ``start_clip_guided=(1, -1)``): the padded crop goes to
    both networks; the teacher's cosine scores (``assign_label(norm=True)``; key smoothing / prompt denoising when
    the teacher has them, ``refine_clip_output``) are resized bilinearly to the crop and their argmax is the pseudo
    label; padding is ignored (255). The student's scores are ``feat · t_k`` (``cls_seg``: no feature normalisation
    with ``norm_feat=False``, no logit scale, no background embedding with ``cls_bg=False``).

    Inference: the same scores for the evaluator's class names (text from the teacher's CLIP, the protocol's
    templates), so the student scores any vocabulary the way MaskCLIP does.
    """

    HPARAMS_IGNORE = ("student",)
    default_protocol = "maskclip"

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(name="ViT-B-16", pretrained="openai", last_block="value", residual="token",
                                      ffn=True),
        teacher_options: dict[str, Any] | None = None,
        teacher_protocol: str = "maskclip",
        classes: list[str] | str = "maskclip/voc20",
        train_templates: str = "maskclip85",
        student: Backbone | None = None,
        norm_feat: bool = False,
        loss_average: Literal["all_pixels", "labelled"] = "all_pixels",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        poly_power: float = 0.9,
        min_lr: float = 1e-4,
        **evaluation: Any,
    ):
        """MaskCLIP+ with the released annotation-free settings as defaults.

        Args:
            clip: the teacher's CLIP and its dense last block (MaskCLIP: ``last_block=value``).
            teacher_options: more :class:`~ovseg.methods.MaskCLIP` settings of the teacher (e.g. key smoothing /
                prompt denoising thresholds where MaskCLIP has them; the ``kspd`` configs use 1.0 / 0.5).
            teacher_protocol: the protocol whose image-reading settings the teacher uses while training
                (``maskclip``: ImageNet normalisation, GELU, LayerNorm eps 1e-6, as MaskCLIP's released ViT;
                a protocol with the model's own settings for a CLIP trained in ovseg, e.g. ``toyworld``).
            classes: the training classes, in pseudo-label order: a class-name file (``maskclip/voc20``: MaskCLIP's
                ``prompt_engineering.py`` names) or a list.
            train_templates: templates of the training classes' text embeddings (MaskCLIP: the 85).
            student: the student network (default :func:`default_student`: ResNet-50-V1c DeepLab-v2); its output
                width is set to CLIP's text dimension.
            norm_feat: L2-normalise the student's features before the dot product (``norm_feat``; False in every
                released config).
            loss_average: :data:`LOSS_AVERAGES` (``all_pixels``: mmseg 0.x).
            lr: SGD learning rate (``schedule_*k.py``: 0.01), every student parameter alike.
            momentum: SGD momentum (0.9).
            weight_decay: SGD weight decay (5e-4, on every parameter as mmcv's default optimizer does).
            poly_power: power of the poly decay (0.9).
            min_lr: the poly decay's floor (mmcv ``PolyLrUpdaterHook(min_lr=1e-4)``:
                ``lr = (base - min_lr) · (1 - iter / max_iters)^power + min_lr``).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(**evaluation)
        if loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
        self.teacher = MaskCLIP(clip=clip, **(teacher_options or {}))
        self.teacher.requires_grad_(False)
        self.teacher_settings = load_protocol(teacher_protocol).settings_for(None)
        self.student = student if student is not None else default_student()
        self.student.build(self.teacher.encoder)
        self.hparams["student"] = self.student.settings
        self.class_names = resolve_vocabulary(classes)
        with dense_options(self.teacher, self.teacher_settings):
            text = self.teacher.encode_text(self.class_names, get_templates(train_templates))
        # the fixed classifier (``text_embeddings`` buffer of MaskClipPlusHead): unit rows, never trained
        self.register_buffer("class_text", F.normalize(text.float(), dim=-1))

    # -- the contract ------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.teacher.input_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: its own train() keeps its CLIP in eval mode too
        return self

    @torch.no_grad()
    def encode_text(self, names: list[str], templates: list[str]) -> Tensor:
        return self.teacher.encode_text(names, templates)

    def class_logits(self, images: Tensor, text: Tensor) -> Tensor:
        """``MaskClipPlusHead.cls_seg``: student features ``[B, D, h, w]`` (normalised only with ``norm_feat``) dot
        the unit text embeddings ``[K, D]`` -> ``[B, K, h, w]``."""
        return self.logits_from_features(self.student(images), text)

    @torch.no_grad()
    def dense_logits(self, images: Tensor, text: Tensor) -> Tensor:
        return self.class_logits(images, text)

    reuses_features = True

    @torch.no_grad()
    def dense_features(self, images: Tensor) -> Tensor:
        return self.student(images)

    def logits_from_features(self, features: Tensor, text: Tensor) -> Tensor:
        features = features.float()
        if self.hparams.norm_feat:
            features = F.normalize(features, dim=1)
        return torch.einsum("bdhw,kd->bkhw", features, F.normalize(text.float(), dim=-1)).contiguous()

    # -- training ----------------------------------------------------------------------------------
    @staticmethod
    def fill_padding(images: Tensor, valid: Tensor) -> Tensor:
        """mmseg pads after ``Normalize`` with 0, i.e. with the ImageNet mean colour before it: both networks read
        that colour as exactly 0 (the student's and the ``maskclip`` teacher's normalisation are ImageNet's)."""
        mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return torch.where(valid[:, None], images, mean)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> Tensor:
        """The teacher's labels ``[B, H, W]`` of crops ``[B, 3, H, W]`` in [0, 1] (``assign_label(clip=True)``: its
        class scores resized bilinearly to the crop, argmax); pixels outside ``valid`` are 255."""
        with dense_options(self.teacher, self.teacher_settings):
            scores = self.teacher.dense_logits(images, self.class_text)
        with float32(images.device):
            scores = F.interpolate(scores.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
            labels = scores.argmax(dim=1)
        if valid is not None:
            labels = labels.masked_fill(~valid, IGNORE_INDEX)
        return labels

    def compute_loss(self, images: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """One step's loss on crops in [0, 1] and their ``valid`` (not padding) masks, and its pseudo labels."""
        images = self.fill_padding(images, valid)
        targets = self.pseudo_labels(images, valid)
        logits = self.class_logits(images, self.class_text)
        with float32(images.device):
            loss = pseudo_label_cross_entropy(logits, targets, self.hparams.loss_average)
        return {"loss": loss, "targets": targets, "logits": logits}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.compute_loss(batch["image"], batch["valid"])
        labelled = (out["targets"] != IGNORE_INDEX).float().mean()
        size = batch["image"].shape[0]
        self.log("train/loss", out["loss"].detach(), prog_bar=True, batch_size=size)
        self.log("train/labelled", labelled, batch_size=size)
        return out["loss"]

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        floor = hp.min_lr / hp.lr

        def poly(step: int) -> float:
            return (1 - floor) * max(0.0, 1.0 - step / total) ** hp.poly_power + floor

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
