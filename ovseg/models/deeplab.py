"""DeepLab-style ResNet pixel-embedding backbones (torchvision ResNet blocks, dilated, an ASPP head, output in the
CLIP joint dimension) — the family used by MaskCLIP+ and SegSort/HSG. Two named heads:

- ``head: aspp_v3`` (default): torchvision's DeepLab-v3 ASPP (``aspp_channels``, rates 12/24/36 at stride 8) and a
  1x1 projection to the CLIP dimension. A CLIP-S4 backbone option::

    backbone: {class_path: ovseg.models.deeplab.DeepLabResNet, init_args: {depth: 101, weights: IMAGENET1K_V2}}

- ``head: aspp_v2``: DeepLab-v2's ASPP as MaskCLIP+ runs it (MaskCLIP ``mmseg/models/decode_heads/aspp_headv2.py``
  ``ASPPHeadV2``): one 3x3 conv per rate (6/12/18/24), each conv -> BN -> ReLU (mmcv ``ConvModule`` with a norm:
  no conv bias), the branches summed; its width is the CLIP dimension, so no projection follows.

``stem: deep`` is mmseg's ResNet-V1c stem (three 3x3 convs, 32-32-64 channels at width 64; MaskCLIP+'s
``ResNetV1c``) instead of torchvision's 7x7 conv. Dilation follows mmseg's ``contract_dilation=True`` (also what
torchvision's ``replace_stride_with_dilation`` does): the first block of a dilated stage runs at half its rate.

``weights``: None (random, tests), a torchvision weights name (``IMAGENET1K_V1``/``IMAGENET1K_V2``; needs
them in the torch hub cache when offline) or a local ``.pth`` state-dict file of the ResNet — torchvision names, or
an mmseg/mmcv ResNet-V1c checkpoint (``open-mmlab://resnet50_v1c``: ``stem.*`` / ``layerN.*``, an optional
``backbone.`` prefix), as MaskCLIP+ starts from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ovseg.models.backbone import Backbone

__all__ = ["DeepLabResNet", "ASPPv2", "deep_stem", "dilate_resnet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEPTHS = (18, 34, 50, 101)
STEMS = ("torchvision", "deep")
HEADS = ("aspp_v3", "aspp_v2")


class ASPPv2(nn.Module):
    """DeepLab-v2 ASPP (MaskCLIP ``aspp_headv2.py`` ``ASPPModuleV2`` + ``ASPPHeadV2.forward_module``): one
    conv -> BN -> ReLU branch per dilation (3x3, padding = dilation; 1x1 for dilation 1), outputs summed."""

    def __init__(self, in_channels: int, channels: int, dilations: tuple[int, ...] = (6, 12, 18, 24)):
        """The ASPP branches.

        Args:
            in_channels: input width (the ResNet's last stage).
            channels: output width of every branch (and of the sum).
            dilations: one branch per dilation rate.
        """
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, channels, 1 if d == 1 else 3, padding=0 if d == 1 else d,
                                    dilation=d, bias=False),
                          nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
            for d in dilations)
        for branch in self.branches:  # mmcv ConvModule.init_weights: kaiming normal (fan_out, relu); BN 1 / 0
            nn.init.kaiming_normal_(branch[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return sum(branch(x) for branch in self.branches)


def deep_stem(channels: int = 64) -> nn.Sequential:
    """mmseg ResNet-V1c's stem (``ResNetV1c``: ``deep_stem=True``): 3x3 convs stride 2, 1, 1 to ``channels // 2``,
    ``channels // 2``, ``channels``, each -> BN -> ReLU. Indices 0/1, 3/4, 6/7 are mmseg's ``stem.*`` names."""
    half = channels // 2
    layers: list[nn.Module] = []
    for cin, cout, stride in ((3, half, 2), (half, half, 1), (half, channels, 1)):
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
    for module in layers:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(*layers)


def _dilate_stage(stage: nn.Sequential, dilation: int) -> None:
    """A stride-2 stage -> stride 1 at ``dilation`` (contract_dilation: its first block at ``dilation // 2``). The
    block's first 3x3 conv carries the stride and the dilation (mmseg's BasicBlock and pytorch-style Bottleneck;
    torchvision's BasicBlock refuses dilation at construction, so it is set here on the built convs)."""
    for index, block in enumerate(stage):
        rate = max(1, dilation // 2) if index == 0 else dilation
        first = next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
        first.stride, first.dilation, first.padding = (1, 1), (rate, rate), (rate, rate)
        downsample = getattr(block, "downsample", None)
        if downsample is not None:
            downsample[0].stride = (1, 1)


def dilate_resnet(resnet: nn.Module, output_stride: int) -> None:
    """A torchvision ResNet (built with strides) -> output stride 8 (layer3 at rate 2, layer4 at 4) or 16 (layer4 at
    rate 2), in place."""
    stages = {8: ((resnet.layer3, 2), (resnet.layer4, 4)), 16: ((resnet.layer4, 2),)}[output_stride]
    for stage, rate in stages:
        _dilate_stage(stage, rate)


def _narrow(resnet: nn.Module, width: int) -> None:
    """Rebuild a torchvision ResNet's stem and stages at base width ``width`` (64 is torchvision's) with its own
    ``_make_layer``, initialised as torchvision initialises them."""
    block = type(resnet.layer1[0])
    counts = [len(stage) for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)]
    resnet.inplanes = width
    resnet.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    resnet.bn1 = nn.BatchNorm2d(width)
    for i, count in enumerate(counts):
        setattr(resnet, f"layer{i + 1}", resnet._make_layer(block, width * 2**i, count, stride=1 if i == 0 else 2))
    for module in resnet.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _resnet_state(path: Path) -> dict[str, Tensor]:
    """A local ResNet checkpoint in torchvision names: mmseg/mmcv ``backbone.`` prefix dropped, ``stem.*`` -> the
    deep stem's place (``conv1.*``)."""
    from ovseg.utils.io import load_weights_file

    state = load_weights_file(path, "ResNet weights file", allow_numpy=True)
    state = state.get("state_dict", state)
    out = {}
    for key, value in state.items():
        key = key.removeprefix("backbone.")
        out["conv1." + key[len("stem."):] if key.startswith("stem.") else key] = value
    return out


class DeepLabResNet(Backbone):
    """
    Args:
        depth: 18, 34, 50 or 101.
        output_stride: 8 (layer3 and layer4 dilated) or 16 (layer4 dilated).
        weights: see the module doc.
        aspp_channels / atrous_rates: the ASPP head (``aspp_v3``: 256, rates 12/24/36 at stride 8; ``aspp_v2`` uses
            the rates as they are, 6/12/18/24 in MaskCLIP+, and the CLIP dimension as its width).
        embed_dim: output width; None takes the CLIP joint dimension from the teacher at ``build``.
        stem: ``torchvision`` (7x7 conv) or ``deep`` (mmseg ResNet-V1c, MaskCLIP+'s student).
        head: ``aspp_v3`` (ASPP + 1x1 projection) or ``aspp_v2`` (DeepLab-v2, MaskCLIP+'s ``ASPPHeadV2``).
        base_width: channels of the first stage (64; smaller for toy students).
        own_width: ``embed_dim`` may differ from the teacher's (a model trained without CLIP losses, e.g.
            SegSort's 32-dimensional embeddings); otherwise ``build`` refuses a mismatch.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, depth: int = 101, output_stride: int = 8, weights: str | None = None,
                 aspp_channels: int = 256, atrous_rates: tuple[int, ...] = (12, 24, 36), embed_dim: int | None = None,
                 stem: str = "torchvision", head: str = "aspp_v3", base_width: int = 64,
                 own_width: bool = False):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"DeepLabResNet depth must be one of {DEPTHS}, got {depth}")
        if output_stride not in (8, 16):
            raise ValueError(f"DeepLabResNet output_stride must be 8 or 16, got {output_stride}")
        if stem not in STEMS:
            raise ValueError(f"DeepLabResNet stem must be one of {STEMS}, got {stem!r}")
        if head not in HEADS:
            raise ValueError(f"DeepLabResNet head must be one of {HEADS}, got {head!r}")
        if base_width != 64 and weights:
            raise ValueError(f"DeepLabResNet base_width {base_width}: pretrained ResNet weights need base_width 64")
        self.depth, self.output_stride, self.weights = depth, output_stride, weights
        self.aspp_channels, self.atrous_rates, self.embed_dim = aspp_channels, tuple(atrous_rates), embed_dim
        self.stem, self.head_kind, self.base_width = stem, head, base_width
        self._settings = dict(depth=depth, output_stride=output_stride, weights=weights, aspp_channels=aspp_channels,
                              atrous_rates=list(atrous_rates), embed_dim=embed_dim, stem=stem, head=head,
                              base_width=base_width)
        self.own_width = own_width
        if own_width:
            self._settings["own_width"] = True
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.body: nn.Module | None = None
        self.head: nn.Module | None = None
        if embed_dim is not None:
            self._make(embed_dim)

    def _make(self, embed_dim: int) -> None:
        from torchvision import models
        from torchvision.models.segmentation.deeplabv3 import ASPP

        named = self.weights if self.weights and not Path(self.weights).expanduser().is_file() else None
        if named and (named.endswith((".pth", ".pt", ".bin")) or "/" in named):
            raise FileNotFoundError(f"DeepLabResNet weights: no such file {named}")
        if named and self.stem == "deep":
            raise ValueError(f"DeepLabResNet stem 'deep': torchvision's {named} weights are for its 7x7 stem; give an "
                             f"mmseg ResNet-V1c checkpoint file instead")
        resnet = getattr(models, f"resnet{self.depth}")(weights=named)
        if self.base_width != 64:
            _narrow(resnet, self.base_width)
        if self.stem == "deep":
            resnet.conv1, resnet.bn1, resnet.relu = deep_stem(self.base_width), nn.Identity(), nn.Identity()
        dilate_resnet(resnet, self.output_stride)
        if self.weights and named is None:
            resnet.load_state_dict(_resnet_state(Path(self.weights).expanduser()), strict=False)
        self.body = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                  resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        channels = resnet.fc.in_features if self.base_width == 64 else self.base_width * 8 * (
            4 if self.depth >= 50 else 1)
        if self.head_kind == "aspp_v2":
            self.head = ASPPv2(channels, embed_dim, self.atrous_rates)
        else:
            rates = self.atrous_rates if self.output_stride == 8 else tuple(r // 2 for r in self.atrous_rates)
            self.head = nn.Sequential(ASPP(channels, list(rates), self.aspp_channels),
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
