"""CLIP-S4 backbones: the pixel-embedding model f (spec "Backbone"; the interface is
:class:`ovseg.models.backbone.Backbone`, where other backbones such as ``ovseg.models.deeplab`` also live).

A backbone maps images in [0, 1] ``[B, 3, H, W]`` to embeddings ``[B, D, H/s, W/s]`` in CLIP's joint space
(not normalised). It is built in two steps so a config can choose it before CLIP is loaded:
``__init__`` takes its settings, ``build(teacher)`` creates the layers once the method knows CLIP (the
embedding width D, and the weights to start from). ``param_groups()`` splits the trainable parameters
into ``backbone`` (lr × ``backbone_lr_mult``) and ``head``.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.models.backbone import Backbone
from ovseg.models.clip import DenseCLIP

__all__ = ["Backbone", "CLIPDenseEncoder", "UpsampleHead"]


class UpsampleHead(nn.Module):
    """Bilinear ×``factor`` upsampling plus a residual conv refinement whose last layer starts at zero,
    so the head starts as plain upsampling of the CLIP features (R)."""

    def __init__(self, dim: int, factor: int, hidden: int = 256):
        """The head.

        Args:
            dim: feature width (in and out).
            factor: upsampling factor (1: refinement only).
            hidden: width of the refinement convs.
        """
        super().__init__()
        self.factor = factor
        groups = 8 if hidden % 8 == 0 else 1
        self.refine = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1, bias=False), nn.GroupNorm(groups, hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.GroupNorm(groups, hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, 1),
        )
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.factor > 1:
            x = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return x + self.refine(x)


def _drop_text_tower(model: nn.Module) -> None:
    """The student needs CLIP's image tower only; free the copy of the text tower (open_clip CLIP)."""
    for name in ("transformer", "token_embedding", "ln_final", "text"):
        if isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, None)
    for name in ("text_projection", "positional_embedding"):
        if isinstance(getattr(model, name, None), nn.Parameter):
            setattr(model, name, None)


class CLIPDenseEncoder(Backbone):
    """The teacher's CLIP image encoder, copied from it (same weights), with MaskCLIP-style dense output
    (last block: value path) and a light trainable upsampling head to ``output_stride`` (R).
    """

    def __init__(self, trainable_blocks: int = 4, output_stride: int = 8, head_dim: int = 256):
        """The student encoder.

        Args:
            trainable_blocks: fine-tune the last N transformer blocks plus ``ln_post`` and the projection
                (R: 4; 0 freezes the encoder and trains the head only). CLIP ResNets: the last N of the four
                stages plus the attention pool's value and output projections (the dense path). Other CLIPs:
                N > 0 trains the whole image tower.
            output_stride: 8 (R) or the patch size (no upsampling).
            head_dim: hidden width of the head.
        """
        super().__init__()
        self.trainable_blocks, self.output_stride, self.head_dim = trainable_blocks, output_stride, head_dim
        self._settings = dict(trainable_blocks=trainable_blocks, output_stride=output_stride, head_dim=head_dim)
        self.clip: DenseCLIP | None = None
        self.head: UpsampleHead | None = None

    def build(self, teacher: DenseCLIP) -> None:
        clip = copy.deepcopy(teacher)
        _drop_text_tower(clip.model)
        clip.requires_grad_(False)
        if teacher.kind == "vit" and self.trainable_blocks > 0:
            visual = clip.model.visual
            for block in list(visual.transformer.resblocks)[-self.trainable_blocks:]:
                block.requires_grad_(True)
            visual.ln_post.requires_grad_(True)
            visual.proj.requires_grad_(True)
        elif teacher.kind == "resnet" and self.trainable_blocks > 0:
            visual = clip.model.visual
            for stage in [visual.layer1, visual.layer2, visual.layer3, visual.layer4][-self.trainable_blocks:]:
                stage.requires_grad_(True)
            visual.attnpool.v_proj.requires_grad_(True)
            visual.attnpool.c_proj.requires_grad_(True)
        elif self.trainable_blocks > 0:
            clip.model.visual.requires_grad_(True)
        self.clip = clip
        if teacher.patch_size % self.output_stride:
            raise ValueError(f"output_stride {self.output_stride} must divide the patch size {teacher.patch_size}")
        self.head = UpsampleHead(teacher.embed_dim, teacher.patch_size // self.output_stride, self.head_dim)
        self.input_size = teacher.input_size

    def train(self, mode: bool = True):
        super().train(mode)
        if self.clip is not None:
            self.clip.eval()  # no dropout / patch dropout: dense features need every token
        return self

    def forward(self, images01: Tensor) -> Tensor:
        return self.head(self.clip.encode_dense(self.clip.normalize(images01)).float())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": [p for p in self.clip.parameters() if p.requires_grad],
                "head": [p for p in self.head.parameters() if p.requires_grad]}
