"""The one DataModule every method runs behind.

Evaluation: one loader per benchmark dataset, sharded without repetition under DDP (exact
confusion matrices). Prediction: an image folder. Training sources are added by the training
methods' data hooks (``train_dataset``); training-free methods need none.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ovseg.data.classnames import parse_class_list
from ovseg.data.samplers import EpochSeededSamples, ResumableShuffleSampler, UnrepeatedShardSampler
from ovseg.data.seg_dataset import ImageFolderDataset, SegFileDataset, collate_samples
from ovseg.data.sources import TrainSource, seed_worker

#: the datasets scored when ``datasets`` is not given
DEFAULT_DATASETS: tuple[str, ...] = ("voc21",)


class OVSegDataModule(L.LightningDataModule):
    """The evaluation datasets, the images to predict on and the training source of a run."""

    def __init__(
        self,
        root: str = "data",
        datasets: list[str | dict[str, Any]] | None = None,
        split: str = "val",
        eval_batch_size: int = 1,
        num_workers: int = 2,
        limit: int | None = None,
        predict_images: str | None = None,
        predict_classes: str | None = None,
        train: TrainSource | None = None,
        batch_size: int = 8,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ):
        """Datasets under one data root, and how they are loaded.

        Args:
            root: data root holding the datasets in their mmsegmentation layouts.
            datasets: evaluation datasets by spec name (``voc21``, ``context59``, ...) or, for a user's
                own labelled set, a dict understood by :func:`ovseg.data.hf.build_hf_dataset`.
            split: evaluation split.
            eval_batch_size: images per evaluation batch (images keep their own sizes).
            num_workers: loader worker processes.
            limit: evaluate only the first N images of each dataset (smoke tests).
            predict_images: image file or folder for ``ovseg predict``.
            predict_classes: class names for ``ovseg predict``: ``"cat,dog,sky"`` or a class-name file.
            train: the training source (see :mod:`ovseg.data.sources`); None for training-free methods.
            batch_size: training samples per process (the global batch is ``batch_size x world size``).
            pin_memory: page-locked batches for faster, asynchronous host-to-GPU copies; None: on when the run uses a
                CUDA device.
            persistent_workers: keep the training loader's workers alive across epochs (no re-spawn, and each keeps
                its open SA-1B tar files).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["train"])
        self.root = root
        self.dataset_entries = list(datasets if datasets is not None else DEFAULT_DATASETS)
        self.split = split
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.limit = limit
        self.predict_images = predict_images
        self.predict_classes = predict_classes
        self.eval_datasets: list[Dataset] = []
        self.predict_dataset: ImageFolderDataset | None = None
        self.train_source = train
        self.batch_size = batch_size
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.train_dataset: Dataset | None = None

    # -- building ---------------------------------------------------------------------------------
    def build_eval_dataset(self, entry: str | dict[str, Any]) -> Dataset:
        if isinstance(entry, str):
            return SegFileDataset(entry, self.root, self.split, limit=self.limit)
        from ovseg.data.hf import build_hf_dataset

        return build_hf_dataset(entry, root=self.root, limit=self.limit)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.train_dataset is None:
            if self.train_source is None:
                raise ValueError("`ovseg fit` needs a training source: --data.train (see ovseg/data/sources.py)")
            self.train_dataset = self.train_source.build(self.root)
        if stage in (None, "fit", "validate", "test") and not self.eval_datasets:
            self.eval_datasets = [self.build_eval_dataset(e) for e in self.dataset_entries]
            names = [d.name for d in self.eval_datasets]
            if len(set(names)) != len(names):
                raise ValueError(f"evaluation dataset names must be unique, got {names}")
        if stage == "predict" and self.predict_dataset is None:
            if not self.predict_images:
                raise ValueError("`ovseg predict` needs --images DIR (or --data.predict_images)")
            if not self.predict_classes:
                raise ValueError('`ovseg predict` needs --classes "cat,dog,..." or a class-name file')
            # a predict_dir inside the image folder: a second run must not predict the first one's pictures
            method = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            session = getattr(method, "evaluation", None)
            outputs = session.predict_output_dir(self.trainer) if session is not None else None
            self.predict_dataset = ImageFolderDataset(self.predict_images, exclude=outputs)

    @property
    def predict_class_names(self) -> list[list[str]]:
        return parse_class_list(self.predict_classes) if self.predict_classes else []

    # -- loaders ----------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
                raise RuntimeError(
                    "exact distributed evaluation needs Trainer(use_distributed_sampler=False): Lightning's "
                    "sampler repeats samples to even out ranks, which changes the metrics"
                )
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _pin_memory(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _eval_loader(self, dataset: Dataset, collate: Callable = collate_samples) -> DataLoader:
        rank, world = self._rank_world()
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=UnrepeatedShardSampler(len(dataset), rank, world),
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=False,
            pin_memory=self._pin_memory(),
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        seed = torch.initial_seed() % 2**31  # the run's seed (seed_everything), the same again on resume
        dataset = EpochSeededSamples(self.train_dataset, seed)
        return ResumableLoader(
            dataset,
            position=self._train_position,
            batch_size=self.batch_size,
            # DistributedSampler's order; Lightning calls sampler.set_epoch each epoch
            sampler=ResumableShuffleSampler(len(dataset), rank, world, seed),
            num_workers=self.num_workers,
            collate_fn=self.train_source.collate,
            worker_init_fn=seed_worker,
            drop_last=True,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self._pin_memory(),
            # the loader's own stream for worker seeds: iterating never draws from the model's torch stream
            generator=torch.Generator().manual_seed(seed),
        )

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches of it trained on) now, from Lightning's progress counters (the loader itself has already
        prefetched further)."""
        loop = self.trainer.fit_loop
        return self.trainer.current_epoch, loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(d) for d in self.eval_datasets]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(d) for d in self.eval_datasets]

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_dataset)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # uint8 travels (4x less to copy); methods receive float images in [0, 1].
        if isinstance(batch, dict) and "image" in batch:
            images = batch["image"]
            if isinstance(images, list):
                batch["image"] = [to_unit_float(im) for im in images]
            else:
                batch["image"] = to_unit_float(images)
        return batch


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def training_set_fingerprint(dataset: Any) -> str:
    """The training set's identity as checkpoints record it: its ``fingerprint()`` (ids and sizes of the samples)
    where it has one, else its length; through :class:`~ovseg.data.samplers.EpochSeededSamples`."""
    inner = getattr(dataset, "dataset", dataset)
    fingerprint = getattr(inner, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else f"{len(dataset)} samples"


class ResumableLoader(DataLoader):
    """The training loader as Lightning's checkpoints resume it (``state_dict`` / ``load_state_dict``, the
    ``_Stateful`` protocol): the state is the epoch and the batches already trained on, and loading it makes the
    sampler skip exactly those."""

    def __init__(self, *args: Any, position: Callable[[], tuple[int, int]], **kwargs: Any):
        """A DataLoader.

        Args:
            *args: :class:`~torch.utils.data.DataLoader`'s.
            position: the current ``(epoch, batches done in it)``, recorded by ``state_dict``.
            **kwargs: :class:`~torch.utils.data.DataLoader`'s.
        """
        super().__init__(*args, **kwargs)
        self._position = position

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self._position()
        return {"epoch": int(epoch), "batches": int(batches), "batch_size": int(self.batch_size),
                "processes": int(self.sampler.world_size), "training_set": training_set_fingerprint(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("batch_size") != self.batch_size:
            raise ValueError(f"cannot resume mid-epoch with batch_size {self.batch_size}: the checkpoint was written "
                             f"with {state.get('batch_size')} (set data.batch_size to it)")
        recorded = state.get("training_set")  # older checkpoints do not record it (nor the process count)
        if state["batches"] and recorded is not None and recorded != training_set_fingerprint(self.dataset):
            # the position in the epoch indexes the old order: on other data it would skip or repeat other samples
            raise ValueError(f"cannot resume mid-epoch ({state['batches']} batches into epoch {state['epoch']}): the "
                             f"training data changed since the checkpoint (samples added, removed or replaced); "
                             f"restore it, or resume from an epoch-end checkpoint")
        processes = state.get("processes", self.sampler.world_size)
        if state["batches"] and processes != self.sampler.world_size:
            # each process skips what it trained on: with another count, samples would train twice or not at all
            raise ValueError(f"cannot resume mid-epoch on {self.sampler.world_size} process(es): the checkpoint was "
                             f"written by {processes} ({state['batches']} batches into epoch {state['epoch']}); "
                             f"resume with {processes} (--trainer.devices/num_nodes), or from an epoch-end checkpoint")
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)
