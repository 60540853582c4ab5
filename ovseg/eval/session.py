"""One evaluation pass of a method inside a Lightning run: ``validate``, ``test`` or ``predict``.

:class:`~ovseg.methods.base.OVSegMethod` forwards its Lightning hooks here, so a method says what it computes
(``encode_text`` / ``dense_logits``) and this module owns the rest of the lifecycle: building the
:class:`~ovseg.eval.evaluator.Evaluator` for the DataModule's datasets, feeding it batches, the DDP-summed scores,
logging, ``results.json``/``.md``, the pictures (from the predictions the evaluator kept) and ``ovseg predict``'s
label images.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ovseg.eval.contract import EvaluatedMethod
from ovseg.eval.evaluator import DatasetEvaluation, Evaluator, FeatureCache
from ovseg.eval.protocols import ProtocolSettings, load_protocol
from ovseg.eval.results import build_results, dataset_entry, summary_table, write_results



#: field metadata of :class:`EvaluationSettings`: False on a setting that changes no score (where files go, how
#: many windows share a forward pass, how many pictures are drawn)
SCORES = "scores"


@dataclasses.dataclass
class EvaluationSettings:
    """How a method is evaluated; given once, as the method's ``protocol`` … ``gallery_size`` arguments (each field
    is documented there, :class:`~ovseg.methods.base.OVSegMethod`, where ``--help`` shows it)."""

    protocol: str
    protocol_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    window_batch_size: int = dataclasses.field(default=8, metadata={SCORES: False})
    results_dir: str | None = dataclasses.field(default=None, metadata={SCORES: False})
    predict_dir: str | None = dataclasses.field(default=None, metadata={SCORES: False})
    gallery_size: int = dataclasses.field(default=4, metadata={SCORES: False})

    @classmethod
    def score_free(cls) -> tuple[str, ...]:
        """The settings that change no score."""
        return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get(SCORES, True))

    def __post_init__(self):
        load_protocol(self.protocol)  # fail at construction on an unknown protocol

    def evaluator(self, gallery_size: int = 0) -> Evaluator:
        return Evaluator(load_protocol(self.protocol), self.protocol_overrides,
                         window_batch_size=self.window_batch_size, gallery_size=gallery_size)


class EvaluationSession:
    """The evaluation state of one method across validate / test / predict passes."""

    def __init__(self, settings: EvaluationSettings):
        self.settings = settings
        self.evaluator: Evaluator | None = None
        #: the last ``ovseg test``'s results (the results.json schema) and where they were written
        self.results: dict[str, Any] | None = None
        self.results_paths: tuple[Path, Path] | None = None
        self._started = 0.0
        self._predict_out: Path | None = None
        self._results_claim: Path | None = None

    # -- validate / test ----------------------------------------------------------------------------------------
    def start(self, method: EvaluatedMethod) -> None:
        self.evaluator = self.settings.evaluator(self.settings.gallery_size)
        for dataset in method.trainer.datamodule.eval_datasets:
            self.evaluator.add_dataset(method, dataset.name, dataset.class_names, dataset.background_index,
                                       method.device, ignore_index=dataset.ignore_index)
        self._started = time.perf_counter()

    def step(self, method: EvaluatedMethod, batch: dict) -> None:
        name = batch["meta"][0]["dataset"]
        self.evaluator.update(method, name, batch["image"], batch["label"], [m["id"] for m in batch["meta"]],
                              [m.get("exif_orientation", 1) for m in batch["meta"]])

    def finish(self, method: EvaluatedMethod, stage: str) -> dict[str, Any]:
        """Collective (every rank calls it): the DDP-summed scores, logged under ``stage``; on ``test`` rank 0
        also writes the results files and the pictures."""
        computed = self.evaluator.compute()
        protocol = self.evaluator.protocol
        datasets = {}
        for name, (confmat, scores, num_images) in computed.items():
            entry = self.evaluator.datasets[name]
            datasets[name] = dataset_entry(
                protocol.name, entry.settings.as_dict(), entry.vocabulary.class_names, entry.class_names_source,
                confmat.numpy(), scores, num_images,
            )
            own_names = entry.dataset_class_names or entry.vocabulary.class_names
            datasets[name].update(method.extra_metrics(name, confmat.numpy(), own_names))
        _log_scores(method, stage, datasets)
        results = build_results(
            method=type(method).__name__,
            weights=method.weights_id,
            world_size=method.trainer.world_size,
            config=config_record(method),
            protocol={"name": protocol.name, "version": protocol.version, "source": Path(protocol.source).name},
            datasets=datasets,
        )
        if stage == "test":
            self.results = results
            if method.trainer.is_global_zero:
                self._write_test_outputs(method)
        return results

    def claim_results_dir(self, method: EvaluatedMethod) -> None:
        """Rank 0 of ``ovseg test``, before scoring: an explicit ``results_dir`` is this run's until it has written
        (two tests writing into one folder are refused; results of an earlier run are replaced with a warning)."""
        self._results_claim = None
        if not (self.settings.results_dir and method.trainer.is_global_zero):
            return
        from ovseg.utils.io import claim_file

        folder = Path(self.settings.results_dir)
        self._results_claim = claim_file(folder / ".ovseg-results.claim", f"results folder {folder}")
        if (folder / "results.json").exists():
            rank_zero_warn(f"{folder / 'results.json'} holds the results of an earlier run; this run replaces them")

    def _write_test_outputs(self, method: EvaluatedMethod) -> None:
        self.results_paths = write_results(self.settings.results_dir or run_dir(method.trainer), self.results)
        if self._results_claim is not None:
            self._results_claim.unlink(missing_ok=True)
            self._results_claim = None
        seconds = time.perf_counter() - self._started
        rank_zero_info(
            f"\n{summary_table(self.results)}\n\n{self.results['method']} · protocol {self.settings.protocol} · "
            f"{seconds:.1f}s\nresults: {self.results_paths[0]}\n         {self.results_paths[1]}"
        )
        # wandb: score tables, per-class IoU bar charts, a gallery; file loggers: the same as PNGs.
        # Pictures must never cost a finished evaluation its results.
        try:
            from ovseg.eval.visualize import log_test_media

            log_test_media(method.loggers, self, self.results, self.settings.gallery_size)
        except Exception as err:  # noqa: BLE001
            rank_zero_warn(f"could not log the result pictures/tables: {type(err).__name__}: {err}")

    # -- predict: arbitrary images and words ---------------------------------------------------------------------
    def start_predict(self, method: EvaluatedMethod) -> None:
        self.predictor = Predictor(self.settings)
        self._predict_classes = method.trainer.datamodule.predict_class_names
        self.predictor.vocabulary(method, self._predict_classes)  # the text is encoded once, before any image
        self._predict_out = self.predict_output_dir(method.trainer)

    def predict_output_dir(self, trainer: Any) -> Path:
        """Where ``ovseg predict`` writes: ``predict_dir``, else ``<log dir>/predictions``."""
        return Path(self.settings.predict_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")

    def predict_step(self, method: EvaluatedMethod, batch: dict) -> list[str]:
        from ovseg.eval.visualize import save_prediction

        vocabulary = self.predictor.vocabulary(method, self._predict_classes).vocabulary
        written = []
        for image, meta in zip(batch["image"], batch["meta"]):
            pred = self.predictor.predict(method, image, self._predict_classes)
            written.append(str(save_prediction(self._predict_out, meta["id"], image, pred, vocabulary.display_names)))
        return written

    def finish_predict(self, method: EvaluatedMethod) -> None:
        if method.trainer.is_global_zero:
            rank_zero_info(f"predictions: {self._predict_out}")


def predict_settings(evaluator: Evaluator) -> ProtocolSettings:
    """The protocol's settings for arbitrary words (``ovseg predict``, ``ovseg demo``): the given names only, no
    dataset-specific background rules, thresholds or auxiliary class texts."""
    return dataclasses.replace(evaluator.settings_for(None), class_names="{dataset}", prob_threshold=None,
                               area_threshold=None, background_names=[],
                               auxiliary_texts=None)


class Predictor:
    """``ovseg predict``'s inference, for any number of images and vocabularies: one method under one protocol
    (:class:`EvaluationSettings`). Each vocabulary's text is encoded once and kept; ``reuse_features`` (``ovseg
    demo``): the image features of the last images are kept, so a new vocabulary on the same image runs only the
    text side, for methods whose features do not depend on the words (``OVSegMethod.reuses_features``)."""

    def __init__(self, settings: EvaluationSettings, reuse_features: bool = False):
        self.evaluator = settings.evaluator()
        if reuse_features:
            self.evaluator.feature_cache = FeatureCache()
        self.settings = predict_settings(self.evaluator)
        self._entries: dict[tuple[tuple[str, ...], ...], DatasetEvaluation] = {}

    def vocabulary(self, method: EvaluatedMethod, class_names: list[list[str]]) -> DatasetEvaluation:
        """The evaluator's entry (text embeddings, names) of a vocabulary, encoded on its first use."""
        key = tuple(tuple(synonyms) for synonyms in class_names)
        if key not in self._entries:
            self._entries[key] = self.evaluator.add_dataset(method, f"predict:{len(self._entries)}",
                                                            [list(s) for s in key], None, method.device,
                                                            self.settings)
        return self._entries[key]

    def predict(self, method: EvaluatedMethod, image: torch.Tensor, class_names: list[list[str]]) -> torch.Tensor:
        """An image ``[3,H,W]`` in [0,1] -> class ids ``[H,W]`` (indices into ``class_names``) at its size."""
        entry = self.vocabulary(method, class_names)
        return self.evaluator.predict(method, entry, image.to(method.device), tuple(image.shape[-2:]))


def run_dir(trainer: Any) -> Path:
    """This run's own folder: the CSV/TensorBoard version folder, else ``save_dir/name/version`` (wandb), so runs
    never overwrite each other's results or configs."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    if getattr(logger, "log_dir", None):
        return Path(logger.log_dir)
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / str(logger.version)


def _log_scores(method: EvaluatedMethod, stage: str, datasets: dict[str, dict[str, Any]]) -> None:
    scores = {
        f"{stage}/{name}/{metric}": d[metric]
        for name, d in datasets.items()
        for metric in ("mIoU", "pAcc", "mAcc")
        if d[metric] is not None
    }
    if stage == "val":
        # through LightningModule.log so checkpointing/early stopping can monitor e.g. val/voc20/mIoU
        for key, value in scores.items():
            method.log(key, value, add_dataloader_idx=False, rank_zero_only=True)
    elif method.trainer.is_global_zero:
        # test: straight to the loggers; our own table replaces Lightning's per-dataloader one
        per_class = {
            f"{stage}/{name}/IoU/{cls}": v["IoU"]
            for name, d in datasets.items()
            for cls, v in d["per_class"].items()
            if v["IoU"] is not None
        }
        for logger in method.loggers:
            logger.log_metrics({**scores, **per_class}, step=method.global_step)


def config_record(method: EvaluatedMethod) -> dict[str, Any]:
    """The settings that produced a results file: the method's class path and hyper-parameters, the DataModule's."""
    record = {"model": {"class_path": f"{type(method).__module__}.{type(method).__name__}", **_plain(method.hparams)}}
    datamodule = getattr(method.trainer, "datamodule", None)
    if datamodule is not None and getattr(datamodule, "hparams", None):
        record["data"] = _plain(datamodule.hparams)
    return record


def _plain(value: Any) -> Any:
    """hparams -> JSON-safe plain data (dataclasses and objects become dicts/strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict) or hasattr(value, "items"):
        # jsonargparse's bookkeeping keys (``_class_path``) are not settings
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    return str(value)
