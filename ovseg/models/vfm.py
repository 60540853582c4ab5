"""Vision foundation models (VFMs) as dense feature sources: DINO, DINOv2, MAE (timm ViTs) and SAM's image encoder.

One place loads them (Hugging Face hub through timm, a local weights file, or random weights for tests) and reads
their last-layer patch features as a map ``[B, C, h, w]``, the way the training-free methods that borrow a VFM's
token similarities read them (ProxyCLIP, ``proxyclip_segmentor.py`` ``forward_feature`` of github.com/mc-lan/
ProxyCLIP; Trident):

- ``dino``: facebookresearch/dino ``vision_transformer.py`` (the ``torch.hub`` model, here timm's
  ``vit_base_patch8_224.dino`` & co., whose checkpoint keys are DINO's own): the normalised image at its own size
  (the patch embedding drops the rows/columns past whole patches), ``get_intermediate_layers(x)[0][:, 1:]`` = the
  last block through the final norm without the class token, DINO's positional-embedding resize (bicubic by
  ``scale_factor`` (grid + 0.1) / trained grid, :func:`pos_embed_resized`);
- ``dinov2``: facebookresearch/dinov2 ``dinov2_vitb14_reg`` (timm ``vit_base_patch14_reg4_dinov2.lvd142m``):
  ``get_intermediate_layers(x, reshape=True)[0]`` = the last block through the norm, patch tokens only (class and
  register tokens dropped); its positional embedding resized to the grid, bicubic, antialiased (timm's resample, the
  hub model's ``interpolate_antialias=True, interpolate_offset=0`` for the register models);
- ``mae``: ProxyCLIP's ``mae/models_vit.py`` ``vit_base_patch16(img_size=crop, global_pool=False)``
  ``forward_features`` (timm ``vit_base_patch16_224.mae``): the image resized bilinearly to ``input_size`` squared,
  the final norm on the patch tokens; the trained positional embedding resized to that grid as MAE's
  ``interpolate_pos_embed`` does when it loads a checkpoint (bicubic to the size, no antialiasing);
- ``sam``: segment-anything ``ImageEncoderViT`` (``sam_model_registry["vit_b"]``'s image encoder): the image resized
  bilinearly to ``input_size`` (1024) squared, the neck's output ``[B, 256, 64, 64]``.

Images come in ``[0, 1]`` and are normalised with ImageNet's mean/std here (ProxyCLIP un-normalises CLIP's input
and normalises it so, ``myutils.UnNormalize`` + ``transforms.Normalize``).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "VFM_FEATURES", "VFM_KINDS",
           "FrozenImageModel", "VFMConfig", "VisionFoundationModel",
           "class_token_pos_embed", "load_timm_vit", "pos_embed_resized", "vfm_features"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: kind -> (default model name, default input size: None = the image's own size)
VFM_KINDS: dict[str, tuple[str, int | None]] = {
    "dino": ("vit_base_patch8_224.dino", None),
    "dinov2": ("vit_base_patch14_reg4_dinov2.lvd142m", None),
    "mae": ("vit_base_patch16_224.mae", 336),
    "sam": ("vit_b", 1024),
}
#: what :class:`VisionFoundationModel` reads: the last-layer tokens or the last block's attention q / k / v
VFM_FEATURES = ("tokens", "q", "k", "v")
#: how a ViT's trained positional embedding reaches another grid
POS_EMBED_RULES = ("dino", "mae", "timm")
#: segment-anything ``build_sam.py`` image-encoder settings per registry name (the rest are ImageEncoderViT's
#: defaults plus ``norm_layer=LayerNorm(eps=1e-6)``, ``use_rel_pos=True``, ``window_size=14``, ``out_chans=256``)
SAM_ENCODERS: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}


@dataclass
class VFMConfig:
    """Which vision foundation model and how its features are read.

    Args:
        kind: ``dino``, ``dinov2``, ``mae`` or ``sam`` (see the module docstring).
        name: the timm model name (``dino``/``dinov2``/``mae``) or segment-anything registry name (``sam``:
            ``vit_b``/``vit_l``/``vit_h``); None: the kind's default (DINO ViT-B/8, DINOv2 ViT-B/14 reg4, MAE
            ViT-B/16, SAM ViT-B).
        weights: ``"hub"`` (timm downloads or reads its Hugging Face cache; not for SAM, which has no hub entry), a
            local weights file (timm's, the original DINO/MAE checkpoint (MAE's ``{"model": ...}`` too), or SAM's
            ``sam_vit_b_01ec64.pth``: the image encoder's tensors are taken), or None for random weights (tests).
        input_size: the square side the image is resized to before the VFM (``sam``: 1024, ``mae``: the window,
            336); None: the image's own size (``dino``/``dinov2``). None for ``sam``/``mae`` takes the kind's default.
        pos_embed_interpolation: ``dino`` / ``mae`` / ``timm`` (see :func:`pos_embed_resized`); None: the kind's
            reference rule (DINO's for ``dino``, MAE's for ``mae``, timm's antialiased resample for ``dinov2``).
        precision: ``fp32`` or ``fp16`` (ProxyCLIP runs the VFM in ``.half()`` on a GPU).
        model_kwargs: extra ``timm.create_model`` arguments, or ``ImageEncoderViT`` arguments for ``sam`` (tiny test
            models: ``{depth: 1, embed_dim: 32, num_heads: 2}``).
        features: ``tokens`` (the last block's output through the final norm) or ``q`` / ``k`` / ``v``: the last
            block's attention queries / keys / values of its normed input, heads concatenated (LPOSS's
            ``extract_feats``: a hook on ``blocks[-1].attn.qkv``; timm ViTs only).
    """

    kind: str = "dino"
    name: str | None = None
    weights: str | None = "hub"
    input_size: int | None = None
    pos_embed_interpolation: str | None = None
    precision: str = "fp32"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    features: str = "tokens"

    def __post_init__(self) -> None:
        if self.features not in VFM_FEATURES:
            raise ValueError(f"VFMConfig.features must be one of {VFM_FEATURES}, got {self.features!r}")
        if self.features != "tokens" and self.kind == "sam":
            raise ValueError(f"VFMConfig.features={self.features!r} needs a timm ViT (dino, dinov2, mae), not sam")
        if self.kind not in VFM_KINDS:
            raise ValueError(f"VFMConfig.kind must be one of {sorted(VFM_KINDS)}, got {self.kind!r}")
        if self.pos_embed_interpolation is not None and self.pos_embed_interpolation not in POS_EMBED_RULES:
            raise ValueError(f"VFMConfig.pos_embed_interpolation must be one of {POS_EMBED_RULES} or None, got "
                             f"{self.pos_embed_interpolation!r}")
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"VFMConfig.precision must be 'fp32' or 'fp16', got {self.precision!r}")
        if self.kind == "sam" and self.weights == "hub":
            raise ValueError("SAM has no hub weights in ovseg: give VFMConfig.weights a local checkpoint "
                             "(sam_vit_b_01ec64.pth) or None (random)")
        if self.input_size is not None and self.input_size < 1:
            raise ValueError(f"VFMConfig.input_size must be positive, got {self.input_size}")

    @property
    def model_name(self) -> str:
        return self.name or VFM_KINDS[self.kind][0]

    @property
    def resize_to(self) -> int | None:
        """The square side the image is resized to (None: its own size)."""
        return self.input_size if self.input_size is not None else VFM_KINDS[self.kind][1]

    @property
    def pos_embed_rule(self) -> str:
        return self.pos_embed_interpolation or {"dino": "dino", "mae": "mae"}.get(self.kind, "timm")


def pos_embed_resized(pos_embed: Tensor, trained: tuple[int, int], grid: tuple[int, int], rule: str) -> Tensor:
    """A ViT's patch positional embedding ``[1, gh*gw, C]`` (trained grid ``trained``) on ``grid``, in float32:

    - ``dino``: facebookresearch/dino ``interpolate_pos_encoding``: bicubic by ``scale_factor`` (grid + 0.1) /
      trained (the scale itself sets the sampling positions), not to a size; unchanged on the trained square grid;
    - ``mae``: MAE's ``pos_embed.interpolate_pos_embed``: bicubic to the size, ``align_corners=False``, no antialias;
    - ``timm``: timm's ``resample_abs_pos_embed`` (bicubic to the size, antialiased; DINOv2's register models).
    """
    if tuple(grid) == tuple(trained):
        return pos_embed
    channels = pos_embed.shape[-1]
    patch_pos = pos_embed.float().reshape(1, *trained, channels).permute(0, 3, 1, 2)
    if rule == "dino":
        patch_pos = F.interpolate(patch_pos, scale_factor=((grid[0] + 0.1) / trained[0], (grid[1] + 0.1) / trained[1]),
                                  mode="bicubic")
    elif rule == "mae":
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
    elif rule == "timm":
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    else:
        raise ValueError(f"positional-embedding rule must be one of {POS_EMBED_RULES}, got {rule!r}")
    if tuple(patch_pos.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"{rule} positional-embedding resize gave {tuple(patch_pos.shape[-2:])}, expected {grid}")
    return patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], channels).to(pos_embed.dtype)


def class_token_pos_embed(vit: nn.Module, x: Tensor, rule: str) -> Tensor:
    """timm ``VisionTransformer._pos_embed`` for one-class-token ViTs (DINO, MAE): patch tokens [B, h, w, C] ->
    class token + patches with the positional embedding added, resized by ``rule`` (:func:`pos_embed_resized`)."""
    batch, h, w, channels = x.shape
    pos = vit.pos_embed
    side = math.isqrt(pos.shape[1] - 1)
    patch_pos = pos_embed_resized(pos[:, 1:], (side, side), (h, w), rule)
    x = torch.cat([vit.cls_token.expand(batch, -1, -1), x.reshape(batch, h * w, channels)], dim=1)
    return vit.pos_drop(x + torch.cat([pos[:, :1], patch_pos], dim=1))


def load_timm_vit(name: str, weights: str | None, model_kwargs: dict[str, Any] | None = None,
                  pos_embed_interpolation: str = "timm", what: str = "ViT") -> nn.Module:
    """A timm ViT, frozen, in eval mode, taking any image size (``dynamic_img_size``): random (``weights=None``),
    from the hub (``"hub"``) or from a local ``.pth``/``.safetensors`` file (timm's, or the original DINO/MAE
    checkpoint, converted by timm's own loader). ``pos_embed_interpolation`` ``dino``/``mae`` replaces timm's
    positional-embedding resize with that rule (:func:`pos_embed_resized`); ``what`` names the model in errors."""
    import timm

    kwargs = dict(num_classes=0, dynamic_img_size=True, **(model_kwargs or {}))
    if weights is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif weights == "hub":
        model = timm.create_model(name, pretrained=True, **kwargs)
    else:
        path = Path(weights).expanduser()
        if path.suffix != ".safetensors":  # a pickle: refuse one that would run code before timm reads it
            from ovseg.utils.io import load_weights_file

            load_weights_file(path, f"{what} weights file", allow_numpy=True, mmap=True)
        elif not path.is_file():
            raise FileNotFoundError(f"{what} weights file not found: {path}")
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except RuntimeError as err:
            raise ValueError(f"{path}: not weights of the {what} model {name}: "
                             f"{str(err).strip().splitlines()[0][:300]}") from None
    model.requires_grad_(False).eval()
    if pos_embed_interpolation in ("dino", "mae"):
        if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "no_embed_class", False):
            raise NotImplementedError(f"pos_embed_interpolation={pos_embed_interpolation!r} needs a ViT with one "
                                      f"class token ({name} has another layout)")
        rule = pos_embed_interpolation
        model._pos_embed = types.MethodType(lambda vit, x: class_token_pos_embed(vit, x, rule), model)
    elif pos_embed_interpolation != "timm":
        raise ValueError(f"pos_embed_interpolation must be one of {POS_EMBED_RULES}, got {pos_embed_interpolation!r}")
    return model


def _sam_image_encoder(name: str, weights: str | None, model_kwargs: dict[str, Any], input_size: int) -> nn.Module:
    """segment-anything's ``ImageEncoderViT`` as ``build_sam.py`` builds it for ``name``, for ``input_size`` squared
    inputs (its ``img_size``; 1024 is SAM's), ``model_kwargs`` overriding its settings (tiny test encoders), with
    the image-encoder tensors of a SAM checkpoint when ``weights`` is one."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    if name not in SAM_ENCODERS:
        raise ValueError(f"SAM image encoder must be one of {sorted(SAM_ENCODERS)}, got {name!r}")
    settings = dict(img_size=input_size, patch_size=16, mlp_ratio=4, qkv_bias=True, use_rel_pos=True, window_size=14,
                    out_chans=256, norm_layer=partial(nn.LayerNorm, eps=1e-6), **SAM_ENCODERS[name])
    settings.update(model_kwargs)
    settings["global_attn_indexes"] = tuple(i for i in settings["global_attn_indexes"] if i < settings["depth"])
    encoder = ImageEncoderViT(**settings)
    if weights is not None:
        from ovseg.utils.io import load_weights_file

        state = load_weights_file(Path(weights).expanduser(), "SAM weights file", allow_numpy=True)
        prefix = "image_encoder."
        if any(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        try:
            encoder.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{weights}: not weights of the SAM image encoder {name}: "
                             f"{str(err).strip().splitlines()[0][:300]}") from None
    return encoder.requires_grad_(False).eval()


class FrozenImageModel(nn.Module):
    """A frozen image model (``model``, kept in eval mode) reading ImageNet-normalised images: the ``mean``/``std``
    buffers and the ``patch_size`` (a timm ViT's, unless given) its users share."""

    def __init__(self, model: nn.Module, patch_size: int | None = None):
        super().__init__()
        self.model = model
        if patch_size is None:
            patch = model.patch_embed.patch_size
            patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.patch_size = int(patch_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self


class VisionFoundationModel(FrozenImageModel):
    """A frozen VFM: images in [0, 1] ``[B, 3, H, W]`` -> last-layer patch features ``[B, C, h, w]``
    (:meth:`forward`; see the module docstring for what each kind reads)."""

    def __init__(self, config: VFMConfig | None = None):
        """The VFM loaded.

        Args:
            config: which VFM and how its features are read (None: :class:`VFMConfig`'s defaults, DINO ViT-B/8).
        """
        config = config or VFMConfig()
        if config.kind == "sam":
            model = _sam_image_encoder(config.model_name, config.weights, config.model_kwargs, config.resize_to)
            super().__init__(model, int(model.patch_embed.proj.kernel_size[0]))
        else:
            weights = config.weights
            if config.kind == "mae" and weights not in (None, "hub"):
                weights = _mae_weights_file(Path(weights).expanduser())
            super().__init__(load_timm_vit(config.model_name, weights, config.model_kwargs, config.pos_embed_rule,
                                           what=config.kind.upper() if config.kind != "dinov2" else "DINOv2"))
        self.config = config
        if config.precision == "fp16":
            self.model.half()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The feature grid of a ``height``×``width`` image."""
        side = self.config.resize_to
        if side is not None:
            height = width = side
        return height // self.patch_size, width // self.patch_size

    def normalize(self, images01: Tensor) -> Tensor:
        """[0, 1] images -> ImageNet-normalised, in the VFM's precision."""
        return ((images01.float() - self.mean) / self.std).to(self.dtype)

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        return self.features_of_normalized(self.normalize(images01))

    @torch.no_grad()
    def features_of_normalized(self, x: Tensor) -> Tensor:
        """ImageNet-normalised images -> features ``[B, C, h, w]`` (the resize to ``input_size`` happens here)."""
        side = self.config.resize_to
        if side is not None:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if self.config.kind == "sam":
            return self.model(x)
        # the patch embedding's convolution drops rows/columns past whole patches (DINO's hub model does so itself)
        x = x[..., :h * self.patch_size, :w * self.patch_size]
        if self.config.features == "tokens":
            tokens = self.model.forward_features(x)
        else:
            tokens = self._last_attention_projection(x, "qkv".index(self.config.features))
        tokens = tokens[:, getattr(self.model, "num_prefix_tokens", 1):]
        return tokens.transpose(1, 2).reshape(len(x), -1, h, w)

    def _last_attention_projection(self, x: Tensor, part: int) -> Tensor:
        """The last block's ``attn.qkv`` output's ``part`` (0 q, 1 k, 2 v) [B, T, C], heads concatenated, read by a
        forward hook as LPOSS's ``extract_feats`` reads DINO's (``models/lposs/lposs.py``)."""
        captured: list[Tensor] = []
        hook = self.model.blocks[-1].attn.qkv.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self.model.forward_features(x)
        finally:
            hook.remove()
        channels = captured[0].shape[-1] // 3
        return captured[0][..., part * channels:(part + 1) * channels]


def _mae_weights_file(path: Path) -> str:
    """MAE's released checkpoints hold ``{"model": state_dict, ...}``; timm's loader reads the state dict itself, so
    such a file is unwrapped once into ``<name>.state_dict.pth`` beside it (or in a temporary folder when that one is
    read-only)."""
    from ovseg.utils.io import load_weights_file

    if path.suffix == ".safetensors":
        return str(path)
    content = load_weights_file(path, "MAE weights file", allow_numpy=True, mmap=True)
    if not (isinstance(content, dict) and "model" in content and isinstance(content["model"], dict)):
        return str(path)
    target = path.with_name(path.stem + ".state_dict.pth")
    try:
        if not target.is_file():
            torch.save(content["model"], target)
    except OSError:
        import tempfile

        target = Path(tempfile.mkdtemp(prefix="ovseg-mae-")) / target.name
        torch.save(content["model"], target)
    return str(target)


def vfm_features(model: VisionFoundationModel, images01: Tensor) -> Tensor:
    """``model(images01)``: last-layer patch features ``[B, C, h, w]`` of [0, 1] images (a function for callers that
    hold the model elsewhere)."""
    return model(images01)
