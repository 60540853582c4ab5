"""The test gallery is what the evaluator predicted while scoring: no second forward pass, same label maps."""

from types import SimpleNamespace

import numpy as np
import torch

from ovseg.eval.evaluator import Evaluator
from ovseg.eval.protocols import load_protocol
from ovseg.eval.visualize import collect_gallery


class CountingMethod(torch.nn.Module):
    """Scores from a fixed random projection of the pixels; counts its forward passes."""

    input_size = 32

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.projection = torch.randn(3, 21, generator=torch.Generator().manual_seed(0))

    def encode_text(self, names, templates):
        return torch.eye(len(names))

    def dense_logits(self, images, text):
        self.calls += 1
        return torch.einsum("bchw,cq->bqhw", images, self.projection[:, : text.shape[0]])


def test_gallery_keeps_the_scored_predictions_without_predicting_again():
    method = CountingMethod()
    evaluator = Evaluator(load_protocol("maskclip"), {"short_side": 32, "templates": "single", "mode": "whole"},
                          gallery_size=2)
    entry = evaluator.add_dataset(method, "voc21", None, 0, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 40, 56, generator=generator) for _ in range(3)]
    labels = [torch.randint(0, 21, (40, 56), generator=generator) for _ in range(3)]
    evaluator.update(method, "voc21", images, labels, ["a", "b", "c"])
    assert method.calls == 1 and entry.num_images == 3  # three images of one size: one batched forward pass

    gallery = collect_gallery(SimpleNamespace(evaluator=evaluator), 4)
    assert method.calls == 1  # nothing predicted again
    assert [item[0] for item in gallery["voc21"]] == ["a", "b"]
    for (_file_id, image, label, pred), source, source_label in zip(gallery["voc21"], images, labels):
        np.testing.assert_array_equal(pred, evaluator.predict(method, entry, source, (40, 56)).numpy())
        np.testing.assert_array_equal(label, source_label.numpy())
        np.testing.assert_array_equal(image, (source.numpy().transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))
    assert collect_gallery(SimpleNamespace(evaluator=evaluator), 1)["voc21"][0][0] == "a"
    assert collect_gallery(SimpleNamespace(evaluator=evaluator), 0) == {}
