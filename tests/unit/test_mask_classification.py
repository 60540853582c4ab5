"""Zero-shot mask classification (the ``pixelclip_masks`` protocol): each ground-truth class region is one mask,
labelled by its pooled scores; checked against a per-mask numpy recomputation and through the evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg.eval.evaluator import Evaluator
from ovseg.eval.inference import labels_from_masks
from ovseg.eval.protocols import load_protocol


def numpy_mask_labels(scores: np.ndarray, masks: np.ndarray, query_to_class: np.ndarray) -> np.ndarray:
    out = np.zeros_like(masks)
    for mask_id in np.unique(masks):
        inside = masks == mask_id
        mean = scores[:, inside].mean(axis=1)  # [Q]
        per_class = [mean[query_to_class == c].max() for c in range(query_to_class.max() + 1)]
        out[inside] = int(np.argmax(per_class))
    return out


def test_each_mask_takes_the_class_of_its_pooled_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 20, 24)).astype(np.float32)
    masks = np.zeros((20, 24), np.int64)
    masks[5:15, 3:9], masks[:4] = 3, 7
    masks[16:, 12:] = 255  # ignored pixels: a mask of their own, never mixed into the others
    query_to_class = np.array([0, 1, 1, 2, 3, 3])
    expected = numpy_mask_labels(scores, masks, query_to_class)
    got = labels_from_masks(torch.from_numpy(scores), (20, 24), torch.from_numpy(query_to_class),
                            torch.from_numpy(masks), max_chunk_bytes=20 * 24 * 4 * 2)  # 2 queries per chunk
    np.testing.assert_array_equal(got.numpy(), expected)
    for mask_id in (0, 3, 7):  # one label per mask
        assert len(np.unique(got.numpy()[masks == mask_id])) == 1


def test_mask_classification_protocol_in_the_evaluator():
    protocol = load_protocol("pixelclip_masks")
    settings = protocol.settings_for("voc20")
    pixelclip = load_protocol("pixelclip").settings_for("voc20")
    assert settings.masks == "ground_truth"  # the pixelclip pipeline otherwise
    assert {**settings.as_dict(), "masks": "none"} == pixelclip.as_dict()

    class Pixels(torch.nn.Module):
        """Query q scores the q-th colour channel (3 queries): dense scores at the input's size."""

        input_size = 32

        def encode_text(self, names, templates):
            return torch.eye(len(names))

        def dense_logits(self, images, text):
            return images[:, : text.shape[0]]

    evaluator = Evaluator(protocol, {"short_side": 24, "square": None, "text_precision": "model",
                                     "resize_library": "torch", "class_names": "{dataset}"})
    method = Pixels()
    entry = evaluator.add_dataset(method, "voc20", [["red"], ["green"], ["blue"]], None, torch.device("cpu"))
    image = torch.zeros(3, 24, 24)
    image[0, :, :12] = 1.0  # left half red
    image[2, :, 12:] = 0.6  # right half blue
    image[1, :4, :4] = 2.0  # a green corner inside the left mask: per pixel green, pooled still red
    label = torch.zeros(24, 24, dtype=torch.long)
    label[:, 12:] = 1
    pred = evaluator.predict_batch(method, entry, [image], [(24, 24)], [label])[0]
    assert bool((pred[:, :12] == 0).all()) and bool((pred[:, 12:] == 2).all())
    with pytest.raises(ValueError, match="ground-truth masks"):
        evaluator.predict(method, entry, image, (24, 24))
    evaluator.update(method, "voc20", [image], [label])
    assert entry.metric.compute()[0, 0] == 24 * 12  # the confusion matrix reads the mask labels


def test_mask_classification_refuses_pixel_thresholds():
    with pytest.raises(ValueError, match="mask classification"):
        load_protocol("pixelclip_masks").settings_for("voc20", {"logit_scale": 40, "prob_threshold": 0.1})
