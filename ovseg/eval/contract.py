"""What the evaluation needs from a method, as a :class:`typing.Protocol`: ``ovseg.eval`` depends on no method
module (:class:`ovseg.methods.base.OVSegMethod`, a LightningModule, satisfies it), so the layers stay one-way
(``eval ← methods``) and nothing in them imports in a circle."""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch import nn


class EvaluatedMethod(Protocol):
    """A method as :class:`~ovseg.eval.evaluator.Evaluator` and :class:`~ovseg.eval.session.EvaluationSession`
    use it: text and dense image embeddings, and the Lightning state the results record. Optional: a context manager
    ``scoring(dataset)``, entered around the dense scores of each dataset's images (a method with per-dataset
    settings reads the name there; :func:`ovseg.eval.evaluator.scoring`), and a context manager
    ``reading_originals(images)``, entered around the dense scores of each whole-image batch with the batch's images
    before the protocol's resize (a method that reads the image at its own resolution too, as Trident's SAM branch
    does, takes them there; :func:`ovseg.eval.evaluator.originals`), and a ``label_refinement`` attribute: None, or
    ``(labels [H,W], class probabilities [C,H,W], original image [3,H,W]) -> labels`` applied to each label map last
    (Trident's SAM refinement; :func:`ovseg.eval.evaluator.label_refinement`)."""

    device: torch.device
    trainer: Any  #: the Lightning Trainer running it
    hparams: Any
    global_step: int
    loggers: list[Any]

    @property
    def weights_id(self) -> str: ...

    @property
    def input_size(self) -> int: ...

    #: a name is a string, or a tuple of one class's synonyms (protocol setting ``synonyms: mean_embedding``)
    def encode_text(self, names: list[str | tuple[str, ...]], templates: list[str]) -> torch.Tensor: ...

    def dense_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor: ...

    #: True when ``dense_logits(x, text) == logits_from_features(dense_features(x), text)``: the image side does
    #: not depend on the words, and a cache may keep it across vocabularies
    reuses_features: bool

    def dense_features(self, images: torch.Tensor) -> Any: ...

    def logits_from_features(self, features: Any, text: torch.Tensor) -> torch.Tensor: ...

    def extra_metrics(self, dataset: str, confmat: np.ndarray, class_names: list[list[str]]) -> dict[str, Any]: ...

    def log(self, name: str, value: Any, **kwargs: Any) -> None: ...

    def modules(self) -> Iterator[nn.Module]: ...
