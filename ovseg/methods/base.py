"""``OVSegMethod``: the one base class every method subclasses.

A method provides (the contract with the shared evaluator):

- ``encode_text(names, templates) -> Tensor[Q, D]``: one embedding per query name, prompt-ensembled
  over the protocol's templates (synonyms are separate names the evaluator max-reduces, or, under a protocol
  with ``synonyms: mean_embedding``, one query is a tuple of a class's synonyms: :class:`~ovseg.models.text.TextBank`
  embeds both);
- ``dense_logits(images, text) -> Tensor[B, Q, h', w']``: raw scores for one view or window, images
  ``[B,3,h,w]`` in [0,1] (the method normalises them and owns its resolution handling);
- ``default_protocol`` and ``input_size`` (for protocols that resize to the model's square input);
- if it trains: ``training_step`` and ``configure_optimizers``.

Everything else — resize, tiling, thresholds, metrics, DDP reduction, logging, results files,
prediction pictures — lives in :mod:`ovseg.eval`: the Lightning evaluation hooks below only hand over to
:class:`~ovseg.eval.session.EvaluationSession`.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from ovseg.eval.session import EvaluationSession, EvaluationSettings
from ovseg.utils import random_state


def cosine_logits(features: torch.Tensor, text: torch.Tensor, normalize_text: bool = True) -> torch.Tensor:
    """Dense features ``[B,D,h,w]`` x text ``[Q,D]`` -> cosine similarities ``[B,Q,h,w]`` (contiguous: the einsum
    gives channels-last strides, on which the upsampling to label size runs several times slower).
    ``normalize_text=False`` uses the text embeddings as given (MaskCLIP's ``MaskClipHead.cls_seg``: its fp16
    embeddings were normalised in fp16, their norms 1 only to fp16 precision)."""
    features = F.normalize(features, dim=1)
    text = F.normalize(text.to(features.dtype), dim=-1) if normalize_text else text.to(features.dtype)
    return torch.einsum("bdhw,qd->bqhw", features, text).contiguous()


class PerDatasetSettings:
    """For a method whose released configs tune it per dataset: ``settings`` (dataset -> settings) and ``default``
    (the rest) are set by the method; ``current`` is the one in force while the evaluator scores a dataset inside
    :meth:`scoring` (the evaluator's per-dataset hook, ``ovseg/eval/contract.py``)."""

    settings: dict[str, Any]
    default: Any
    current: Any

    @contextmanager
    def scoring(self, dataset: str) -> Iterator[None]:
        """The evaluator scores ``dataset`` inside the block: its settings apply."""
        previous, self.current = self.current, self.settings.get(dataset, self.default)
        try:
            yield
        finally:
            self.current = previous


class OVSegMethod(L.LightningModule):
    """The base of every method: the contract above, the evaluation settings, the hand-over to the evaluation."""

    default_protocol: str = "maskclip"
    #: settings that belong to the evaluation command, not to the trained weights: every evaluation setting
    EVAL_TIME_SETTINGS = tuple(f.name for f in dataclasses.fields(EvaluationSettings))
    #: constructor arguments left out of the hyper-parameters (modules: record their settings instead)
    HPARAMS_IGNORE: tuple[str, ...] = ()
    #: protocol settings a method pins because they describe how its own weights read images, not the benchmark
    #: pipeline (e.g. a method trained in ovseg keeps its CLIP's normalisation under the ``maskclip`` protocol,
    #: whose ImageNet normalisation / GELU / LayerNorm-eps defaults reproduce MaskCLIP's released model).
    #: ``protocol_overrides`` given by the user still win.
    NATIVE_SETTINGS: dict[str, Any] = {}

    def __init__(
        self,
        protocol: str | None = None,
        protocol_overrides: dict[str, Any] | None = None,
        window_batch_size: int = 8,
        results_dir: str | None = None,
        predict_dir: str | None = None,
        gallery_size: int = 4,
    ):
        """The evaluation settings (:class:`~ovseg.eval.session.EvaluationSettings`); subclasses take them as
        ``**evaluation`` and pass them on.

        Args:
            protocol: evaluation protocol name or YAML path (default: the method's own; ``ovseg list protocols``).
            protocol_overrides: settings replacing the protocol's for every dataset, e.g.
                ``{mode: slide, crop: 448, stride: 224}``.
            window_batch_size: sliding windows per forward pass.
            results_dir: where ``ovseg test`` writes results.json/.md (default: the logger's folder).
            predict_dir: where ``ovseg predict`` writes its pictures (default: ``<log dir>/predictions``).
            gallery_size: after ``ovseg test``, predictions for this many first images of each dataset
                (image | ground truth | prediction) go to wandb, or as PNGs under ``<log dir>/media`` with the
                CSV logger, beside per-class IoU charts; 0 turns the gallery off.
        """
        super().__init__()
        self.save_hyperparameters(ignore=list(self.HPARAMS_IGNORE))
        self.evaluation = EvaluationSession(EvaluationSettings(
            protocol=protocol or self.default_protocol,
            protocol_overrides={**self.NATIVE_SETTINGS, **(protocol_overrides or {})},
            window_batch_size=window_batch_size, results_dir=results_dir, predict_dir=predict_dir,
            gallery_size=gallery_size,
        ))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # LightningCLI re-applies a checkpoint's hyper_parameters over the command line on --ckpt_path;
        # evaluation settings must come from the test command, not from the training run.
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            for key in self.EVAL_TIME_SETTINGS:
                hparams.pop(key, None)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # a resumed fit continues every random stream where it stopped (the data order and augmentations are
            # the loader's, see ovseg.data.datamodule.ResumableLoader)
            checkpoint["ovseg_random_state"] = random_state.capture_all_ranks(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("ovseg_random_state")
        if states and self._trainer is not None and self.trainer.state.fn == "fit":
            if not random_state.restore_own_rank(self, states):
                rank_zero_warn("the checkpoint's random states are from another number of processes: training "
                               "continues with fresh ones (not bit-exact with the original run)")

    # -- the contract -----------------------------------------------------------------------------
    def encode_text(self, names: list[str | tuple[str, ...]], templates: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def dense_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    #: a method whose image side does not depend on the words sets this and splits ``dense_logits`` into
    #: ``logits_from_features(dense_features(images), text)``: ``ovseg demo`` then keeps an image's features and a
    #: new vocabulary on it runs only the text side
    reuses_features: bool = False

    def dense_features(self, images: torch.Tensor) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not split dense_logits (reuses_features is False)")

    def logits_from_features(self, features: Any, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not split dense_logits (reuses_features is False)")

    @property
    def input_size(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not define an input size for square protocols")

    def extra_metrics(self, dataset: str, confmat: Any, class_names: list[list[str]]) -> dict[str, Any]:
        """Method-specific scores added to a dataset's results entry, computed from the (DDP-summed)
        confusion matrix, e.g. CLIP-S4's known/unknown-class mIoU. ``class_names`` are the dataset's own names
        (row/column order of ``confmat``), whatever spelling the protocol's class-name file uses. Keys must not
        clash with the schema."""
        return {}

    @property
    def weights_id(self) -> str:
        """Identity of the weights scored (recorded in results files)."""
        ckpt = getattr(self.trainer, "ckpt_path", None) if self._trainer is not None else None
        return f"checkpoint:{ckpt}" if ckpt else "unknown"

    # -- Lightning's evaluation hooks: handed to the shared evaluation ------------------------------
    def on_validation_epoch_start(self) -> None:
        self.evaluation.start(self)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.step(self, batch)

    def on_validation_epoch_end(self) -> None:
        self.evaluation.finish(self, "val")

    def on_test_start(self) -> None:
        self.evaluation.claim_results_dir(self)

    def on_test_epoch_start(self) -> None:
        self.evaluation.start(self)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluation.step(self, batch)

    def on_test_epoch_end(self) -> None:
        self.evaluation.finish(self, "test")

    def on_predict_epoch_start(self) -> None:
        self.evaluation.start_predict(self)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        return self.evaluation.predict_step(self, batch)

    def on_predict_epoch_end(self) -> None:
        self.evaluation.finish_predict(self)
