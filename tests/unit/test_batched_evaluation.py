"""Evaluation batches images that are the same size after the protocol's resize: every method's batched
predictions equal its one-image-at-a-time predictions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ovseg.eval.evaluator import Evaluator
from ovseg.eval.protocols import load_protocol
from ovseg.runner import OVSegCLI

REPO = Path(__file__).resolve().parents[2]
METHODS = ["clip", "maskclip", "sclip", "naclip", "clearclip", "scclip", "proxyclip", "pixelclip", "clips4"]


@pytest.mark.parametrize("name", METHODS)
def test_batched_predictions_equal_single_image_predictions(name):
    torch.manual_seed(0)
    method = OVSegCLI(args=["--config", str(REPO / f"configs/tiny/{name}.yaml")], run=False).model.eval()
    evaluator = Evaluator(load_protocol("maskclip"), {"short_side": 64, "templates": "single", "mode": "whole"})
    entry = evaluator.add_dataset(method, "voc21", None, 0, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    # three images of one size (one batch), one of another size (a batch of its own)
    images = [torch.rand(3, 48, 72, generator=generator) for _ in range(3)] + [torch.rand(3, 60, 50)]
    sizes = [tuple(image.shape[-2:]) for image in images]
    calls = []
    original = method.dense_logits
    method.dense_logits = lambda batch, text: calls.append(len(batch)) or original(batch, text)
    batched = evaluator.predict_batch(method, entry, images, sizes)
    assert sorted(calls) == [1, 3]
    for image, size, pred in zip(images, sizes, batched):
        assert torch.equal(pred, evaluator.predict(method, entry, image, size))


@pytest.mark.parametrize("name", METHODS)
def test_batched_scores_reach_the_upsampler_contiguous(name):
    """A batch's scores come out in [B,Q,h,w] memory order: the einsum of ``cosine_logits`` gave channels-last
    strides, on which the upsampling to label size ran 3.8x slower (benchmarks/README.md)."""
    method = OVSegCLI(args=["--config", str(REPO / f"configs/tiny/{name}.yaml")], run=False).model.eval()
    evaluator = Evaluator(load_protocol("maskclip"), {"short_side": 64, "templates": "single", "mode": "whole"})
    entry = evaluator.add_dataset(method, "voc21", None, 0, torch.device("cpu"))
    with torch.no_grad():
        scores = method.dense_logits(torch.rand(3, 3, 64, 96), entry.text)
    assert scores.shape[:2] == (3, len(entry.text)) and scores.is_contiguous()
    assert all(one.is_contiguous() for one in scores)
