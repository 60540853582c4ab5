"""DeepLab-style ResNet pixel-embedding backbone (torchvision ResNet-50/101, dilated, ASPP, projection
to the CLIP joint dimension) — the family used by MaskCLIP+ and SegSort/HSG. A CLIP-S4 backbone option:

    backbone: {class_path: ovseg.models.deeplab.DeepLabResNet, init_args: {depth: 101, weights: IMAGENET1K_V2}}

``weights``: None (random, tests), a torchvision weights name (``IMAGENET1K_V1``/``IMAGENET1K_V2``; needs
them in the torch hub cache when offline) or a local ``.pth`` state-dict file of the ResNet.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ovseg.models.backbone import Backbone

__all__ = ["DeepLabResNet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeepLabResNet(Backbone):
    """
    Args:
        depth: 50 or 101.
        output_stride: 8 (layer3 and layer4 dilated) or 16 (layer4 dilated).
        weights: see the module doc.
        aspp_channels / atrous_rates: the ASPP head (DeepLab v3: 256, rates 12/24/36 at stride 8).
        embed_dim: output width; None takes the CLIP joint dimension from the teacher at ``build``.
        own_width: ``embed_dim`` may differ from the teacher's (a model trained without CLIP losses, e.g.
            SegSort's 32-dimensional embeddings); otherwise ``build`` refuses a mismatch.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, depth: int = 101, output_stride: int = 8, weights: str | None = None,
                 aspp_channels: int = 256, atrous_rates: tuple[int, ...] = (12, 24, 36), embed_dim: int | None = None,
                 own_width: bool = False):
        super().__init__()
        if depth not in (50, 101):
            raise ValueError(f"DeepLabResNet depth must be 50 or 101, got {depth}")
        if output_stride not in (8, 16):
            raise ValueError(f"DeepLabResNet output_stride must be 8 or 16, got {output_stride}")
        self.depth, self.output_stride, self.weights = depth, output_stride, weights
        self.aspp_channels, self.atrous_rates, self.embed_dim = aspp_channels, tuple(atrous_rates), embed_dim
        self.own_width = own_width
        self._settings = dict(depth=depth, output_stride=output_stride, weights=weights, aspp_channels=aspp_channels,
                              atrous_rates=list(atrous_rates), embed_dim=embed_dim)
        if own_width:
            self._settings["own_width"] = True
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.body: nn.Module | None = None
        self.head: nn.Module | None = None
        if embed_dim is not None:
            self._make(embed_dim)

    def _make(self, embed_dim: int) -> None:
        from torchvision.models import resnet50, resnet101
        from torchvision.models.segmentation.deeplabv3 import ASPP

        dilate = [False, True, True] if self.output_stride == 8 else [False, False, True]
        factory = resnet50 if self.depth == 50 else resnet101
        named = self.weights if self.weights and not Path(self.weights).expanduser().is_file() else None
        resnet = factory(weights=named, replace_stride_with_dilation=dilate)
        if self.weights and named is None:
            from ovseg.utils.io import load_weights_file

            state = load_weights_file(self.weights, "ResNet weights file", allow_numpy=True)
            resnet.load_state_dict(state.get("state_dict", state), strict=False)
        self.body = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                  resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        rates = self.atrous_rates if self.output_stride == 8 else tuple(r // 2 for r in self.atrous_rates)
        self.head = nn.Sequential(ASPP(2048, list(rates), self.aspp_channels),
                                  nn.Conv2d(self.aspp_channels, embed_dim, 1))
        self.embed_dim = embed_dim

    def build(self, teacher) -> None:
        if self.body is None:
            self._make(teacher.embed_dim)
        elif self.embed_dim != teacher.embed_dim and not self.own_width:
            raise ValueError(f"DeepLabResNet embed_dim {self.embed_dim} differs from CLIP's {teacher.embed_dim}")
        self.input_size = teacher.input_size

    def forward(self, images01: Tensor) -> Tensor:
        return self.head(self.body((images01 - self.mean) / self.std))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": [p for p in self.body.parameters() if p.requires_grad],
                "head": [p for p in self.head.parameters() if p.requires_grad]}
