"""Image-level zero-shot recognition on the toy world: does a CLIP know the toy words?

For every image and class: cosine of the image embedding (the pooled CLIP embedding at the model's input
size) with the text embedding of the prompt(s) ``"a photo of a {class}."``. The ground truth is the class
list of the image's caption record, i.e. exactly the classes in its label map. Two multi-label scores, each next to
its chance level:

- ``mAP``: per class, the average precision of ranking the images by the class's probability (CLIP's
  zero-shot classifier: softmax over the classes of the cosines times the model's logit scale); averaged
  over classes. Chance (a random ranking) is about the class's prevalence, so ``mAP_chance`` = mean
  prevalence. ``mAP_cosine`` ranks by the raw cosines instead; it is lower because an image's cosines
  with single-class prompts shift together (with how many classes it holds), which the softmax removes.
- ``recall_at_k``: per image with k classes, the fraction of them among its k top-scored classes; averaged
  over images. Chance is k / num_classes per image. This is the ranking a dense argmax over classes uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ovseg.models.clip import CLIPConfig, DenseCLIP
from ovseg.toyworld.generate import CLASSES
from ovseg.toyworld.pretrain import load_split_images

__all__ = ["average_precision", "recognition_scores", "evaluate_recognition", "RecognitionResult"]


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of ranking items by ``scores`` (descending, stable) for boolean ``positives``; NaN without positives."""
    if not positives.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positives[order]
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hits.mean())


def recognition_scores(scores: np.ndarray, targets: np.ndarray) -> dict:
    """Multi-label scores of ``scores`` [N, C] against boolean ``targets`` [N, C]; see the module docstring."""
    per_class = np.array([average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])])
    valid = ~np.isnan(per_class)
    k = targets.sum(1)
    top = np.argsort(-scores, axis=1, kind="stable")
    hits = np.array([targets[i, top[i, : k[i]]].sum() / max(k[i], 1) for i in range(len(targets))])
    return {
        "mAP": float(per_class[valid].mean() * 100),
        "mAP_chance": float(targets.mean(0)[valid].mean() * 100),
        "recall_at_k": float(hits.mean() * 100),
        "recall_at_k_chance": float((k / targets.shape[1]).mean() * 100),
        # classes absent from the split have no AP: null, not NaN (results must stay valid JSON)
        "per_class_AP": {CLASSES[c] if targets.shape[1] == len(CLASSES) else str(c):
                         None if np.isnan(ap) else round(float(ap * 100), 2) for c, ap in enumerate(per_class)},
    }


@dataclass
class RecognitionResult:
    num_images: int
    weights: str
    prompts: list[str]
    mAP: float
    mAP_chance: float
    recall_at_k: float
    recall_at_k_chance: float
    per_class_AP: dict[str, float | None]
    mAP_cosine: float
    logit_scale: float

    def line(self) -> str:
        return (f"zero-shot recognition on {self.num_images} images ({self.weights}): "
                f"mAP {self.mAP:.1f} (chance {self.mAP_chance:.1f}), "
                f"recall@k {self.recall_at_k:.1f} (chance {self.recall_at_k_chance:.1f})")


@torch.no_grad()
def evaluate_recognition(
    root: str | Path,
    split: str = "val",
    clip: CLIPConfig | DenseCLIP | None = None,
    prompts: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 256,
) -> RecognitionResult:
    """Zero-shot multi-label recognition of the toy classes on a generated root's ``split``."""
    model = clip if isinstance(clip, DenseCLIP) else DenseCLIP(clip or CLIPConfig(name="toyworld-vit",
                                                                                pretrained="toyworld"))
    model.eval()
    prompts = prompts or ["a photo of a {}."]
    _, images, classes, _ = load_split_images(root, split, model.input_size, limit)
    if not len(images):
        raise ValueError(f"{root}: no {split} images")
    text = torch.stack([torch.nn.functional.normalize(model.encode_text([p.format(c) for p in prompts]).float(), dim=-1)
                        .mean(0) for c in CLASSES])
    text = torch.nn.functional.normalize(text, dim=-1)
    features = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float().div(255)
        features.append(torch.nn.functional.normalize(model.encode_image(model.normalize(batch)).float(), dim=-1))
    cosines = torch.cat(features) @ text.T
    logit_scale = float(model.model.logit_scale.exp()) if hasattr(model.model, "logit_scale") else 100.0
    probabilities = torch.softmax(logit_scale * cosines, dim=1)
    targets = np.zeros(cosines.shape, dtype=bool)
    for i, names in enumerate(classes):
        targets[i, [CLASSES.index(n) for n in names]] = True
    result = recognition_scores(probabilities.numpy(), targets)
    mAP_cosine = recognition_scores(cosines.numpy(), targets)["mAP"]
    return RecognitionResult(num_images=len(images), weights=model.weights_id, prompts=list(prompts),
                             mAP_cosine=mAP_cosine, logit_scale=logit_scale, **result)
