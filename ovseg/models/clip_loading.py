"""Loading CLIP weights for :class:`~ovseg.models.clip.DenseCLIP`: open_clip tags and files, weights shipped in the
package, Hugging Face ``transformers`` folders, their tokenizers, and the checks that a model is one of the
architectures the dense path supports. Every load records which weights it read (``weights_id``: tag or file hash).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

if TYPE_CHECKING:
    from ovseg.models.clip import CLIPConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: weights shipped inside the package, (open_clip model name, pretrained tag) -> file; looked up before open_clip's
#: own tags, so e.g. ``CLIPConfig(name="toyworld-vit", pretrained="toyworld")`` loads offline like any tag.
SHIPPED_WEIGHTS: dict[tuple[str, str], Path] = {
    ("toyworld-vit", "toyworld"): WEIGHTS_DIR / "toyworld-vit.safetensors",
}

HF_PREFIX = "hf:"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
# Hashing the full weights file identifies it in results files; 12 hex digits are plenty to tell files apart.
SHA_PREFIX_LEN = 12
_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")



def _sha256_prefix(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:SHA_PREFIX_LEN]


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.startswith((".", "~")) or value.endswith(_WEIGHT_SUFFIXES)


def load_open_clip(config: CLIPConfig) -> tuple[nn.Module, str]:
    """Create the open_clip model; returns (model, weights_id)."""
    name = config.name
    kwargs: dict = dict(precision=config.precision, cache_dir=config.cache_dir)
    if config.quick_gelu is not None:
        kwargs["force_quick_gelu"] = config.quick_gelu

    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"open_clip model folder not found: {folder} (from name={name!r})")
        model = open_clip.create_model(name, **kwargs)
        files = _weight_files(folder)
        # open_clip picks one of the folder's weight files; hashing all of them identifies the folder either way
        weights_id = f"{name}#sha256:{_sha256_prefix(files)}" if files else f"{name}#random"
        return model, weights_id
    if name.startswith(HF_HUB_PREFIX):
        return open_clip.create_model(name, **kwargs), name

    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=8, cutoff=0.5)
        raise ValueError(f"unknown open_clip model {name!r}; close matches: {close}. "
                         f"Use 'hf:/folder' for a transformers checkpoint or 'local-dir:/folder'.")

    pretrained = config.pretrained
    if not pretrained:
        return open_clip.create_model(name, pretrained=None, **kwargs), f"{name}/random"

    shipped = SHIPPED_WEIGHTS.get((name, pretrained))
    if shipped is not None:
        if not shipped.is_file():
            raise FileNotFoundError(f"weights {name}/{pretrained} should ship with ovseg but are missing: {shipped}")
        model = open_clip.create_model(name, pretrained=str(shipped), **kwargs)
        return model, f"{name}/{pretrained}#sha256:{_sha256_prefix([shipped])}"

    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        # open_clip only warns when a QuickGELU-trained tag (e.g. openai) meets a GELU config; the features would
        # be silently wrong, so follow the tag unless the user chose explicitly.
        kwargs.setdefault("force_quick_gelu", bool(tag_cfg.get("quick_gelu", False)))
        try:
            model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
        except RuntimeError as err:
            raise RuntimeError(
                f"could not load weights {name}/{pretrained}: {err}. Offline? Pre-fill the Hugging Face cache "
                f"(cache_dir / HF_HOME) or pass pretrained=/path/to/open_clip_pytorch_model.bin"
            ) from err
        return model, f"{name}/{pretrained}"

    weights_path = Path(pretrained).expanduser()
    if weights_path.is_dir():
        raise IsADirectoryError(f"pretrained={pretrained!r} is a folder: pass the weights file inside it, or use "
                                f"name='local-dir:{weights_path}' for a folder with open_clip_config.json")
    if weights_path.is_file():
        model = open_clip.create_model(name, pretrained=str(weights_path), **kwargs)
        return model, f"{name}/file:{weights_path.resolve()}#sha256:{_sha256_prefix([weights_path])}"
    if _looks_like_path(pretrained):
        raise FileNotFoundError(f"CLIP weights file not found: {weights_path}")
    raise ValueError(f"unknown pretrained tag {pretrained!r} for open_clip model {name!r}; known tags: "
                     f"{open_clip.list_pretrained_tags_by_model(name)} (or give a path to a weights file)")


def load_hf(folder_str: str, precision: str) -> tuple[nn.Module, str, tuple, tuple]:
    """Load a transformers CLIPModel folder; returns (model, weights_id, mean, std)."""
    try:
        from transformers import CLIPModel
    except ImportError as err:  # transformers is an optional dependency (extra "hf")
        raise ImportError("the 'hf:' CLIP loader needs transformers: pip install 'ovseg[hf]'") from err
    folder = Path(folder_str).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"Hugging Face CLIP folder not found or without config.json: {folder}")
    if precision not in _PRECISION_DTYPES:
        raise ValueError(f"precision {precision!r} is not supported for 'hf:' models; use one of "
                         f"{list(_PRECISION_DTYPES)}")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(_PRECISION_DTYPES[precision])

    mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        cfg = json.loads(preprocessor.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    files = _weight_files(folder)
    weights_id = f"hf:{folder}#sha256:{_sha256_prefix(files)}" if files else f"hf:{folder}#random"
    return model, weights_id, mean, std


class _HFTokenize:
    """Texts -> input ids [N, context_length] with a transformers tokenizer (padded and truncated)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.context_length, truncation=True,
                              return_tensors="pt")["input_ids"]


def hf_tokenizer(folder: Path, text_config) -> Callable[[list[str]], Tensor]:
    """A tokenizer for a transformers CLIP folder, never the silent 2-token offline fallback."""
    context_length = text_config.max_position_embeddings
    has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    # transformers 4 saves vocab.json + merges.txt, transformers 5 saves tokenizer.json only
    if has_bpe_files or (folder / "tokenizer.json").is_file():
        # CLIPTokenizer rather than AutoTokenizer: the latter needs tokenizer_config.json to pick a class, and
        # in transformers 5 it cannot build a tokenizer from vocab.json + merges.txt alone.
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        if len(tokenizer) < 1000:
            raise RuntimeError(f"tokenizer in {folder} has a suspiciously small vocabulary ({len(tokenizer)})")
        return _HFTokenize(tokenizer, context_length)
    if text_config.vocab_size == 49408:
        # OpenAI's BPE: open_clip's SimpleTokenizer ships the same vocabulary and gives the same ids.
        return open_clip.SimpleTokenizer(context_length=context_length)
    raise FileNotFoundError(
        f"{folder} has no tokenizer files (vocab.json + merges.txt, or tokenizer.json) and its text vocabulary "
        f"({text_config.vocab_size}) is not OpenAI's 49408-token BPE; save the tokenizer into that folder"
    )


def check_open_clip_vit(visual: nn.Module) -> None:
    """Refuse ViT variants whose forward the dense path does not reproduce."""
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("dense features for attentional-pooling ViTs (CoCa) are not supported")
    if getattr(visual, "final_ln_after_pool", False):
        raise NotImplementedError("dense features for final_ln_after_pool=True ViTs are not supported")
    if visual.pool_type not in ("tok", "avg"):
        raise NotImplementedError(f"dense features for ViT pool_type={visual.pool_type!r} are not supported")
    if visual.patch_size[0] != visual.patch_size[1]:
        raise NotImplementedError(f"dense features need square patches, got {tuple(visual.patch_size)}")
    if visual.proj is None:
        raise NotImplementedError("dense features need the ViT's output projection (visual.proj is None)")
    if not visual.transformer.batch_first:
        raise NotImplementedError("dense features need a batch_first open_clip transformer")
    for block in visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock:
            raise NotImplementedError(
                f"dense features support open_clip's ResidualAttentionBlock only, got {type(block).__name__} "
                "(qk_norm / scaled-cosine / scale_* block options)")


def check_open_clip_resnet(visual: nn.Module) -> None:
    """Refuse ResNet towers whose dense head MaskCLIP's recipe does not describe."""
    pool = getattr(visual, "attnpool", None)
    if pool is None or not all(hasattr(pool, name) for name in ("k_proj", "v_proj", "c_proj")):
        raise NotImplementedError("dense features for a CLIP ResNet need its attention pool (k_proj, v_proj, c_proj)")


def check_timm(visual: nn.Module) -> None:
    from timm.layers import ClassifierHead, NormMlpClassifierHead

    if "pool" in dict(visual.head.named_children()):
        raise NotImplementedError("dense features for attention-pooled timm towers (abs_attn/rot_attn) are not "
                                  "supported")
    trunk = visual.trunk
    head = getattr(trunk, "head", None)
    if not hasattr(trunk, "forward_features") or not isinstance(head, (NormMlpClassifierHead, ClassifierHead)):
        raise NotImplementedError(
            f"dense features for timm trunk {type(trunk).__name__} are not supported (ConvNeXt-style trunks with "
            "a NormMlpClassifierHead or ClassifierHead are)")
    if head.use_conv or any(isinstance(m, nn.Conv2d) for m in head.modules()):
        raise NotImplementedError("dense features need a pooled timm head with linear layers")
