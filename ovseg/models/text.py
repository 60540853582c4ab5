"""Prompt templates and a cached bank of class-name embeddings (CLIP's prompt ensemble)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor

__all__ = ["TEMPLATES", "get_templates", "TextBank"]

# open_clip stores the 80 ImageNet templates as lambdas; calling them with "{}" turns them into format strings
_CLIP80 = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]

TEMPLATES: dict[str, list[str]] = {
    "clip80": _CLIP80,
    # MaskCLIP's set: the 80 ImageNet templates plus five scene templates
    "maskclip85": _CLIP80 + [
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    ],
    "pixelclip8": [
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
        "A photo of a {} in the scene",
    ],
    "single": ["a photo of a {}."],
}


def get_templates(name_or_list: str | Sequence[str]) -> list[str]:
    """A template set by name (see ``TEMPLATES``) or an explicit list of format strings with one ``{}``."""
    if isinstance(name_or_list, str):
        if name_or_list not in TEMPLATES:
            raise ValueError(f"unknown template set {name_or_list!r}; known: {sorted(TEMPLATES)}")
        return list(TEMPLATES[name_or_list])
    templates = list(name_or_list)
    if not templates:
        raise ValueError("the template list is empty")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"a template must be a string containing '{{}}', got {template!r}")
    return templates


class TextBank:
    """Class-name embeddings from a frozen text encoder, prompt-ensembled and cached.

    ``embed(names)`` encodes every template filled with each name (one encoder call per name), L2-normalises
    each, averages over the templates and re-normalises (CLIP's prompt ensemble). A name given as a tuple of
    synonyms is one class embedded as CAT-Seg's and PixelCLIP's ``class_embeddings`` do (CAT-Seg
    ``cat_seg/modeling/transformer/cat_seg_predictor.py``, PixelCLIP
    ``pixelclip/modeling/transformer/pixelclip_predictor.py``; ADE-847's ``building, edifice``): every template
    filled with every synonym in one encoder call, each prompt L2-normalised, per template the mean over the
    synonyms re-normalised (in the encoder's precision), then the template ensemble as above. Results are cached
    per (name, templates) and stay on the device the encoder returned them on; call ``clear()`` after moving or
    changing the encoder.
    """

    def __init__(self, encode_text: Callable[[list[str]], Tensor], templates: str | Sequence[str] = "clip80"):
        self.encode_text = encode_text
        self.templates = tuple(get_templates(templates))
        self._cache: dict[tuple[str, tuple[str, ...]], Tensor] = {}

    def embed(self, names: Sequence[str | tuple[str, ...]], templates: str | Sequence[str] | None = None) -> Tensor:
        """Names (or tuples of synonyms, one class each) -> unit-norm embeddings [N, D], one row per name (in order;
        duplicates allowed)."""
        if isinstance(names, str):
            raise TypeError("embed expects a list of names")
        if not names:
            raise ValueError("embed needs at least one name")
        templates = self.templates if templates is None else tuple(get_templates(templates))
        precision, ensemble_precision = self._text_options()
        key = lambda name: (name, templates, precision, ensemble_precision)  # noqa: E731
        for name in dict.fromkeys(names):
            if key(name) in self._cache:
                continue
            # one class per encoder call, its templates as the batch: what CLIP's zero-shot notebook, MaskCLIP's
            # tools/maskclip_utils/prompt_engineering.py zeroshot_classifier and PixelCLIP's
            # pixelclip_predictor.py class_embeddings do. A class's embedding then never depends on the rest of
            # the vocabulary: half-precision matrix kernels round differently for other batch sizes.
            synonyms = (name,) if isinstance(name, str) else tuple(name)
            with torch.no_grad():
                # template-major, the synonyms within a template: class_embeddings' order (one batch per class)
                features = self.encode_text([template.format(s) for template in templates for s in synonyms])
            # each prompt is normalised in the encoder's precision (as CLIP's zero-shot code and the references
            # do); the ensemble in fp32 even for half-precision encoders (PixelCLIP), or in the encoder's
            # precision where the protocol says so (MaskCLIP: mean and norm of fp16 embeddings)
            features = features / features.norm(dim=-1, keepdim=True)
            if len(synonyms) > 1:
                # class_embeddings: reshape(len(templates), -1, D).mean(dim=1), normalised, before their `.float()`
                features = features.reshape(len(templates), len(synonyms), -1).mean(dim=1)
                features = features / features.norm(dim=-1, keepdim=True)
            if ensemble_precision == "text":
                mean = features.mean(dim=0)
                self._cache[key(name)] = (mean / mean.norm()).float()
            else:
                self._cache[key(name)] = F.normalize(features.float().mean(dim=0), dim=-1)
        return torch.stack([self._cache[key(name)] for name in names])

    def _text_options(self) -> tuple[str, str]:
        """(text precision, ensemble precision) of the encoder when ``encode_text`` is a method of a model with
        ``options`` (:class:`~ovseg.models.clip.DenseCLIP`, set per protocol), else the defaults: part of the cache
        key, so a vocabulary encoded under one protocol is not reused under another."""
        options = getattr(getattr(self.encode_text, "__self__", None), "options", None)
        return (getattr(options, "text_precision", "model"), getattr(options, "text_ensemble_precision", "fp32"))

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)
