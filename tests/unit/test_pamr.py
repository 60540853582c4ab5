"""PAMR (ovseg.eval.pamr) against a per-pixel numpy recomputation of its definition, and in the evaluator: the
``naclip`` protocol's ``pamr_steps`` refines the label-size scores, class chunk by class chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg.eval.inference import labels_from_logits
from ovseg.eval.pamr import PAMR
from ovseg.eval.protocols import load_protocol


def numpy_pamr(image: np.ndarray, scores: np.ndarray, dilations: list[int], steps: int) -> np.ndarray:
    """Per pixel, straight from the definition: 8 neighbours per dilation (indices clamped at the border),
    affinity -|I(p)-I(q)| / (1e-8 + 0.1 std(p)) averaged over channels (std over the 3x3 windows of all dilations
    together, the centre once per dilation), softmax over neighbours, weighted sums."""
    channels, height, width = image.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    weights = np.zeros((len(offsets), height, width))
    for y in range(height):
        for x in range(width):
            window = np.array([image[:, min(max(y + a * d, 0), height - 1), min(max(x + b * d, 0), width - 1)]
                               for d in dilations for a in (-1, 0, 1) for b in (-1, 0, 1)])  # [9 * dilations, C]
            spread = 1e-8 + 0.1 * window.std(axis=0, ddof=1)
            logits = []
            for oy, ox in offsets:
                neighbour = image[:, min(max(y + oy, 0), height - 1), min(max(x + ox, 0), width - 1)]
                logits.append(np.mean(-np.abs(image[:, y, x] - neighbour) / spread))
            logits = np.array(logits)
            e = np.exp(logits - logits.max())
            weights[:, y, x] = e / e.sum()
    for _ in range(steps):
        refined = np.zeros_like(scores)
        for y in range(height):
            for x in range(width):
                for i, (oy, ox) in enumerate(offsets):
                    refined[:, y, x] += weights[i, y, x] * scores[:, min(max(y + oy, 0), height - 1),
                                                                   min(max(x + ox, 0), width - 1)]
        scores = refined
    return scores


def test_pamr_equals_the_per_pixel_definition():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 9, 11))
    image[:, :4, :5] = 0.3  # a flat area: zero spread, zero differences
    scores = rng.normal(size=(4, 9, 11))
    expected = numpy_pamr(image, scores, [1, 3], steps=3)
    got = PAMR(torch.tensor(image[None]), steps=3, dilations=[1, 3])(torch.tensor(scores[None]).float())[0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pamr_keeps_constant_scores_and_follows_the_image():
    """Weights are a convex combination (constant scores stay); across a colour edge a pixel takes its own side's
    scores: a blurry score step is sharpened onto the image's edge."""
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0
    assert torch.allclose(PAMR(image, 5, [1, 2])(torch.full((1, 2, 16, 16), 0.7)), torch.tensor(0.7))
    scores = torch.zeros(1, 1, 16, 16)
    scores[..., 6:] = 1.0  # the score edge is two columns left of the image's
    refined = PAMR(image, 10, [1, 2])(scores)
    assert float(refined[..., 6:8].max()) < 0.5 < float(refined[..., 8:].min())


def test_labels_from_logits_refines_chunk_by_chunk_exactly():
    torch.manual_seed(0)
    scores = torch.randn(7, 12, 15)
    image = torch.rand(1, 3, 48, 60)
    query_to_class = torch.tensor([0, 1, 1, 2, 3, 4, 4])
    refine = PAMR(image, 4, [1, 2])
    kwargs = dict(logit_scale=40.0, prob_threshold=0.3, background_index=0, refine=refine)
    whole = labels_from_logits(scores, (48, 60), query_to_class, **kwargs)
    chunked = labels_from_logits(scores, (48, 60), query_to_class, max_chunk_bytes=48 * 60 * 4 * 4 * 2, **kwargs)
    assert torch.equal(whole, chunked)
    # the reference order: all scores upsampled, refined, softmax, synonym max, argmax, threshold
    up = torch.nn.functional.interpolate(scores[None], size=(48, 60), mode="bilinear", align_corners=False)
    probs = (refine(up)[0] * 40).softmax(0)
    per_class = torch.stack([probs[query_to_class == c].max(0).values for c in range(5)])
    expected = per_class.argmax(0)
    expected[per_class.max(0).values < 0.3] = 0
    assert torch.equal(whole, expected)
    assert not torch.equal(whole, labels_from_logits(scores, (48, 60), query_to_class, logit_scale=40.0,
                                                     prob_threshold=0.3, background_index=0))


def test_naclip_protocol_pamr_setting():
    protocol = load_protocol("naclip")
    assert protocol.settings_for("voc21").pamr_steps == 0  # NACLIP's `--pamr off`, what the parity rows check
    on = protocol.settings_for("voc21", {"pamr_steps": 10})
    assert (on.pamr_steps, on.pamr_dilations) == (10, [8, 16])
    with pytest.raises(ValueError, match="pamr_dilations"):
        protocol.settings_for("voc21", {"pamr_dilations": []})


def test_evaluator_refines_with_the_image_at_label_size():
    """``pamr_steps`` in the evaluator: PAMR of the label-size scores with the resized image brought to the label
    size (a method without a dense CLIP: the [0,1] image), before the logit scale; 0 leaves the scores alone."""
    from ovseg.eval.evaluator import Evaluator

    class Pixels(torch.nn.Module):
        input_size = 32

        def encode_text(self, names, templates):
            return torch.eye(len(names))

        def dense_logits(self, images, text):
            return torch.nn.functional.avg_pool2d(images[:, : text.shape[0]], 4)

    overrides = {"mode": "whole", "short_side": 32, "long_side_max": 64, "resize_library": "torch",
                 "class_names": "{dataset}", "templates": "single", "prob_threshold": None, "pamr_steps": 3,
                 "pamr_dilations": [1, 2]}
    evaluator = Evaluator(load_protocol("naclip"), overrides)
    method, names = Pixels(), [["a"], ["b"], ["c"]]
    entry = evaluator.add_dataset(method, "voc20", names, None, torch.device("cpu"))
    image = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    resized = torch.nn.functional.interpolate(image[None], size=(32, 40), mode="bilinear", align_corners=False)
    scores = method.dense_logits(resized, torch.eye(3))[0]
    at_label = torch.nn.functional.interpolate(resized, size=(40, 50), mode="bilinear", align_corners=False)
    expected = labels_from_logits(scores, (40, 50), entry.vocabulary.query_to_class, logit_scale=40.0,
                                  via_size=(32, 40), refine=PAMR(at_label, 3, [1, 2]))
    got = evaluator.predict(method, entry, image, (40, 50))
    assert torch.equal(got, expected)
    plain = Evaluator(load_protocol("naclip"), {**overrides, "pamr_steps": 0})
    assert not torch.equal(got, plain.predict(method, plain.add_dataset(method, "voc20", names, None,
                                                                         torch.device("cpu")), image, (40, 50)))
