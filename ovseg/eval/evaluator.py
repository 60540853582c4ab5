"""The shared evaluator: everything between a method's ``dense_logits`` and the results files.

It owns protocol resize, whole/slide tiling, synonym reduction, logit scale and background rules,
upsampling to the label size, argmax, the confusion matrices (exact under DDP) and the scores.
Methods never touch this module; :class:`~ovseg.eval.session.EvaluationSession` drives it (a method's Lightning
hooks hand over to the session).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.data.auxiliary_texts import class_auxiliary_texts
from ovseg.data.classnames import display_names, read_class_names
from ovseg.data.files import DataError, apply_exif_orientation
from ovseg.data.specs import IGNORE_INDEX
from ovseg.eval.contract import EvaluatedMethod
from ovseg.eval.inference import (
    center_crop_view,
    class_probabilities,
    close_labels,
    labels_from_logits,
    labels_from_masks,
    protocol_resize,
    slide_logits,
    to_uint8_hwc,
)
from ovseg.eval.metrics import ConfusionMatrix, SegScores, scores_from_confusion
from ovseg.eval.pamr import PAMR
from ovseg.eval.protocols import Protocol, ProtocolSettings
from ovseg.models.clip import DenseCLIP, DenseOptions
from ovseg.models.text import get_templates



@dataclass
class Vocabulary:
    """Class names with synonyms, as the queries sent to the text encoder: each synonym its own query (``max``),
    or one query per class (``mean_embedding``: a class with several names is one tuple of them, embedded as
    their mean, see :meth:`ovseg.models.text.TextBank.embed`)."""

    class_names: list[list[str]]
    synonyms: str = "max"
    queries: list[str | tuple[str, ...]] = field(init=False)
    query_to_class: torch.Tensor = field(init=False)

    def __post_init__(self):
        if self.synonyms == "mean_embedding":
            self.queries = [names[0] if len(names) == 1 else tuple(names) for names in self.class_names]
            self.query_to_class = torch.arange(len(self.class_names))
            return
        self.queries = [name for synonyms in self.class_names for name in synonyms]
        self.query_to_class = torch.tensor(
            [c for c, synonyms in enumerate(self.class_names) for _ in synonyms], dtype=torch.long
        )

    @property
    def display_names(self) -> list[str]:
        return display_names(self.class_names)


def dataset_vocabulary(settings: ProtocolSettings, dataset_name: str, default: list[list[str]] | None,
                       background_index: int | None) -> tuple[Vocabulary, str]:
    """The protocol's class-name file for a dataset (``{dataset}`` -> its own names), with the
    protocol's extra background synonyms. Returns the vocabulary and where the names came from."""
    if settings.class_names == "{dataset}" and default is not None:
        names, source = [list(s) for s in default], f"dataset:{dataset_name}"
    else:
        source = settings.class_names.format(dataset=dataset_name)
        names = read_class_names(source)
        if default is not None and len(names) != len(default):
            raise ValueError(
                f"class-name file {source!r} has {len(names)} classes but dataset {dataset_name!r} has {len(default)}"
            )
    display = display_names(names)
    repeated = sorted({n for n in display if display.count(n) > 1})
    if repeated:  # results.json reports per class name: a repeated one would hide a class
        raise ValueError(f"class names of {dataset_name!r} ({source}) repeat {repeated}: each class needs its own name")
    if settings.background_names:
        if background_index is None:
            raise ValueError(f"protocol sets background_names but dataset {dataset_name!r} has no background class")
        names[background_index] = names[background_index] + [
            n for n in settings.background_names if n not in names[background_index]
        ]
    return Vocabulary(names, settings.synonyms), source


class FeatureCache:
    """The image features of the last ``size`` forward passes, keyed by the exact input batch (its bytes, shape,
    device) and the protocol settings that decide how a dense CLIP reads it: a second vocabulary on the same image
    (``ovseg demo``) runs only the text side. Used for methods whose ``reuses_features`` is True: their
    ``dense_logits(x, text)`` is ``logits_from_features(dense_features(x), text)``."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def features(self, method: EvaluatedMethod, images: torch.Tensor, settings: ProtocolSettings) -> Any:
        digest = hashlib.sha1(images.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()
        key = (digest, tuple(images.shape), str(images.dtype), str(images.device), settings.normalization,
               settings.patch_padding, settings.pos_embed_interpolation, settings.vision_activation,
               settings.vision_ln_eps)
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        features = method.dense_features(images)
        self._items[key] = features
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return features


@dataclass
class DatasetEvaluation:
    name: str
    settings: ProtocolSettings
    vocabulary: Vocabulary
    class_names_source: str
    text: torch.Tensor
    metric: ConfusionMatrix
    background_index: int | None
    #: the dataset's own class names (the protocol may spell them otherwise, e.g. MaskCLIP's ``airplane``)
    dataset_class_names: list[list[str]] | None = None
    num_images: int = 0
    #: (id, image uint8 HWC, label, prediction) of the first images this process scored (the test gallery)
    gallery: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


class Evaluator:
    """Scores one method over several datasets under one protocol."""

    def __init__(
        self,
        protocol: Protocol,
        overrides: dict[str, Any] | None = None,
        window_batch_size: int = 8,
        max_chunk_bytes: int = 64 * 2**20,
        gallery_size: int = 0,
    ):
        """``gallery_size``: keep this many first predictions per dataset (with their image and label) for the
        pictures after ``ovseg test``, so nothing is predicted twice."""
        self.protocol = protocol
        self.overrides = dict(overrides or {})
        self.window_batch_size = window_batch_size
        self.gallery_size = gallery_size
        self.max_chunk_bytes = max_chunk_bytes
        self.datasets: dict[str, DatasetEvaluation] = {}
        #: image features kept across vocabularies (``ovseg demo``); None: every call runs the image side
        self.feature_cache: FeatureCache | None = None

    def settings_for(self, dataset: str | None) -> ProtocolSettings:
        return self.protocol.settings_for(dataset, self.overrides)

    @torch.no_grad()
    def add_dataset(
        self,
        method: EvaluatedMethod,
        name: str,
        class_names: list[list[str]] | None,
        background_index: int | None,
        device: torch.device,
        settings: ProtocolSettings | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> DatasetEvaluation:
        """``ignore_index``: the label value not scored (the dataset spec's: 65535 where 255 is a class)."""
        settings = settings or self.settings_for(name)
        vocabulary, source = dataset_vocabulary(settings, name, class_names, background_index)
        with dense_options(method, settings):
            text = method.encode_text(vocabulary.queries, get_templates(settings.templates))
            if settings.auxiliary_texts and settings.auxiliary_weight:
                text = mix_auxiliary_texts(method, text, vocabulary, settings, name, background_index)
        entry = DatasetEvaluation(
            name=name,
            settings=settings,
            vocabulary=vocabulary,
            class_names_source=source,
            text=text,
            metric=ConfusionMatrix(len(vocabulary.class_names), ignore_index=ignore_index).to(device),
            background_index=background_index,
            dataset_class_names=class_names,
        )
        self.datasets[name] = entry
        return entry

    @torch.no_grad()
    def predict(self, method: EvaluatedMethod, entry: DatasetEvaluation, image: torch.Tensor,
                out_size: tuple[int, int]) -> torch.Tensor:
        """One image ``[3,H,W]`` in [0,1] -> class ids ``[H,W]`` at ``out_size``."""
        return self.predict_batch(method, entry, [image], [out_size])[0]

    @torch.no_grad()
    def predict_batch(self, method: EvaluatedMethod, entry: DatasetEvaluation, images: list[torch.Tensor],
                      out_sizes: list[tuple[int, int]], labels: list[torch.Tensor] | None = None
                      ) -> list[torch.Tensor]:
        """Images ``[3,H,W]`` in [0,1] -> class ids at their ``out_sizes``. Whole-image protocols run the images
        that are the same size after the protocol's resize as one forward pass; sliding windows are batched
        within each image. ``labels``: the ground truth, read only by mask-classification protocols (``masks:
        ground_truth``: each class region of a label map is one mask to classify)."""
        s = entry.settings
        if s.masks == "ground_truth" and labels is None:
            raise ValueError(f"protocol {self.protocol.name!r} classifies ground-truth masks: it scores labelled "
                             "datasets (ovseg test), not images without labels")
        square = method.input_size if s.square == "model" else s.square
        resized = [protocol_resize(image[None], s.short_side, s.long_side_max, square, s.resize_library,
                                   s.resize_rule) for image in images]

        def dense_fn(batch: torch.Tensor) -> torch.Tensor:
            if self.feature_cache is not None and getattr(method, "reuses_features", False):
                return method.logits_from_features(self.feature_cache.features(method, batch, s), entry.text)
            return method.dense_logits(batch, entry.text)

        logits: list[torch.Tensor | None] = [None] * len(images)
        with dense_options(method, s), scoring(method, entry.name):
            if s.mode == "slide":
                for i, image in enumerate(resized):
                    logits[i] = slide_logits(dense_fn, image, s.crop, s.stride, self.window_batch_size)
            else:
                same_size: dict[tuple[int, ...], list[int]] = {}
                for i, image in enumerate(resized):
                    same_size.setdefault(tuple(image.shape), []).append(i)
                for members in same_size.values():
                    with originals(method, [images[i] for i in members]):
                        out = dense_fn(torch.cat([resized[i] for i in members]))
                    for i, scores in zip(members, out):
                        logits[i] = scores
        preds = []
        if s.masks == "ground_truth":
            via = s.logits_upsample == "image_then_label"
            return [labels_from_masks(scores, out_size, entry.vocabulary.query_to_class, label,
                                      via_size=tuple(image.shape[-2:]) if via else None,
                                      max_chunk_bytes=self.max_chunk_bytes)
                    for scores, image, out_size, label in zip(logits, resized, out_sizes, labels)]
        refine_labels = label_refinement(method)
        for scores, image, original, out_size in zip(logits, resized, images, out_sizes):
            refine = None
            if s.pamr_steps:
                with dense_options(method, s):
                    refine = PAMR(refinement_image(method, image, out_size), s.pamr_steps, s.pamr_dilations)
            preds.append(labels_from_logits(
                scores,
                out_size,
                entry.vocabulary.query_to_class,
                logit_scale=s.logit_scale,
                prob_threshold=s.prob_threshold,
                area_threshold=s.area_threshold,
                background_index=entry.background_index,
                via_size=tuple(image.shape[-2:]) if s.logits_upsample == "image_then_label" else None,
                refine=refine,
                max_chunk_bytes=self.max_chunk_bytes,
            ))
            if s.label_closing:
                preds[-1] = close_labels(preds[-1], s.label_closing)
            if refine_labels is not None:
                probs = class_probabilities(scores, out_size, entry.vocabulary.query_to_class, s.logit_scale,
                                            via_size=tuple(image.shape[-2:]) if s.logits_upsample ==
                                            "image_then_label" else None)
                with scoring(method, entry.name):
                    preds[-1] = refine_labels(preds[-1], probs, original)
        return preds

    def update(self, method: EvaluatedMethod, name: str, images: list[torch.Tensor], labels: list[torch.Tensor],
               ids: list[str] | None = None, orientations: list[int] | None = None) -> None:
        """Score images against their labels; ``orientations``: each image file's EXIF orientation, applied to the
        image where the protocol says so (``exif_orientation: apply``, as the reference's reader does)."""
        entry = self.datasets[name]
        if orientations is not None and entry.settings.exif_orientation == "apply":
            images = [apply_exif_orientation(image, o) if o != 1 else image for image, o in zip(images, orientations)]
            for index, (image, label, o) in enumerate(zip(images, labels, orientations)):
                if tuple(image.shape[-2:]) != tuple(label.shape[-2:]):
                    file_id = ids[index] if ids is not None else index
                    raise DataError(
                        f"{name} {file_id}: EXIF orientation {o} turns the image to {image.shape[-1]}x"
                        f"{image.shape[-2]}, its label is {label.shape[-1]}x{label.shape[-2]} (protocol "
                        f"{self.protocol.name!r} applies the tag as its reference's reader does; `ovseg data "
                        f"verify` counts tagged images)")
        if entry.settings.center_crop:
            images, labels = map(list, zip(*(center_crop_view(image, label, entry.settings.center_crop)
                                              for image, label in zip(images, labels))))
        preds = self.predict_batch(method, entry, images, [tuple(label.shape[-2:]) for label in labels], labels)
        for index, (image, label, pred) in enumerate(zip(images, labels, preds)):
            entry.metric.update(pred, label)
            entry.num_images += 1
            if len(entry.gallery) < self.gallery_size:
                file_id = str(ids[index]) if ids is not None else str(entry.num_images - 1)
                entry.gallery.append((file_id, to_uint8_hwc(image), label.cpu().numpy(), pred.cpu().numpy()))

    def compute(self) -> dict[str, tuple[torch.Tensor, SegScores, int]]:
        """Confusion matrix (summed over ranks), scores and image count per dataset. Collective:
        every rank must call it."""
        out = {}
        for name, entry in self.datasets.items():
            confmat = entry.metric.compute().cpu()
            num_images = _sum_over_ranks(entry.num_images, confmat.device)
            out[name] = (confmat, scores_from_confusion(confmat), num_images)
        return out


def mix_auxiliary_texts(method: EvaluatedMethod, text: torch.Tensor, vocabulary: Vocabulary,
                        settings: ProtocolSettings, dataset_name: str, background_index: int | None) -> torch.Tensor:
    """Each query's embedding mixed with its class's auxiliary text, ``(1 - w) · own + w · auxiliary`` (the
    protocol's ``auxiliary_texts`` / ``auxiliary_weight``), not re-normalised; classes without one (the background
    class where the file skips it) keep their own (ITACLIP ``itaclip_segmentor.py`` ``__init__``)."""
    source = settings.auxiliary_texts.format(dataset=dataset_name)
    per_class = class_auxiliary_texts(source, vocabulary.class_names, background_index)
    classes = [c for c, aux in enumerate(per_class) if aux is not None]
    auxiliary = method.encode_text([per_class[c] for c in classes], get_templates(settings.templates))
    row = torch.full((len(per_class),), -1, dtype=torch.long)
    row[classes] = torch.arange(len(classes))
    query_rows = row[vocabulary.query_to_class]
    mixed = query_rows >= 0
    weight = settings.auxiliary_weight
    text = text.clone()
    text[mixed] = (1 - weight) * text[mixed] + weight * auxiliary[query_rows[mixed].to(auxiliary.device)].to(text.dtype)
    return text


def refinement_image(method: torch.nn.Module, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """The image post-processing reads (PAMR): the model input, normalised as the method's dense CLIP reads it,
    resized bilinearly to the label size (NACLIP ``predict``). A method without a dense CLIP gives the [0,1] image
    (PAMR's affinities are invariant to a per-channel affine map but for its 1e-8 guard)."""
    encoders = [m for m in method.modules() if isinstance(m, DenseCLIP)]
    if encoders:
        image = encoders[0].normalize(image)
    return F.interpolate(image.float(), size=out_size, mode="bilinear", align_corners=False)


def scoring(method: torch.nn.Module, dataset: str) -> ContextManager[Any]:
    """The method's ``scoring(dataset)`` block around its dense scores, if it has one: a method whose settings are
    tuned per dataset (ResCLIP's released configs) reads which dataset is scored (``predict`` for ``ovseg
    predict``'s words)."""
    hook = getattr(method, "scoring", None)
    return hook(dataset) if callable(hook) else nullcontext()


def originals(method: torch.nn.Module, images: list[torch.Tensor]) -> ContextManager[Any]:
    """The method's ``reading_originals(images)`` block around the dense scores of a whole-image batch, if it has
    one: ``images`` are the batch's images before the protocol's resize (``[3,H,W]`` in [0,1], in batch order), for a
    method that also reads the image at its own resolution (Trident's SAM branch, :mod:`ovseg.methods.trident`)."""
    hook = getattr(method, "reading_originals", None)
    return hook(images) if callable(hook) else nullcontext()


def label_refinement(method: torch.nn.Module
                     ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The method's ``label_refinement``, if it has one that is on: ``(labels [H,W], class probabilities [C,H,W],
    original image [3,H,W] in [0,1]) -> labels``, applied after the protocol's label post-processing, inside the
    method's ``scoring`` block (Trident's SAM refinement, :mod:`ovseg.methods.sam_refinement`)."""
    return getattr(method, "label_refinement", None)


@contextmanager
def dense_options(method: torch.nn.Module, settings: ProtocolSettings) -> Iterator[None]:
    """Every :class:`DenseCLIP` inside ``method`` reads images as the protocol says (normalisation, patch
    padding, positional-embedding resize, image-tower quirks) and encodes text in the protocol's precision for
    the duration of the block."""
    options = DenseOptions(
        normalization=settings.normalization,
        patch_padding=settings.patch_padding,
        pos_embed_interpolation=settings.pos_embed_interpolation,
        vision_activation=settings.vision_activation,
        vision_ln_eps=settings.vision_ln_eps,
        text_precision=settings.text_precision,
        text_ensemble_precision=settings.text_ensemble_precision,
    )
    with ExitStack() as stack:
        for module in method.modules():
            if isinstance(module, DenseCLIP):
                stack.enter_context(module.using(options))
        yield


def _sum_over_ranks(value: int, device: torch.device) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.long, device=device)
        torch.distributed.all_reduce(t)
        return int(t.item())
    return value
