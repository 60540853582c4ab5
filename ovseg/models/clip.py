"""Dense CLIP image features on top of open_clip (and, optionally, Hugging Face ``transformers``).

``DenseCLIP`` wraps an unmodified open_clip model (or a transformers ``CLIPModel``) and adds a dense path:
one projected feature vector per patch (ViT) or per output pixel (ConvNeXt, CLIP ResNet), in the CLIP joint embedding
space. For CLIP's ResNets (``RN50`` …, open_clip's ``ModifiedResNet``) the dense path is MaskCLIP's: the attention
pool's value and output projections applied to every position as 1×1 convolutions, the pooling itself skipped.
For ViTs every block but the last runs unchanged; the last block is re-expressed as a function over that
block's own modules and weights so MaskCLIP / PixelCLIP / SCLIP-style variants can be selected by config
(``last_block``, ``residual``, ``ffn``) without vendoring open_clip.

Tiny random configs (``tiny-vit``, ``tiny-convnext``) for tests and CI live in ``ovseg/models/configs`` and are
registered with open_clip on import of this module; loading weights (tags, files, shipped weights, transformers
folders, tokenizers) is :mod:`ovseg.models.clip_loading`.
"""

from __future__ import annotations

import copy
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, get_args

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from ovseg.models.attention import AttentionFn, AttentionTokens, get_attention
from ovseg.models.clip_loading import (
    HF_PREFIX,
    check_open_clip_resnet,
    check_open_clip_vit,
    check_timm,
    hf_tokenizer,
    load_hf,
    load_open_clip,
)

__all__ = [
    "CLIPConfig",
    "DenseCLIP",
    "DenseOptions",
    "LastStage",
    "TransformerBlockView",
    "dense_last_block",
    "resize_positional_embedding",
    "RESIDUALS",
]

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)
# a Literal lets LightningCLI/jsonargparse validate the choice at parse time and list it in --help; the last-block
# attention is an open registry instead (ovseg.models.attention), validated when the config is built
Residual = Literal["token", "cls", "none"]
RESIDUALS: tuple[str, ...] = get_args(Residual)
TEXT_BATCH = 256
#: a replacement of the last ViT block that reads every earlier block's output (SC-CLIP's self-calibration,
#: :mod:`ovseg.methods.scclip`): ``(hidden, last, grid) -> tokens [B, 1+N, C]`` before ``ln_post``, where ``hidden``
#: holds the outputs ``[B, 1+N, C]`` of blocks ``0 … L-2`` (the last one is the last block's input)
LastStage = Callable[[list[Tensor], "TransformerBlockView", tuple[int, int]], Tensor]
@dataclass
class CLIPConfig:
    """Which CLIP to load and how its last ViT block produces dense features.

    Args:
        name: an open_clip model name (including ``tiny-vit`` / ``tiny-convnext``), ``"local-dir:/path"``
            (open_clip folder schema), ``"hf-hub:org/repo"``, or ``"hf:/path"`` (a transformers ``CLIPModel``
            saved with ``save_pretrained``).
        pretrained: an open_clip tag (``openai``, ``laion2b_s34b_b79k`` …), a local weights file, or None for random
            init. Ignored for the folder/hub schemas.
        cache_dir: where open_clip / the hub keep downloaded weights (None: their default cache).
        last_block: the last block's attention, a name registered in :mod:`ovseg.models.attention` (``vanilla``:
            unchanged; ``value``: MaskCLIP/PixelCLIP, v -> out_proj, q·k skipped; ``qq_kk``: SCLIP; ``qq``: ClearCLIP;
            ``kk``; ``naclip`` once :mod:`ovseg.methods.naclip` is imported; ``ovseg list attentions``) or
            ``"module:function"``.
        residual: the last block's attention residual: ``token`` (each token's own input), ``cls`` (the class token's
            input, broadcast; PixelCLIP) or ``none`` (SCLIP/ClearCLIP).
        ffn: keep the last block's MLP (``x + mlp(ln_2(x))``).
        precision: open_clip precision (``fp32``, ``fp16``, ``bf16``, ``amp`` …).
        quick_gelu: None follows the pretrained tag (OpenAI weights need QuickGELU); set True when loading OpenAI
            weights from a file under a plain name such as ``ViT-B-16``.
    """

    name: str = "ViT-B-16"
    pretrained: str | None = "openai"
    cache_dir: str | None = None
    last_block: str = "vanilla"
    residual: Residual = "token"
    ffn: bool = True
    precision: str = "fp32"
    quick_gelu: bool | None = None

    def __post_init__(self) -> None:
        get_attention(self.last_block)  # raises, listing the registered names
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")


# --------------------------------------------------------------------------------------------------------------
# ViT building blocks shared by the open_clip and transformers back-ends
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerBlockView:
    """The modules and weights of one pre-norm transformer block, independent of the library that built it.

    The q/k/v weights are views (open_clip keeps them fused in ``in_proj_weight``), so gradients reach the
    original parameters.
    """

    ln_1: nn.Module
    q_weight: Tensor
    q_bias: Tensor | None
    k_weight: Tensor
    k_bias: Tensor | None
    v_weight: Tensor
    v_bias: Tensor | None
    out_proj: nn.Module
    num_heads: int
    ls_1: nn.Module
    ln_2: nn.Module
    mlp: nn.Module
    ls_2: nn.Module

    @classmethod
    def from_open_clip(cls, block: ResidualAttentionBlock) -> TransformerBlockView:
        attn = block.attn
        q_w, k_w, v_w = attn.in_proj_weight.chunk(3)
        q_b, k_b, v_b = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
        return cls(block.ln_1, q_w, q_b, k_w, k_b, v_w, v_b, attn.out_proj, attn.num_heads,
                   block.ls_1, block.ln_2, block.mlp, block.ls_2)

    @classmethod
    def from_hf(cls, layer: nn.Module) -> TransformerBlockView:
        attn = layer.self_attn
        return cls(layer.layer_norm1, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
                   attn.v_proj.weight, attn.v_proj.bias, attn.out_proj, attn.num_heads,
                   nn.Identity(), layer.layer_norm2, layer.mlp, nn.Identity())


def _merge_heads(x: Tensor) -> Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def dense_last_block(
    x: Tensor, block: TransformerBlockView, last_block: str | AttentionFn = "vanilla", residual: str = "token",
    ffn: bool = True, grid: tuple[int, int] | None = None,
) -> Tensor:
    """Run the last ViT block on tokens ``x`` [B, 1+N, C] (class token first) in one of the dense variants.

    ``last_block`` names a registered attention (:mod:`ovseg.models.attention`) or is one (a method whose attention
    reads more than the block's tokens, e.g. ResCLIP's earlier-block maps, passes a closure); ``grid`` is the patch
    grid (rows, cols), needed by attentions that look at token positions (a square grid is assumed when omitted).
    ``vanilla`` + ``token`` + ``ffn`` is exactly the block's normal forward.
    """
    attention = get_attention(last_block) if isinstance(last_block, str) else last_block
    if grid is None:
        side = math.isqrt(x.shape[1] - 1)
        if side * side != x.shape[1] - 1:
            raise ValueError(f"{x.shape[1] - 1} patch tokens are not a square grid: pass grid=(rows, cols)")
        grid = (side, side)
    tokens = AttentionTokens(block.ln_1(x), block, grid)
    attended = _merge_heads(attention(tokens))
    attn_out = block.ls_1(block.out_proj(attended))

    if residual == "token":
        x = x + attn_out
    elif residual == "cls":
        x = x[:, :1] + attn_out
    elif residual == "none":
        x = attn_out
    else:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")

    if ffn:
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x


def resize_positional_embedding(
    positional_embedding: Tensor, trained_grid: tuple[int, int], grid: tuple[int, int], interpolation: str = "grid"
) -> Tensor:
    """Bicubically resize a ViT positional embedding [1+gh*gw, C] (class position first) to ``grid``.

    ``interpolation="grid"`` resizes to the grid's size; ``"sclip"`` follows SCLIP/NACLIP (``clip/model.py``,
    ``interpolate_pos_encoding``): ``scale_factor=(side + 0.1) / trained_side`` without recomputing the scale, so
    source coordinates are spaced by that factor, not by ``trained/side`` (other values for any grid but the
    trained one). The class-token position is kept as is. At the trained grid the input is returned unchanged.
    """
    trained_grid, grid = tuple(trained_grid), tuple(grid)
    if grid == trained_grid:
        return positional_embedding
    class_pos, patch_pos = positional_embedding[:1], positional_embedding[1:]
    width = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, *trained_grid, width).permute(0, 3, 1, 2)
    # bicubic is not implemented for half precision on every device; interpolate in fp32
    if interpolation == "grid":
        patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False)
    elif interpolation == "sclip":
        scale = tuple((g + 0.1) / t for g, t in zip(grid, trained_grid))
        patch_pos = F.interpolate(patch_pos.float(), scale_factor=scale, mode="bicubic", align_corners=False,
                                  recompute_scale_factor=False)
        if tuple(patch_pos.shape[-2:]) != grid:
            raise RuntimeError(f"sclip positional-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, "
                               f"expected {grid}")
    else:
        raise ValueError(f"positional-embedding interpolation must be 'grid' or 'sclip', got {interpolation!r}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width).to(positional_embedding.dtype)
    return torch.cat([class_pos, patch_pos], dim=0)


@dataclass(frozen=True)
class DenseOptions:
    """How a protocol asks the dense path to read images (see ``ovseg.eval.protocols.ProtocolSettings``, where
    each setting is documented with the reference code it reproduces). The defaults are the model as loaded."""

    normalization: str = "model"  # "model" | "imagenet"
    patch_padding: str = "none"  # "none" | "corner"
    pos_embed_interpolation: str = "grid"  # "grid" | "sclip"
    vision_activation: str = "model"  # "model" | "gelu"
    vision_ln_eps: float | None = None
    text_precision: str = "model"  # "model" | "fp16"
    text_ensemble_precision: str = "fp32"  # "fp32" | "text" (read by TextBank)


def mlp_activation_name(mlp: nn.Module) -> str:
    """The attribute holding a ViT MLP's activation: open_clip ``gelu``, transformers ``activation_fn``."""
    for name in ("gelu", "activation_fn"):
        if hasattr(mlp, name):
            return name
    raise NotImplementedError(f"cannot find the activation of MLP {type(mlp).__name__}")


# --------------------------------------------------------------------------------------------------------------
# DenseCLIP
# --------------------------------------------------------------------------------------------------------------


class DenseCLIP(nn.Module):
    """A CLIP model with a dense image path.

    Attributes: ``model`` (the wrapped open_clip model or transformers ``CLIPModel``), ``kind``
    (``"vit"``, ``"timm"``, ``"resnet"`` or ``"hf_vit"``), ``mean``/``std`` ([1,3,1,1] buffers), ``patch_size`` (ViT
    patch, ConvNeXt or ResNet total stride), ``input_size`` (trained image size), ``embed_dim`` and ``weights_id``;
    ``last_stage`` (a :data:`LastStage`, None: :func:`dense_last_block` as the config says), set by a method whose
    last block reads the earlier blocks' outputs.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, config: CLIPConfig | None = None) -> None:
        """The CLIP loaded.

        Args:
            config: which CLIP and its last block (None: :class:`CLIPConfig`'s defaults).
        """
        super().__init__()
        self.config = config = config if config is not None else CLIPConfig()
        self._tokenizer: Callable[[list[str]], Tensor] | None = None
        self._pos_cache: dict[tuple, Tensor] = {}
        self.last_stage: LastStage | None = None

        if config.name.startswith(HF_PREFIX):
            self._hf_folder = Path(config.name[len(HF_PREFIX):]).expanduser()
            self.model, self.weights_id, mean, std = load_hf(str(self._hf_folder), config.precision)
            vision = self.model.config.vision_config
            self.kind = "hf_vit"
            self.patch_size = int(vision.patch_size)
            self.input_hw = (int(vision.image_size), int(vision.image_size))
            self.embed_dim = int(self.model.config.projection_dim)
        else:
            self.model, self.weights_id = load_open_clip(config)
            visual = self.model.visual
            preprocess = open_clip.get_model_preprocess_cfg(self.model)
            mean, std = preprocess["mean"], preprocess["std"]
            image_size = visual.image_size
            self.input_hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            if isinstance(visual, VisionTransformer):
                check_open_clip_vit(visual)
                self.kind = "vit"
                self.patch_size = int(visual.patch_size[0])
                self.embed_dim = int(visual.proj.shape[1])
            elif isinstance(visual, ModifiedResNet):
                check_open_clip_resnet(visual)
                self.kind = "resnet"
                self.patch_size = 32  # total stride of the stem and the four stages
                self.embed_dim = int(visual.attnpool.c_proj.out_features)
            elif isinstance(visual, TimmModel):
                check_timm(visual)
                self.kind = "timm"
                self.patch_size = int(visual.trunk.feature_info[-1]["reduction"])
                # the last linear layer of the projection head (open_clip's, else timm's own fc) sets the width
                linears = [m for m in visual.head.modules() if isinstance(m, nn.Linear)]
                self.embed_dim = int((linears[-1] if linears else visual.trunk.head.fc).out_features)
            else:
                raise NotImplementedError(f"dense features for {type(visual).__name__} towers are not supported")

        self.input_size = self.input_hw[0]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # the same constants on the 0-255 scale, rounded once from float64 (detectron2 configs state them so)
        self.register_buffer("mean_255", (torch.tensor(mean, dtype=torch.float64) * 255).float().view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std_255", (torch.tensor(std, dtype=torch.float64) * 255).float().view(1, 3, 1, 1),
                             persistent=False)
        self.options = DenseOptions()
        # what the protocol options replace, kept to put back (plain lists of the modules themselves, so a deepcopy
        # of this model, e.g. an EMA teacher, keeps consistent references): (mlp, attribute, activation), (LN, eps)
        self._activations = [(mlp, name, getattr(mlp, name)) for mlp in self._vision_mlps()
                             for name in [mlp_activation_name(mlp)]]
        self._layer_norms = [(m, m.eps) for m in self._vision_tower().modules() if isinstance(m, nn.LayerNorm)]

    # ---- public API ------------------------------------------------------------------------------------------

    def normalize(self, images01: Tensor) -> Tensor:
        """[0,1] images [B,3,H,W] -> normalised images (the CLIP's mean/std, or ImageNet's under
        ``options.normalization="imagenet"``)."""
        if self.options.normalization == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN, dtype=self.mean.dtype, device=self.mean.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=self.std.dtype, device=self.std.device).view(1, 3, 1, 1)
            return (images01 - mean) / std
        return (images01 - self.mean) / self.std

    def normalize_255(self, images255: Tensor) -> Tensor:
        """0-255 images -> normalised as ``(x - 255·mean) / (255·std)``: equal to :meth:`normalize` of ``x / 255`` up to
        float rounding, and bitwise the arithmetic of detectron2 pipelines (PixelCLIP's ``CLIP_PIXEL_MEAN/STD``),
        which the training step's gradients are sensitive enough to see (ovseg parity, ``pixelclip-train``)."""
        return (images255.float() - self.mean_255) / self.std_255

    def set_options(self, options: DenseOptions) -> None:
        """Apply a protocol's :class:`DenseOptions` (normalisation, padding, positional-embedding resize, and the
        image tower's activation / LayerNorm epsilon, swapped in place and put back by the defaults)."""
        if options.vision_activation not in ("model", "gelu"):
            raise ValueError(f"vision_activation must be 'model' or 'gelu', got {options.vision_activation!r}")
        if options.text_precision not in ("model", "fp16"):
            raise ValueError(f"text_precision must be 'model' or 'fp16', got {options.text_precision!r}")
        if options.text_ensemble_precision not in ("fp32", "text"):
            raise ValueError(f"text_ensemble_precision must be 'fp32' or 'text', got "
                             f"{options.text_ensemble_precision!r}")
        if options.text_precision == "fp16" and self.kind == "hf_vit":
            raise NotImplementedError("text_precision='fp16' needs an open_clip model, this one is from transformers")
        # MaskCLIP's ResNet configs (configs/_base_/models/maskclip_r50.py) keep the CLIP's own ReLUs: the `gelu`
        # of the maskclip protocol is its ViT config's act_cfg, nothing to swap in a ResNet
        if options.vision_activation == "gelu" and not self._activations and self.kind != "resnet":
            raise NotImplementedError(f"vision_activation='gelu' needs a ViT image tower, this model is {self.kind!r}")
        for mlp, name, original in self._activations:
            setattr(mlp, name, nn.GELU() if options.vision_activation == "gelu" else original)
        for norm, eps in self._layer_norms:
            norm.eps = eps if options.vision_ln_eps is None else float(options.vision_ln_eps)
        self.options = options

    @contextmanager
    def using(self, options: DenseOptions) -> Iterator[DenseCLIP]:
        """``with clip.using(options):`` the dense path reads images as ``options`` say, then as before."""
        previous = self.options
        self.set_options(options)
        try:
            yield self
        finally:
            self.set_options(previous)

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_dense(images)

    def encode_dense(self, images: Tensor) -> Tensor:
        """Normalised images [B,3,H,W] -> projected dense features [B, D, h, w] (not L2-normalised) on the
        :meth:`token_grid` of the input."""
        return self.encode_dense_keys(images, keys=False)[0]

    def encode_dense_keys(self, images: Tensor, keys: bool = True) -> tuple[Tensor, Tensor | None]:
        """:meth:`encode_dense` and, with ``keys``, the last attention's keys per position [B, C, h, w] as
        MaskCLIP's key smoothing reads them (``mmseg/models/decode_heads/maskclip_head.py``): ResNets, the attention
        pool's ``k_proj`` on the last stage's features (no positional embedding); ViTs, the last block's key
        projection of ``ln_1(x)`` passed through its ``out_proj`` (``mmseg/models/backbones/vit.py``
        ``TransformerEncoderLayer.forward(return_qkv=True)``)."""
        if self.kind == "timm":
            if keys:
                raise NotImplementedError("attention keys need a ViT or a CLIP ResNet, this model is 'timm'")
            return self._timm_dense(images), None
        if self.kind == "resnet":
            return self._resnet_dense(images, keys)
        batch, _, height, width = images.shape
        grid = self.token_grid(height, width)
        key_out: list[Tensor] | None = [] if keys else None
        if self.kind == "vit":
            tokens = self._open_clip_vit_tokens(images, key_out)
        elif key_out is not None:
            raise NotImplementedError("attention keys are implemented for open_clip ViTs and ResNets")
        else:
            tokens = self.encode_tokens(images)
        features = tokens[:, 1:].transpose(1, 2).reshape(batch, -1, *grid)
        if key_out is None:
            return features, None
        return features, key_out[0][:, 1:].transpose(1, 2).reshape(batch, -1, *grid)

    def encode_tokens(self, images: Tensor, project: bool = True) -> Tensor:
        """ViTs only: normalised images -> projected tokens [B, 1+h*w, D], class token first, patches row-major.

        With ``last_block="vanilla", residual="token", ffn=True`` the class token equals ``encode_image`` at the
        trained resolution. ``project=False`` (open_clip ViTs): the last block's (or ``last_stage``'s) output, before
        ``ln_post`` and the projection (Trident mixes the windows' tokens there, :mod:`ovseg.methods.trident`).
        """
        if self.kind == "vit":
            return self._open_clip_vit_tokens(images, project=project)
        if not project:
            raise NotImplementedError("encode_tokens(project=False) needs an open_clip ViT")
        if self.kind == "hf_vit":
            return self._hf_vit_tokens(images)
        raise NotImplementedError(f"encode_tokens needs a ViT, this model is {self.kind!r}")

    def encode_image(self, images: Tensor) -> Tensor:
        """Normalised images at the trained resolution -> the model's pooled image embedding [B, D]."""
        if self.kind == "hf_vit":
            # interpolate_pos_encoding only when needed: older transformers lack the argument
            extra = {"interpolate_pos_encoding": True} if tuple(images.shape[-2:]) != self.input_hw else {}
            out = self.model.get_image_features(pixel_values=images.to(self._dtype), **extra)
            return out if isinstance(out, Tensor) else out.pooler_output  # transformers 5 returns an output object
        return self.model.encode_image(images.to(self._dtype))

    def encode_text(self, texts: list[str]) -> Tensor:
        """Texts -> text embeddings [N, D] (not L2-normalised), in chunks of 256."""
        if isinstance(texts, str):
            raise TypeError("encode_text expects a list of strings")
        tokenizer = self._get_tokenizer()
        device = next(self.model.parameters()).device
        chunks = []
        fp16_text = self._fp16_text_model() if self.options.text_precision == "fp16" and texts else None
        for start in range(0, len(texts), TEXT_BATCH):
            tokens = tokenizer(list(texts[start:start + TEXT_BATCH])).to(device)
            if self.kind == "hf_vit":
                out = self.model.get_text_features(input_ids=tokens)
                chunks.append(out if isinstance(out, Tensor) else out.pooler_output)
            elif fp16_text is not None:
                chunks.append(fp16_text.encode_text(tokens))
            else:
                chunks.append(self.model.encode_text(tokens))
        if not chunks:
            return torch.empty(0, self.embed_dim, device=device)
        return torch.cat(chunks)

    def _fp16_text_model(self) -> nn.Module:
        """A copy of the text tower as OpenAI's ``clip`` package runs it after ``convert_weights`` (linear,
        attention and projection weights in fp16, LayerNorms computed in fp32 and cast back). Kept until a text
        parameter changes in place (an optimiser step, ``load_state_dict``) or moves (``.to``), so it always holds
        the current weights; :class:`~ovseg.models.text.TextBank` calls once per class."""
        from open_clip.transformer import LayerNorm, LayerNormFp32

        version = tuple((p.data_ptr(), p._version) for name, p in self.model.named_parameters()
                        if not name.startswith("visual."))
        cached = getattr(self, "_fp16_text_cache", None)  # (version, model); a tuple, so not a registered submodule
        if cached is not None and cached[0] == version:
            return cached[1]
        text = copy.deepcopy(self.model, memo={id(self.model.visual): None})  # the image tower is not copied
        open_clip.model.convert_weights_to_lp(text, torch.float16)
        for module in text.modules():
            if type(module) is LayerNorm:
                module.__class__ = LayerNormFp32
        self._fp16_text_cache = (version, text.eval())
        return text.eval()

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid of a ``height``×``width`` input: floor division, or ceiling under corner padding (a ViT
        patch-embedding setting; convolutional towers are not padded). A CLIP ResNet's stride-2 stem convolution
        rounds up, its five 2×2 average pools down."""
        p = self.patch_size
        if self.kind == "resnet":
            return -(-height // 2) // 16, -(-width // 2) // 16
        if self.options.patch_padding == "corner" and self.kind not in ("timm", "resnet"):
            return -(-height // p), -(-width // p)
        return height // p, width // p

    # ---- internals -------------------------------------------------------------------------------------------

    def _vision_tower(self) -> nn.Module:
        return self.model.vision_model if self.kind == "hf_vit" else self.model.visual

    def _vision_mlps(self) -> list[nn.Module]:
        if self.kind == "vit":
            return [block.mlp for block in self.model.visual.transformer.resblocks]
        if self.kind == "hf_vit":
            return [layer.mlp for layer in self.model.vision_model.encoder.layers]
        return []

    @property
    def _dtype(self) -> torch.dtype:
        if self.kind == "vit":
            return self.model.visual.conv1.weight.dtype
        if self.kind == "hf_vit":
            return self.model.vision_model.embeddings.patch_embedding.weight.dtype
        return next(self.model.visual.parameters()).dtype

    def _get_tokenizer(self) -> Callable[[list[str]], Tensor]:
        if self._tokenizer is None:
            if self.kind == "hf_vit":
                self._tokenizer = hf_tokenizer(self._hf_folder, self.model.config.text_config)
            else:
                self._tokenizer = open_clip.get_tokenizer(self.config.name, cache_dir=self.config.cache_dir)
        return self._tokenizer

    def _positional_embedding(self, positional_embedding: Tensor, trained_grid: tuple, grid: tuple) -> Tensor:
        """Resized positional embedding, cached per grid while it cannot receive gradients."""
        if grid == tuple(trained_grid):
            return positional_embedding
        interpolation = self.options.pos_embed_interpolation
        if torch.is_grad_enabled() and positional_embedding.requires_grad:
            return resize_positional_embedding(positional_embedding, trained_grid, grid, interpolation)
        # _version changes on every in-place update (optimizer step, EMA, load_state_dict), so stale entries
        # are never hit. (Updates through ``.data`` bypass the counter: call ``clear_cache()`` after those.)
        key = (grid, interpolation, positional_embedding._version, positional_embedding.device,
               positional_embedding.dtype)
        cached = self._pos_cache.get(key)
        if cached is None:
            # computed outside inference mode so the cached tensor stays usable in normal/no-grad mode later
            with torch.inference_mode(False), torch.no_grad():
                cached = resize_positional_embedding(positional_embedding, trained_grid, grid, interpolation)
            if len(self._pos_cache) >= 16:
                self._pos_cache.clear()
            self._pos_cache[key] = cached
        return cached

    def clear_cache(self) -> None:
        self._pos_cache.clear()
        self._fp16_text_cache = None

    def _vit_tokens(
        self,
        images: Tensor,
        patch_embed: nn.Conv2d,
        class_embedding: Tensor,
        positional_embedding: Tensor,
        trained_grid: tuple,
        before_blocks: Callable[[Tensor], Tensor],
        blocks: list[Callable[[Tensor], Tensor]],
        last: TransformerBlockView,
        ln_post: nn.Module,
        project: Callable[[Tensor], Tensor],
        key_out: list[Tensor] | None = None,
    ) -> Tensor:
        if self.options.patch_padding == "corner":
            # mmcv AdaptivePadding('corner'): zeros (in normalised units) at the bottom/right up to whole patches
            height, width = images.shape[-2:]
            grid_h, grid_w = self.token_grid(height, width)
            images = F.pad(images, (0, grid_w * self.patch_size - width, 0, grid_h * self.patch_size - height))
        x = patch_embed(images.to(patch_embed.weight.dtype))  # [B, C, h, w]
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self._positional_embedding(positional_embedding, trained_grid, grid).to(x.dtype)
        x = before_blocks(x)
        if x.shape[1] != 1 + grid[0] * grid[1]:
            raise RuntimeError("patch dropout removed tokens; dense features need all of them (call eval() or "
                               "set patch_dropout=0)")
        hidden: list[Tensor] = []  # every block's output, kept only for a last stage that reads them
        for block in blocks:
            x = block(x)
            if self.last_stage is not None:
                hidden.append(x)
        if key_out is not None:
            key_out.append(last.out_proj(F.linear(last.ln_1(x), last.k_weight, last.k_bias)))
        cfg = self.config
        if self.last_stage is not None:
            x = self.last_stage(hidden, last, grid)
        else:
            x = dense_last_block(x, last, cfg.last_block, cfg.residual, cfg.ffn, grid)
        return project(ln_post(x))

    def _open_clip_vit_tokens(self, images: Tensor, key_out: list[Tensor] | None = None,
                              project: bool = True) -> Tensor:
        visual = self.model.visual
        transformer = visual.transformer
        resblocks = list(transformer.resblocks)
        if transformer.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            blocks = [lambda x, b=b: checkpoint(b, x, use_reentrant=False) for b in resblocks[:-1]]
        else:
            blocks = resblocks[:-1]
        return self._vit_tokens(
            images,
            patch_embed=visual.conv1,
            class_embedding=visual.class_embedding,
            positional_embedding=visual.positional_embedding,
            trained_grid=tuple(visual.grid_size),
            before_blocks=lambda x: visual.ln_pre(visual.patch_dropout(x)),
            blocks=blocks,
            last=TransformerBlockView.from_open_clip(resblocks[-1]),
            ln_post=visual.ln_post if project else nn.Identity(),
            project=(lambda x: x @ visual.proj) if project else (lambda x: x),
            key_out=key_out,
        )

    def _hf_vit_tokens(self, images: Tensor) -> Tensor:
        vision = self.model.vision_model
        embeddings = vision.embeddings
        trained = embeddings.image_size // embeddings.patch_size
        layers = list(vision.encoder.layers)
        # transformers 4.x layers take (hidden, attention_mask, causal_attention_mask) and return a tuple;
        # 5.x take (hidden, attention_mask) and return the tensor
        needs_causal = "causal_attention_mask" in inspect.signature(layers[0].forward).parameters

        def run_layer(layer: nn.Module) -> Callable[[Tensor], Tensor]:
            def call(x: Tensor) -> Tensor:
                out = layer(x, None, None) if needs_causal else layer(x, None)
                return out[0] if isinstance(out, tuple) else out
            return call

        return self._vit_tokens(
            images,
            patch_embed=embeddings.patch_embedding,
            class_embedding=embeddings.class_embedding,
            positional_embedding=embeddings.position_embedding.weight,
            trained_grid=(trained, trained),
            before_blocks=vision.pre_layrnorm,
            blocks=[run_layer(layer) for layer in layers[:-1]],
            last=TransformerBlockView.from_hf(layers[-1]),
            ln_post=vision.post_layernorm,
            project=self.model.visual_projection,
        )

    def _resnet_dense(self, images: Tensor, keys: bool) -> tuple[Tensor, Tensor | None]:
        """CLIP ResNet: stem and four stages as trained, then MaskCLIP's dense head
        (``mmseg/models/decode_heads/maskclip_head.py``, ``attn_pooling=False``): ``c_proj(v_proj(x))`` per position
        as 1×1 convolutions. The attention pool's positional embedding and query-key attention are not used."""
        visual = self.model.visual
        x = visual.stem(images.to(self._dtype))
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        pool = visual.attnpool

        def per_position(linear: nn.Linear, inputs: Tensor) -> Tensor:
            return F.conv2d(inputs, linear.weight[:, :, None, None], linear.bias)

        features = per_position(pool.c_proj, per_position(pool.v_proj, x))
        return features, per_position(pool.k_proj, x) if keys else None

    def _timm_dense(self, images: Tensor) -> Tensor:
        """ConvNeXt: trunk features -> the trunk head's norm per pixel (no pooling) -> head layers per pixel.

        open_clip's pooled path is proj(norm(avgpool(f))) (timm NormMlpClassifierHead: pool -> norm -> fc, then
        open_clip's drop -> proj); here the same layers run on every pixel, so a 1×1 map gives ``encode_image``.
        """
        from timm.layers import NormMlpClassifierHead

        visual = self.model.visual
        trunk = visual.trunk
        features = trunk.forward_features(images.to(self._dtype))  # [B, C, h, w]; includes norm_pre if any
        head = trunk.head
        if isinstance(head, NormMlpClassifierHead):
            features = head.norm(features)  # LayerNorm2d over channels, per pixel
            per_pixel = [head.pre_logits, head.drop, head.fc]
        else:  # ClassifierHead: pool -> drop -> fc
            per_pixel = [head.drop, head.fc]
        x = features.permute(0, 2, 3, 1)  # channels last so the Linear layers act per pixel
        for layer in per_pixel:
            x = layer(x)
        x = visual.head(x)
        return x.permute(0, 3, 1, 2)
