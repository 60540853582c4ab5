"""Probe methods: unsupervised evaluation of frozen pixel embeddings (CLIP-S4 / SegSort protocol on Pascal VOC
2012): k-NN segment retrieval and a linear probe, both methods scored by the shared evaluator through
``ovseg test``.

Design: each probe is an :class:`OVSegMethod` that wraps an embedding method (``embedder``: any method
with ``embed(images01) -> [B, D, h, w]``, e.g. CLIPS4; training-free CLIP baselines work through their
dense encoder) and a checkpoint of it. At the start of the test (or validate) epoch the probe fits on the
*labelled* training split of the data root (``train_dataset``/``train_split`` — the only place labels are
used), sharded over processes and gathered, so every process holds the same probe. Then the evaluator
runs as for any method: ``encode_text`` maps each class name to its row of the probe's classes (one-hot),
``dense_logits`` returns the probe's per-class scores, and mIoU / pAcc / mAcc / per-class IoU come out of
the shared confusion matrix and results files.

- :class:`KNNProbe`: training images -> k-means segments (36, 20 iterations) on their embeddings, each
  labelled by the majority of its ground-truth pixels; a test segment takes the majority vote of its 20
  nearest training segments (cosine).
- :class:`LinearProbe`: a 1×1 conv on frozen embeddings, logits upsampled to the crop; SGD lr 0.1 poly-0.9,
  60k iterations, 512×512 crops, batch 16; momentum 0.9 and no weight decay.

    ovseg test --config configs/eval/clips4_knn_voc.yaml --model.init_args.checkpoint run/last.ckpt
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ovseg.eval.protocols import MODEL_NATIVE_SETTINGS
from ovseg.methods.base import OVSegMethod
from ovseg.models.segments import segment_mean, segment_pixels

__all__ = ["KNNProbe", "LinearProbe", "pixel_embeddings", "segment_bank", "knn_votes", "fit_linear_probe",
           "resize_short_side"]

IGNORE = 255
#: ``cluster_resolution`` of :class:`KNNProbe`
CLUSTER_RESOLUTIONS = ("input", "embedding")
Embed = Callable[[Tensor], Tensor]


def pixel_embeddings(method: Any, images01: Tensor) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> unit-norm pixel embeddings ``[B, D, h, w]`` of a method."""
    if hasattr(method, "embed"):
        return F.normalize(method.embed(images01).float(), dim=1)
    encoder = getattr(method, "encoder", None)
    if encoder is not None and hasattr(encoder, "encode_dense"):
        return F.normalize(encoder.encode_dense(encoder.normalize(images01)).float(), dim=1)
    raise TypeError(f"{type(method).__name__} has no embed(images) and no dense CLIP encoder")


def resize_short_side(image: Tensor, label: Tensor | None, short_side: int | None) -> tuple[Tensor, Tensor | None]:
    """image ``[3, H, W]`` float, label ``[H, W]`` -> resized so the short side is ``short_side``."""
    if not short_side:
        return image, label
    height, width = image.shape[-2:]
    scale = short_side / min(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def _segments(embeddings: Tensor, num_segments: int, iterations: int, method: str = "segsort",
              location_weight: float = 1.0, size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """``[D, h, w]`` -> (assignments ``[h, w]``, segment embeddings ``[k, D]``), deterministic (``method``: see
    :func:`ovseg.models.segments.segment_pixels`). With ``size`` the embeddings are first resized to it
    (bilinear) and re-normalised, as HSG clusters at the input's resolution (``generate_embeddings(...,
    resize_as_input=True)``); the assignments are then ``[*size]``."""
    if size is not None and tuple(size) != tuple(embeddings.shape[-2:]):
        embeddings = F.normalize(F.interpolate(embeddings[None], size=tuple(size), mode="bilinear",
                                               align_corners=False)[0], dim=0)
    dim, height, width = embeddings.shape
    flat = embeddings.flatten(1).t()[None]
    k = min(num_segments, flat.shape[1])
    assign = segment_pixels(flat, height, width, k, iterations, method, location_weight,
                            generator=torch.Generator().manual_seed(0))
    return assign[0].view(height, width), segment_mean(flat, assign, k)[0]


def _majority(assign: Tensor, label: Tensor, k: int, num_classes: int) -> Tensor:
    """Per-segment majority label (assignments upsampled to the label grid); -1 for unlabelled segments."""
    assign = F.interpolate(assign[None, None].float(), size=label.shape[-2:], mode="nearest")[0, 0].long()
    keep = label != IGNORE
    counts = torch.zeros(k, num_classes, device=label.device)
    counts.index_put_((assign[keep], label[keep]), torch.ones_like(label[keep], dtype=torch.float32), accumulate=True)
    majority = counts.argmax(1)
    return torch.where(counts.sum(1) > 0, majority, torch.full_like(majority, -1))


def segment_bank(embed: Embed, samples, num_classes: int, num_segments: int = 36, iterations: int = 20,
                 short_side: int | None = None, device: torch.device | str = "cpu", segments: str = "segsort",
                 location_weight: float = 1.0, at_input: bool = False) -> tuple[Tensor, Tensor]:
    """Training samples (``image`` uint8/float ``[3, H, W]``, ``label`` ``[H, W]``) -> segment embeddings
    ``[S, D]`` and their majority labels ``[S]`` (segments without labelled pixels dropped); ``at_input``: clustered
    at the (resized) image's resolution."""
    feats, labels = [], []
    for sample in samples:
        image = sample["image"].to(device)
        image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        image, label = resize_short_side(image, sample["label"].to(device), short_side)
        with torch.no_grad():
            emb = embed(image[None])[0]
        assign, seg = _segments(emb, num_segments, iterations, segments, location_weight,
                                image.shape[-2:] if at_input else None)
        seg_labels = _majority(assign, label, seg.shape[0], num_classes)
        keep = seg_labels >= 0
        feats.append(seg[keep])
        labels.append(seg_labels[keep])
    return torch.cat(feats), torch.cat(labels)


def knn_votes(query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int = 20) -> Tensor:
    """``[S, D]`` query segments -> vote counts ``[S, C]`` of their k nearest bank segments (cosine)."""
    k = min(k, bank.shape[0])
    nearest = (F.normalize(query, dim=-1) @ F.normalize(bank, dim=-1).t()).topk(k, dim=1).indices
    votes = F.one_hot(bank_labels[nearest], num_classes).sum(1).float()
    return votes


def _gather_variable(x: Tensor, fill: float) -> Tensor:
    """Concatenate tensors of different lengths (dim 0) from every process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def _random_crop(image: Tensor, label: Tensor, crop: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pad (image 0, label ignore) to at least ``crop`` and take a random ``crop`` × ``crop`` window."""
    height, width = image.shape[-2:]
    ph, pw = max(0, crop - height), max(0, crop - width)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph))
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
    height, width = image.shape[-2:]
    y = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
    x = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
    return image[:, y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]


def fit_linear_probe(embed: Embed, dataset, num_classes: int, dim: int, iterations: int = 60000, lr: float = 0.1,
                     crop: int = 512, batch_size: int = 16, short_side: int | None = 512, momentum: float = 0.9,
                     weight_decay: float = 0.0, poly_power: float = 0.9, seed: int = 0,
                     device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Train a linear classifier (weight ``[C, D]``, bias ``[C]``) on frozen embeddings of random crops.

    Under DDP each process draws its own crops (seed + rank) and gradients are averaged, so the processes
    keep identical weights."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    generator = torch.Generator().manual_seed(seed + rank)
    with torch.inference_mode(False), torch.enable_grad():
        weight = torch.zeros(num_classes, dim, device=device, requires_grad=True)
        bias = torch.zeros(num_classes, device=device, requires_grad=True)
        optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=momentum, weight_decay=weight_decay)
        for step in range(iterations):
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - step / iterations) ** poly_power
            images, labels = [], []
            for index in torch.randint(0, len(dataset), (batch_size,), generator=generator).tolist():
                sample = dataset[index]
                image = sample["image"].float() / 255 if sample["image"].dtype == torch.uint8 else sample["image"]
                image, label = resize_short_side(image.float(), sample["label"], short_side)
                image, label = _random_crop(image, label, crop, generator)
                images.append(image)
                labels.append(label)
            images, labels = torch.stack(images).to(device), torch.stack(labels).to(device)
            with torch.no_grad():
                emb = embed(images).float()
            logits = torch.einsum("bdhw,cd->bchw", emb, weight) + bias[None, :, None, None]
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            if world > 1:
                for p in (weight, bias):
                    dist.all_reduce(p.grad)
                    p.grad /= world
            optimizer.step()
    return weight.detach().clone(), bias.detach().clone()


class _Probe(OVSegMethod):
    """Shared parts: the wrapped embedder, its checkpoint, the labelled training split, class mapping; ``**evaluation``
    are :class:`~ovseg.methods.base.OVSegMethod`'s evaluation settings."""

    HPARAMS_IGNORE = ("embedder",)
    default_protocol = "maskclip"
    NATIVE_SETTINGS = MODEL_NATIVE_SETTINGS  # features of a model trained in ovseg (see CLIPS4)

    def __init__(self, embedder: OVSegMethod, checkpoint: str | None = None, train_dataset: str = "voc21",
                 train_split: str = "train", train_limit: int | None = None, train_short_side: int | None = 512,
                 **evaluation: Any):
        """The probed embedder and the labelled split the probe fits on.

        Args:
            embedder: the embedding method probed (any method with ``embed(images01) -> [B, D, h, w]``, e.g. CLIPS4).
            checkpoint: a checkpoint of the embedder to load (None: its weights as built).
            train_dataset: the labelled dataset the probe fits on (a dataset name, ``ovseg list datasets``).
            train_split: its split.
            train_limit: fit on the first N images only (None: all).
            train_short_side: training images are resized so their short side is this (None: kept).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(**evaluation)
        self.embedder = embedder
        self.embedder.requires_grad_(False)
        self.checkpoint = checkpoint
        if checkpoint:
            from ovseg.utils.io import load_weights_file

            state = load_weights_file(checkpoint, "embedder checkpoint")
            self.embedder.load_state_dict(state.get("state_dict", state))
        from ovseg.data.specs import get_spec

        self.train_dataset, self.train_split, self.train_limit = train_dataset, train_split, train_limit
        self.train_short_side = train_short_side
        self.class_names = get_spec(train_dataset).class_names
        self.num_classes = len(self.class_names)
        self._fitted = False

    @property
    def weights_id(self) -> str:
        return f"checkpoint:{self.checkpoint}" if self.checkpoint else getattr(self.embedder, "weights_id", "unknown")

    @property
    def input_size(self) -> int:
        return self.embedder.input_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.embedder.eval()
        return self

    def embed(self, images01: Tensor) -> Tensor:
        return pixel_embeddings(self.embedder, images01)

    def _labelled(self):
        from ovseg.data.seg_dataset import SegFileDataset

        return SegFileDataset(self.train_dataset, self.trainer.datamodule.root, self.train_split,
                              limit=self.train_limit)

    def encode_text(self, names: list[str], templates: list[str]) -> Tensor:
        """Each name -> the one-hot row of the probe class it names (zeros for names the probe lacks); a tuple of
        synonyms -> the row of the first one the probe knows."""
        index = {s: i for i, synonyms in enumerate(self.class_names) for s in synonyms}
        rows = torch.zeros(len(names), self.num_classes, device=self.device)
        for r, name in enumerate(names):
            known = [index[s] for s in ((name,) if isinstance(name, str) else name) if s in index]
            if known:
                rows[r, known[0]] = 1
        return rows

    def fit_probe(self) -> None:
        raise NotImplementedError

    def scores(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def dense_logits(self, images: Tensor, text: Tensor) -> Tensor:
        return torch.einsum("bchw,qc->bqhw", self.scores(images), text.to(images.device).float())

    def _ensure_fitted(self) -> None:
        if not self._fitted:
            self.fit_probe()
            self._fitted = True

    def on_test_epoch_start(self) -> None:
        self._ensure_fitted()
        super().on_test_epoch_start()

    def on_validation_epoch_start(self) -> None:
        self._ensure_fitted()
        super().on_validation_epoch_start()


class KNNProbe(_Probe):
    """k-NN over segments (36 k-means segments per image, 20 iterations, 20 nearest training segments, majority
    vote; the segments SegSort's, which the CLIP-S4 paper cites for this protocol: ``segments: segsort``, or
    ``embedding``)."""

    def __init__(self, embedder: OVSegMethod, checkpoint: str | None = None, train_dataset: str = "voc21",
                 train_split: str = "train", train_limit: int | None = None, train_short_side: int | None = 512,
                 num_segments: int = 36, kmeans_iterations: int = 20, neighbours: int = 20,
                 segments: str = "segsort", location_weight: float = 1.0, cluster_resolution: str = "input",
                 **evaluation: Any):
        """A k-NN segment probe.

        Args:
            embedder: the embedding method probed (any method with ``embed(images01) -> [B, D, h, w]``, e.g. CLIPS4).
            checkpoint: a checkpoint of the embedder to load (None: its weights as built).
            train_dataset: the labelled dataset the probe fits on (a dataset name, ``ovseg list datasets``).
            train_split: its split.
            train_limit: fit on the first N images only (None: all).
            train_short_side: training images are resized so their short side is this (None: kept).
            num_segments: k-means segments per image (36).
            kmeans_iterations: k-means iterations (20).
            neighbours: training segments that vote for a test segment (20).
            segments: how images are cut: ``segsort`` (SegSort's k-means on embeddings and pixel locations) or
                ``embedding`` (spherical k-means on the embeddings alone).
            location_weight: weight of the pixel locations beside the embeddings (``segments: segsort``).
            cluster_resolution: ``input`` (HSG's evaluation, ``pyscripts/inference/inference.py`` and
                ``prototype.py``: embeddings resized to the image, clustered there, and every segment given the one
                label its neighbours' majority votes for) or ``embedding`` (clusters on the embedding grid, vote counts
                upsampled bilinearly by the evaluator: soft segment borders).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        if cluster_resolution not in CLUSTER_RESOLUTIONS:
            raise ValueError(f"cluster_resolution must be one of {CLUSTER_RESOLUTIONS}, got {cluster_resolution!r}")
        super().__init__(embedder, checkpoint, train_dataset, train_split, train_limit, train_short_side,
                         **evaluation)
        self.cluster_resolution = cluster_resolution
        self.num_segments, self.kmeans_iterations, self.neighbours = num_segments, kmeans_iterations, neighbours
        self.segments, self.location_weight = segments, location_weight
        self.bank: Tensor | None = None
        self.bank_labels: Tensor | None = None

    def fit_probe(self) -> None:
        dataset = self._labelled()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        shard = (dataset[i] for i in range(rank, len(dataset), world))
        bank, labels = segment_bank(self.embed, shard, self.num_classes, self.num_segments, self.kmeans_iterations,
                                    self.train_short_side, self.device, self.segments, self.location_weight,
                                    at_input=self.cluster_resolution == "input")
        self.bank = _gather_variable(bank, 0.0)
        self.bank_labels = _gather_variable(labels, -1)
        rank_zero_info(f"k-NN bank: {self.bank.shape[0]} labelled segments from {len(dataset)} images")

    def scores(self, images: Tensor) -> Tensor:
        at_input = self.cluster_resolution == "input"
        out = []
        for emb in self.embed(images):
            assign, segments = _segments(emb, self.num_segments, self.kmeans_iterations, self.segments,
                                         self.location_weight, images.shape[-2:] if at_input else None)
            votes = knn_votes(segments, self.bank, self.bank_labels, self.num_classes, self.neighbours)
            if at_input:  # one label per segment: its neighbours' majority (first class on a tie)
                votes = F.one_hot(votes.argmax(1), self.num_classes).float()
            out.append(votes[assign].permute(2, 0, 1))  # [C, h, w]
        return torch.stack(out)


class LinearProbe(_Probe):
    """Linear classifier on frozen pixel embeddings (60k iterations, lr 0.1 poly, 512 crops, batch 16)."""

    def __init__(self, embedder: OVSegMethod, checkpoint: str | None = None, train_dataset: str = "voc21",
                 train_split: str = "train", train_limit: int | None = None, train_short_side: int | None = 512,
                 iterations: int = 60000, lr: float = 0.1, crop_size: int = 512, probe_batch_size: int = 16,
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0, **evaluation: Any):
        """A linear probe.

        Args:
            embedder: the embedding method probed (any method with ``embed(images01) -> [B, D, h, w]``, e.g. CLIPS4).
            checkpoint: a checkpoint of the embedder to load (None: its weights as built).
            train_dataset: the labelled dataset the probe fits on (a dataset name, ``ovseg list datasets``).
            train_split: its split.
            train_limit: fit on the first N images only (None: all).
            train_short_side: training images are resized so their short side is this (None: kept).
            iterations: SGD iterations (60k).
            lr: SGD learning rate, poly-0.9 decayed (0.1).
            crop_size: random training crops of this square (512).
            probe_batch_size: crops per SGD step (16; named apart from the DataModule's ``batch_size``).
            momentum: SGD momentum (0.9).
            weight_decay: SGD weight decay (0).
            seed: seed of the crop draws (each process adds its rank).
            **evaluation: the evaluation settings of :class:`~ovseg.methods.base.OVSegMethod` (``protocol``, …).
        """
        super().__init__(embedder, checkpoint, train_dataset, train_split, train_limit, train_short_side,
                         **evaluation)
        self.probe_settings = dict(iterations=iterations, lr=lr, crop=crop_size, batch_size=probe_batch_size,
                                   momentum=momentum, weight_decay=weight_decay, seed=seed)
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def fit_probe(self) -> None:
        dataset = self._labelled()
        dim = self.embed(torch.zeros(1, 3, 64, 64, device=self.device)).shape[1]
        self.weight, self.bias = fit_linear_probe(self.embed, dataset, self.num_classes, dim,
                                                  short_side=self.train_short_side, device=self.device,
                                                  **self.probe_settings)

    def scores(self, images: Tensor) -> Tensor:
        emb = self.embed(images)
        return torch.einsum("bdhw,cd->bchw", emb, self.weight) + self.bias[None, :, None, None]

