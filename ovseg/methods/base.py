"""``OVSegMethod``: the one base class every method subclasses.

A method provides (the contract with the shared evaluator):

- ``encode_text(names, templates) -> Tensor[Q, D]``: one embedding per query name, prompt-ensembled
  over the protocol's templates (synonyms are separate names; the evaluator max-reduces them);
- ``dense_logits(images, text) -> Tensor[B, Q, h', w']``: raw scores for one view or window, images
  ``[B,3,h,w]`` in [0,1] (the method normalises them and owns its resolution handling);
- ``default_protocol`` and ``input_size`` (for protocols that resize to the model's square input);
- if it trains: ``training_step`` and ``configure_optimizers``.

Everything else — resize, tiling, thresholds, metrics, DDP reduction, logging, results files,
prediction pictures — lives here and in :mod:`ovseg.eval`, shared by all methods.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ovseg.eval.evaluator import Evaluator
from ovseg.eval.protocols import load_protocol
from ovseg.eval.results import build_results, dataset_entry, summary_table, write_results


def cosine_logits(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Dense features ``[B,D,h,w]`` x text ``[Q,D]`` -> cosine similarities ``[B,Q,h,w]``."""
    features = F.normalize(features, dim=1)
    text = F.normalize(text.to(features.dtype), dim=-1)
    return torch.einsum("bdhw,qd->bqhw", features, text)


class OVSegMethod(L.LightningModule):
    """
    Args:
        protocol: evaluation protocol name or YAML path (default: the method's own).
        protocol_overrides: settings replacing the protocol's for every dataset, e.g.
            ``{mode: slide, crop: 448, stride: 224}``.
        window_batch_size: sliding windows per forward pass.
        results_dir: where ``ovseg test`` writes results.json/.md (default: the logger's folder).
        predict_dir: where ``ovseg predict`` writes its pictures (default: ``<log dir>/predictions``).
        gallery_size: after ``ovseg test``, predictions for this many first images of each dataset
            (image | ground truth | prediction) go to wandb, or as PNGs under ``<log dir>/media`` with the
            CSV logger, beside per-class IoU charts; 0 turns the gallery off.
    """

    default_protocol: str = "maskclip"
    #: settings that belong to the evaluation command, not to the trained weights
    EVAL_TIME_SETTINGS = ("protocol", "protocol_overrides", "window_batch_size", "results_dir", "predict_dir")
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
        super().__init__()
        self.save_hyperparameters(ignore=list(self.HPARAMS_IGNORE))
        self.protocol_name = protocol or self.default_protocol
        self.protocol_overrides = {**self.NATIVE_SETTINGS, **(protocol_overrides or {})}
        load_protocol(self.protocol_name)  # fail at construction on an unknown protocol
        self.window_batch_size = window_batch_size
        self.results_dir = results_dir
        self.predict_dir = predict_dir
        self.gallery_size = gallery_size
        self.evaluator: Evaluator | None = None
        self.results: dict[str, Any] | None = None
        self.results_paths: tuple[Path, Path] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # LightningCLI re-applies a checkpoint's hyper_parameters over the command line on --ckpt_path;
        # evaluation settings must come from the test command, not from the training run.
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            for key in self.EVAL_TIME_SETTINGS:
                hparams.pop(key, None)

    # -- the contract -----------------------------------------------------------------------------
    def encode_text(self, names: list[str], templates: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def dense_logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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

    # -- evaluation (shared) ----------------------------------------------------------------------
    def _start_evaluation(self) -> None:
        datamodule = self.trainer.datamodule
        self.evaluator = Evaluator(
            load_protocol(self.protocol_name), self.protocol_overrides, window_batch_size=self.window_batch_size,
            gallery_size=self.gallery_size,
        )
        for dataset in datamodule.eval_datasets:
            self.evaluator.add_dataset(
                self, dataset.name, dataset.class_names, dataset.background_index, self.device
            )
        self._eval_started = time.perf_counter()

    def _eval_step(self, batch: dict) -> None:
        name = batch["meta"][0]["dataset"]
        self.evaluator.update(self, name, batch["image"], batch["label"], [m["id"] for m in batch["meta"]])

    def _finish_evaluation(self, stage: str) -> dict[str, Any]:
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
            datasets[name].update(self.extra_metrics(name, confmat.numpy(), own_names))
        self._log_scores(stage, datasets)
        return build_results(
            method=type(self).__name__,
            weights=self.weights_id,
            world_size=self.trainer.world_size,
            config=self._config_record(),
            protocol={"name": protocol.name, "version": protocol.version, "source": Path(protocol.source).name},
            datasets=datasets,
        )

    def _run_dir(self) -> Path:
        """This run's own folder: the CSV/TensorBoard version folder, else ``save_dir/name/version``
        (wandb), so runs never overwrite each other's results."""
        logger = self.logger
        if logger is None:
            return Path(self.trainer.default_root_dir)
        if getattr(logger, "log_dir", None):
            return Path(logger.log_dir)
        return Path(logger.save_dir or self.trainer.default_root_dir) / str(logger.name) / str(logger.version)

    def _log_scores(self, stage: str, datasets: dict[str, dict[str, Any]]) -> None:
        scores = {
            f"{stage}/{name}/{metric}": d[metric]
            for name, d in datasets.items()
            for metric in ("mIoU", "pAcc", "mAcc")
            if d[metric] is not None
        }
        if stage == "val":
            # through self.log so checkpointing/early stopping can monitor e.g. val/voc20/mIoU
            for key, value in scores.items():
                self.log(key, value, add_dataloader_idx=False, rank_zero_only=True)
        elif self.trainer.is_global_zero:
            # test: straight to the loggers; our own table replaces Lightning's per-dataloader one
            per_class = {
                f"{stage}/{name}/IoU/{cls}": v["IoU"]
                for name, d in datasets.items()
                for cls, v in d["per_class"].items()
                if v["IoU"] is not None
            }
            for logger in self.loggers:
                logger.log_metrics({**scores, **per_class}, step=self.global_step)

    def _config_record(self) -> dict[str, Any]:
        record = {"model": {"class_path": f"{type(self).__module__}.{type(self).__name__}", **_plain(self.hparams)}}
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "hparams", None):
            record["data"] = _plain(datamodule.hparams)
        return record

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self.results = self._finish_evaluation("test")
        if self.trainer.is_global_zero:
            self.results_paths = write_results(self.results_dir or self._run_dir(), self.results)
            seconds = time.perf_counter() - self._eval_started
            rank_zero_info(
                f"\n{summary_table(self.results)}\n\n{self.results['method']} · protocol {self.protocol_name} · "
                f"{seconds:.1f}s\nresults: {self.results_paths[0]}\n         {self.results_paths[1]}"
            )
            # wandb: score tables, per-class IoU bar charts, a gallery; file loggers: the same as PNGs.
            # Pictures must never cost a finished evaluation its results.
            try:
                from ovseg.eval.visualize import log_test_media

                log_test_media(self, self.results, self.gallery_size)
            except Exception as err:  # noqa: BLE001
                rank_zero_warn(f"could not log the result pictures/tables: {type(err).__name__}: {err}")

    # -- prediction on arbitrary images and words -------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        from ovseg.eval.evaluator import Vocabulary

        datamodule = self.trainer.datamodule
        self.evaluator = Evaluator(
            load_protocol(self.protocol_name), self.protocol_overrides, window_batch_size=self.window_batch_size
        )
        # arbitrary words: the given names only, no dataset-specific background rules
        settings = dataclasses.replace(
            self.evaluator.settings_for(None), class_names="{dataset}", prob_threshold=None, area_threshold=None,
            background_names=[],
        )
        self.evaluator.add_dataset(self, "predict", datamodule.predict_class_names, None, self.device, settings)
        self._predict_vocabulary: Vocabulary = self.evaluator.datasets["predict"].vocabulary
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        self._predict_out = Path(self.predict_dir or Path(log_dir) / "predictions")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        from ovseg.eval.visualize import save_prediction

        entry = self.evaluator.datasets["predict"]
        written = []
        for image, meta in zip(batch["image"], batch["meta"]):
            pred = self.evaluator.predict(self, entry, image, tuple(image.shape[-2:]))
            written.append(
                str(save_prediction(self._predict_out, meta["id"], image, pred, self._predict_vocabulary.display_names))
            )
        return written

    def on_predict_epoch_end(self) -> None:
        if self.trainer.is_global_zero:
            rank_zero_info(f"predictions: {self._predict_out}")


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
