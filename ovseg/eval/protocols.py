"""Evaluation protocols as data: named, versioned settings per dataset.

A protocol is a YAML file (``ovseg/eval/protocols/<name>.yaml`` or a user's path) with ``defaults``
and per-dataset overrides. Every results file records the resolved settings next to the numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROTOCOLS_DIR = Path(__file__).parent / "protocols"


_CHOICES: dict[str, tuple[str, ...]] = {
    "resize_library": ("torch", "cv2", "pil"),
    "resize_rule": ("mmcv", "detectron2"),
    "normalization": ("model", "imagenet"),
    "patch_padding": ("none", "corner"),
    "pos_embed_interpolation": ("grid", "sclip"),
    "logits_upsample": ("label", "image_then_label"),
    "vision_activation": ("model", "gelu"),
    "text_precision": ("model", "fp16"),
    "text_ensemble_precision": ("fp32", "text"),
    "exif_orientation": ("ignore", "apply"),
    "masks": ("none", "ground_truth"),
    "synonyms": ("max", "mean_embedding"),
}


#: the settings that describe how a model reads images rather than the benchmark pipeline, at the values that
#: read a CLIP as it was trained (what methods trained in ovseg pin, see ``OVSegMethod.NATIVE_SETTINGS``)
MODEL_NATIVE_SETTINGS: dict[str, Any] = {"normalization": "model", "vision_activation": "model", "vision_ln_eps": None,
                                         "text_precision": "model", "text_ensemble_precision": "fp32"}


@dataclass(frozen=True)
class ProtocolSettings:
    """Everything that decides a number besides the model (the protocol YAML files in ``eval/protocols/`` cite
    the reference code each setting reproduces)."""

    #: resize so the short side is ``short_side`` unless the long side would exceed ``long_side_max``
    #: (mmseg ``Resize(scale=(long_side_max, short_side), keep_ratio=True)``); None: keep the size.
    short_side: int | None = None
    long_side_max: int | None = None
    #: then resize to a square: a size, ``"model"`` (the method's CLIP input size) or None.
    square: int | str | None = None
    mode: str = "whole"  # "whole" | "slide"
    crop: int | None = None
    stride: int | None = None
    templates: str | list[str] = "single"
    #: class-name file: a shipped name or a path; ``{dataset}`` is replaced by the dataset name.
    class_names: str = "{dataset}"
    #: softmax temperature applied before thresholds; None: argmax of raw scores.
    logit_scale: float | None = None
    #: pixels whose top class probability is below this become the background class.
    prob_threshold: float | None = None
    #: classes covering less than this fraction of the predicted foreground are dropped (SCLIP).
    area_threshold: float | None = None
    #: extra names appended as synonyms of the dataset's background class.
    background_names: list[str] = field(default_factory=list)
    #: a class with several names: ``max`` (each synonym is its own text query, the class scores the best of them:
    #: SCLIP's ``name_sets``) or ``mean_embedding`` (one query per class: for each template the mean of the
    #: synonyms' unit embeddings, re-normalised, then the template ensemble: CAT-Seg's and PixelCLIP's
    #: ``class_embeddings``, see :meth:`ovseg.models.text.TextBank.embed`).
    synonyms: str = "max"
    #: auxiliary class texts (ITACLIP's LLaMA-generated definitions / synonyms): a shipped name under
    #: ``ovseg/data/auxiliary_texts`` or a path, ``{dataset}`` replaced; one ``name >=text`` line per class, or per
    #: class but the background class (which keeps its names' own embeddings). None: off.
    auxiliary_texts: str | None = None
    #: each query's embedding becomes ``(1 - w) · own + w · auxiliary`` of its class (not re-normalised; ITACLIP's
    #: ``def_coefficient``)
    auxiliary_weight: float = 0.0

    # -- the reference pipeline: how the code behind a paper's numbers resized, padded and normalised ------------
    #: library of the keep-ratio resize: ``torch`` (bilinear on floats), ``cv2`` (mmcv ``imresize``: cv2
    #: INTER_LINEAR on uint8) or ``pil`` (detectron2 ``ResizeShortestEdge``: PIL BILINEAR on uint8, antialiased
    #: when shrinking). The square step (``square``) is always ``F.interpolate`` on floats, as in PixelCLIP.
    resize_library: str = "torch"
    #: the keep-ratio output size: ``mmcv`` (``rescale_size``: one scale, each side rounded) or ``detectron2``
    #: (``ResizeShortestEdge.get_output_shape``: short side set exactly, then the long-side cap).
    resize_rule: str = "mmcv"
    #: image mean/std: ``model`` (the CLIP's own) or ``imagenet`` (mmseg's ``img_norm_cfg``, used by MaskCLIP).
    normalization: str = "model"
    #: ViT inputs whose sides are not multiples of the patch size: ``none`` (the patch convolution drops the
    #: remainder) or ``corner`` (mmcv ``AdaptivePadding('corner')``: zeros after normalisation, bottom/right).
    patch_padding: str = "none"
    #: positional-embedding resize: ``grid`` (bicubic to the token grid) or ``sclip`` (SCLIP/NACLIP: bicubic with
    #: ``scale_factor=(side // patch + 0.1) / trained_grid``, ``recompute_scale_factor=False``).
    pos_embed_interpolation: str = "grid"
    #: whole-mode scores -> labels: ``label`` (one bilinear step to the label size) or ``image_then_label``
    #: (mmseg ``EncoderDecoder``: to the resized image first, then to the label size).
    logits_upsample: str = "label"
    #: ViT image tower activation: ``model`` (as loaded) or ``gelu`` (exact GELU instead of QuickGELU).
    vision_activation: str = "model"
    #: ViT image tower LayerNorm epsilon; None keeps the model's (1e-5).
    vision_ln_eps: float | None = None
    #: class-name embeddings: ``model`` (the text tower as loaded) or ``fp16`` (OpenAI ``clip``'s
    #: ``convert_weights``: linear, attention and projection weights in fp16, LayerNorm computed in fp32, each
    #: prompt's embedding normalised in fp16; what PixelCLIP's predictor and MaskCLIP's prompt_engineering.py do).
    text_precision: str = "model"
    #: the prompt ensemble (mean over templates, re-normalised): ``fp32``, or ``text``: in the text tower's output
    #: precision (MaskCLIP's ``zeroshot_classifier`` averages and normalises fp16 embeddings).
    text_ensemble_precision: str = "fp32"
    #: a JPEG's EXIF orientation tag: ``ignore`` (the pixels as stored, what the label PNGs are drawn on) or
    #: ``apply`` (turned as a viewer shows it: mmcv's cv2 reader and detectron2's ``read_image`` do; label PNGs
    #: carry no tag, so a 90° tag gives a label of another shape, an error naming the file).
    exif_orientation: str = "ignore"
    #: score a centre square of this side instead of the whole image (CLIPtrase's ``clip_self_correlation.py``):
    #: torchvision ``Resize(side, BICUBIC)`` + ``CenterCrop(side)`` on the image (PIL, uint8) and ``Resize(side,
    #: NEAREST)`` + ``CenterCrop(side)`` on the label, so the scores are those of the crop at that size
    #: (:func:`ovseg.eval.inference.center_crop_view`); None: the whole image at its own size.
    center_crop: int | None = None

    # -- post-processing ----------------------------------------------------------------------------------------
    #: PAMR rounds on the label-size scores before the softmax (NACLIP's ``pamr_steps``; 0: off), see
    #: :mod:`ovseg.eval.pamr`
    pamr_steps: int = 0
    #: PAMR neighbourhood dilations (NACLIP's ``pamr_stride``)
    pamr_dilations: list[int] = field(default_factory=lambda: [8, 16])
    #: morphological closing of the label map with a ``label_closing``-sided square (dilation then erosion of the
    #: class ids, borders ignored; ITACLIP's ``cv2.morphologyEx(MORPH_CLOSE)`` with a 3x3 kernel); 0: off
    label_closing: int = 0

    # -- what is labelled --------------------------------------------------------------------------------------
    #: ``none``: every pixel (semantic segmentation). ``ground_truth``: zero-shot mask classification: each
    #: ground-truth class region of an image is one mask, labelled with the class whose best synonym has the
    #: highest score averaged over the mask (see :func:`ovseg.eval.inference.labels_from_masks`).
    masks: str = "none"

    def __post_init__(self):
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"protocol mode must be 'whole' or 'slide', got {self.mode!r}")
        if self.mode == "slide" and not (self.crop and self.stride):
            raise ValueError("slide mode needs positive `crop` and `stride`")
        if isinstance(self.square, str) and self.square != "model":
            raise ValueError(f"`square` must be a size, 'model' or null, got {self.square!r}")
        if (self.prob_threshold is not None or self.area_threshold is not None) and self.logit_scale is None:
            raise ValueError("prob_threshold/area_threshold need a logit_scale (thresholds act on softmax scores)")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"protocol setting {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.masks != "none" and (self.prob_threshold is not None or self.area_threshold is not None
                                     or self.pamr_steps):
            raise ValueError("mask classification (masks: ground_truth) takes the argmax of pooled scores: "
                             "prob_threshold, area_threshold and pamr_steps do not apply")
        if not (isinstance(self.pamr_steps, int) and self.pamr_steps >= 0):
            raise ValueError(f"pamr_steps must be a non-negative integer, got {self.pamr_steps!r}")
        if not (self.pamr_dilations and all(isinstance(d, int) and d > 0 for d in self.pamr_dilations)):
            raise ValueError(f"pamr_dilations must be a list of positive integers, got {self.pamr_dilations!r}")
        if not (isinstance(self.label_closing, int) and self.label_closing >= 0 and self.label_closing % 2 != 0
                or self.label_closing == 0):
            raise ValueError(f"label_closing must be 0 or an odd kernel side, got {self.label_closing!r}")
        if self.center_crop is not None and not (isinstance(self.center_crop, int) and self.center_crop > 0):
            raise ValueError(f"center_crop must be a positive side or null, got {self.center_crop!r}")
        if not 0 <= self.auxiliary_weight <= 1:
            raise ValueError(f"auxiliary_weight must be in [0, 1], got {self.auxiliary_weight!r}")
        if self.vision_ln_eps is not None and not self.vision_ln_eps > 0:
            raise ValueError(f"vision_ln_eps must be positive or null, got {self.vision_ln_eps!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(ProtocolSettings)}


@dataclass(frozen=True)
class Protocol:
    name: str
    version: int
    description: str
    defaults: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    source: str

    def settings_for(self, dataset: str | None, overrides: dict[str, Any] | None = None) -> ProtocolSettings:
        values = dict(self.defaults)
        if dataset is not None:
            values.update(self.datasets.get(dataset, {}))
        values.update(overrides or {})
        unknown = set(values) - _FIELDS
        if unknown:
            raise ValueError(f"protocol {self.name!r} ({self.source}): unknown settings {sorted(unknown)}")
        return ProtocolSettings(**values)


def available_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOLS_DIR.glob("*.yaml"))


def load_protocol(name_or_path: str) -> Protocol:
    """A built-in protocol by name (``sclip``, ``maskclip``, ``pixelclip``) or a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PROTOCOLS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown protocol {name_or_path!r}: not a YAML file and not one of {', '.join(available_protocols())}"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid protocol YAML ({e})") from None
    if not isinstance(data, dict) or "name" not in data or "defaults" not in data:
        raise ValueError(f"{path}: a protocol file needs `name` and `defaults` keys")
    defaults = dict(data["defaults"] or {})
    datasets = {k: dict(v or {}) for k, v in (data.get("datasets") or {}).items()}
    if data.get("extends"):
        # a variant of another protocol: its settings, then this file's on top (per dataset too)
        if str(data["extends"]) == str(data["name"]):
            raise ValueError(f"{path}: a protocol cannot extend itself")
        base = load_protocol(str(data["extends"]))
        defaults = {**base.defaults, **defaults}
        datasets = {k: {**base.datasets.get(k, {}), **datasets.get(k, {})} for k in {*base.datasets, *datasets}}
    protocol = Protocol(
        name=str(data["name"]),
        version=int(data.get("version", 1)),
        description=str(data.get("description", "")),
        defaults=defaults,
        datasets=datasets,
        source=str(path),
    )
    protocol.settings_for(None)  # validate the defaults early, naming the file on error
    for dataset in protocol.datasets:
        protocol.settings_for(dataset)
    return protocol
