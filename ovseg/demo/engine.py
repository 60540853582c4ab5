"""What ``ovseg demo`` computes, without the web page: several methods loaded once, each run on one image with one
vocabulary through ``ovseg predict``'s own path (:func:`ovseg.runner.load_predict_method` builds the method as
``ovseg predict`` does; :class:`ovseg.eval.session.Predictor` is its inference).

Kept between queries: each model; per protocol choice one Predictor, whose text embeddings are kept per vocabulary;
for methods whose image side does not depend on the words (``reuses_features``: CLIP, MaskCLIP with or without
KS+PD, SCLIP, NACLIP, ClearCLIP, PixelCLIP, CLIP-S4, MaskCLIP+; not the k-NN / linear probes) the image features of
the last images, so a new vocabulary on the same image runs only the text side.

Nothing here reads a path that a browser sends: images come as the bytes of an upload (whose path the web framework
chose, checked to lie in its upload folder) or as an id of the ``--images`` listing made here.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovseg.data.classnames import parse_inline_classes
from ovseg.data.datamodule import to_unit_float
from ovseg.data.files import DataError, read_image
from ovseg.data.seg_dataset import ImageFolderDataset
from ovseg.eval.protocols import ProtocolSettings
from ovseg.eval.session import Predictor
from ovseg.eval.visualize import CLASS_COLOURS, save_label_png

#: largest upload accepted (also given to the web server, which refuses larger bodies before they are read)
DEFAULT_MAX_UPLOAD_MB = 20


class DemoError(ValueError):
    """A problem with what the user gave (image, words, settings): shown in the page as one line."""


@dataclass(frozen=True)
class ProtocolChoice:
    """The page's protocol settings: a protocol (None: each method's own) and window / resize overrides."""

    protocol: str | None = None
    mode: str | None = None  #: None: the protocol's; "whole" or "slide"
    crop: int | None = None
    stride: int | None = None
    short_side: int | None = None  #: resize so the short side is this (the long side capped at 4x it)

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.mode == "slide":
            if not (self.crop and self.stride and 0 < self.stride <= self.crop):
                raise DemoError("sliding windows need a crop and a stride with 0 < stride <= crop")
            out.update(mode="slide", crop=int(self.crop), stride=int(self.stride))
        elif self.mode == "whole":
            out.update(mode="whole")
        elif self.mode is not None:
            raise DemoError(f"unknown mode {self.mode!r}: whole or slide")
        if self.short_side:
            out.update(short_side=int(self.short_side), long_side_max=4 * int(self.short_side))
        return out


def describe_protocol(name: str, version: int, s: ProtocolSettings) -> str:
    """One line: what decides the picture besides the model."""
    if s.short_side:
        resize = f"short side {s.short_side}" + (f" (long side <= {s.long_side_max})" if s.long_side_max else "")
    else:
        resize = "own size"
    if s.square:
        resize += f", then square {s.square}"
    mode = f"slide {s.crop}/{s.stride}" if s.mode == "slide" else "whole image"
    templates = s.templates if isinstance(s.templates, str) else f"{len(s.templates)} templates"
    extra = [f"PAMR {s.pamr_steps} steps"] if s.pamr_steps else []
    threshold = "no background threshold" if s.prob_threshold is None else f"threshold {s.prob_threshold}"
    return " · ".join([f"protocol {name} v{version}", resize, mode, f"templates {templates}", threshold, *extra])


@dataclass
class LoadedMethod:
    """One method of the page: built once as ``ovseg predict`` builds it."""

    config: str
    ckpt_path: str | None
    method: Any
    trainer: Any
    predictors: dict[ProtocolChoice, Predictor] = field(default_factory=dict)

    @classmethod
    def load(cls, config: str, ckpt_path: str | None = None, extra_args: list[str] | None = None) -> LoadedMethod:
        from ovseg.runner import load_predict_method

        args = ["--config", config, *(["--ckpt_path", ckpt_path] if ckpt_path else []), *(extra_args or [])]
        method, trainer, ckpt = load_predict_method(args)
        return cls(config, ckpt, method, trainer)

    @property
    def name(self) -> str:
        return type(self.method).__name__

    @property
    def weights(self) -> str:
        return f"checkpoint:{self.ckpt_path}" if self.ckpt_path else self.method.weights_id

    @property
    def device(self) -> torch.device:
        return self.trainer.strategy.root_device

    def predictor(self, choice: ProtocolChoice) -> Predictor:
        if choice not in self.predictors:
            own = self.method.evaluation.settings
            settings = dataclasses.replace(own, protocol=choice.protocol or own.protocol,
                                           protocol_overrides={**own.protocol_overrides, **choice.overrides()})
            self.predictors[choice] = Predictor(settings, reuse_features=True)
        return self.predictors[choice]

    @torch.inference_mode()
    def predict(self, image: torch.Tensor, class_names: list[list[str]], choice: ProtocolChoice) -> torch.Tensor:
        """``image`` uint8 ``[3,H,W]`` -> class ids ``[H,W]``, as ``ovseg predict`` computes them: the text encoded
        outside, the image inside the Trainer's precision context (Lightning's predict loop does both so)."""
        predictor = self.predictor(choice)
        predictor.vocabulary(self.method, class_names)
        with self.trainer.precision_plugin.predict_step_context():
            return predictor.predict(self.method, to_unit_float(image.to(self.device)), class_names).cpu()


@dataclass
class MethodResult:
    method: str
    config: str
    weights: str
    protocol: str
    class_names: list[str]
    pred: np.ndarray  #: class ids [H, W]
    seconds: float
    features_reused: bool
    label_png: Path | None = None

    @property
    def shares(self) -> dict[str, float]:
        """Each class present -> its fraction of the pixels, largest first."""
        counts = np.bincount(self.pred.ravel(), minlength=len(self.class_names))
        order = np.argsort(-counts, kind="stable")
        return {self.class_names[c]: float(counts[c] / self.pred.size) for c in order if counts[c]}

    def colour(self, name: str) -> str:
        r, g, b = CLASS_COLOURS[self.class_names.index(name) % len(CLASS_COLOURS)]
        return f"#{int(r):02x}{int(g):02x}{int(b):02x}"


class DemoEngine:
    """The methods of one ``ovseg demo``, the images it may show, and where it writes label maps."""

    def __init__(self, methods: list[LoadedMethod], images: str | Path | None = None,
                 max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, out_dir: str | Path | None = None):
        if not methods:
            raise ValueError("ovseg demo needs at least one method (--config FILE)")
        self.methods = methods
        self.listing = ImageFolderDataset(images) if images else None
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="ovseg-demo-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one query at a time: the models and caches are shared
        self._queries = 0

    @property
    def queries(self) -> int:
        """How many queries the page has run."""
        return self._queries

    # -- images ---------------------------------------------------------------------------------------------------
    @property
    def image_ids(self) -> list[str]:
        return list(self.listing.ids) if self.listing is not None else []

    def listed_image(self, image_id: str) -> np.ndarray:
        """An image of ``--images`` by its id, read as ``ovseg predict`` reads it (EXIF orientation applied)."""
        if self.listing is None or image_id not in self.listing.ids:
            raise DemoError(f"unknown image {image_id!r}: pick one of the listed images")
        return self.listing[self.listing.ids.index(image_id)]["image"].numpy().transpose(1, 2, 0)

    def uploaded_image(self, path: str | Path, upload_root: str | Path, name: str = "the uploaded image") -> np.ndarray:
        """An upload the web server stored at ``path``, which must lie inside ``upload_root`` (its upload folder):
        any other path is refused unread. Read as ``ovseg predict`` reads a file."""
        path, root = Path(path).resolve(), Path(upload_root).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise DemoError(f"{name}: not an upload of this page")
        if path.stat().st_size > self.max_upload_bytes:
            raise DemoError(f"{name}: {path.stat().st_size / 2**20:.1f} MB, larger than the "
                            f"{self.max_upload_bytes / 2**20:.0f} MB limit")
        try:
            return read_image(path, name=name, exif_orientation=True)
        except DataError as err:
            raise DemoError(str(err)) from None

    # -- a query --------------------------------------------------------------------------------------------------
    @staticmethod
    def vocabulary(text: str | None) -> list[list[str]]:
        """Words typed in the page: ``"cat,dog;puppy,sky"`` (never a file name)."""
        if not text or not text.strip(" ,;\n\t"):
            raise DemoError("no class names: type some, comma-separated (';' between synonyms)")
        try:
            return parse_inline_classes(text.replace("\n", ","))
        except ValueError as err:
            raise DemoError(str(err)) from None

    def run(self, image: np.ndarray, words: str, choice: ProtocolChoice = ProtocolChoice(),
            methods: list[int] | None = None) -> list[MethodResult]:
        """Every method (or those of ``methods``) on ``image`` (uint8 ``[H,W,3]``) with ``words``."""
        class_names = self.vocabulary(words)
        if image is None or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
            raise DemoError("no image: upload one or pick a listed one")
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        display = [synonyms[0] for synonyms in class_names]
        results = []
        with self._lock:
            self._queries += 1
            for index, loaded in enumerate(self.methods):
                if methods is not None and index not in methods:
                    continue
                try:
                    predictor = loaded.predictor(choice)
                    cache = predictor.evaluator.feature_cache
                    hits = cache.hits if cache is not None else 0
                    started = time.perf_counter()
                    pred = loaded.predict(tensor, class_names, choice).numpy().astype(np.int64)
                    seconds = time.perf_counter() - started
                except DemoError:
                    raise
                except (ValueError, KeyError) as err:  # a bad setting for this method (e.g. a protocol it cannot run)
                    raise DemoError(f"{loaded.name}: {err}") from None
                protocol = predictor.evaluator.protocol
                result = MethodResult(
                    method=loaded.name, config=loaded.config, weights=loaded.weights,
                    protocol=describe_protocol(protocol.name, protocol.version, predictor.settings),
                    class_names=display, pred=pred, seconds=seconds,
                    features_reused=cache is not None and cache.hits > hits,
                )
                result.label_png = self.out_dir / f"query{self._queries}_{index}_{loaded.name}_label.png"
                save_label_png(result.label_png, pred, len(display))
                results.append(result)
        return results
