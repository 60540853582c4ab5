"""Trident's SAM refinement (:mod:`ovseg.methods.sam_refinement`; github.com/YuHengsss/Trident ``seg_utils/utils.py``
``sam_refinement``) against hand-built fixtures: connected regions by a plain flood fill, prompt scaling by hand, the
IoU acceptance / failed-region rules with a scripted mask decoder, and the evaluator's hook on a tiny Trident."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from ovseg.methods import sam_refinement as refinement
from ovseg.methods.sam_refinement import Regions, SamRefinementSettings, connected_regions, sam_refine_labels


def flood_fill_regions(mask: np.ndarray) -> list[set[tuple[int, int]]]:
    """8-connected regions of a boolean mask, row-major by first pixel, by breadth-first search."""
    seen, regions = np.zeros_like(mask, bool), []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        region, queue = set(), deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            region.add((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        regions.append(region)
    return regions


def test_connected_regions_boxes_and_points():
    """8-connected regions (a diagonal touch joins), the area floor, inclusive boxes and the most probable pixel."""
    rng = np.random.default_rng(0)
    mask = np.zeros((9, 13), bool)
    mask[1:3, 1:4] = True  # 6 px
    mask[3, 4] = True  # touches the block diagonally: same region (7 px)
    mask[6:9, 8:12] = True  # 12 px
    mask[0, 11] = True  # 1 px: below the floor
    probs = torch.from_numpy(rng.random((9, 13))).float()
    regions = connected_regions(mask, probs, minimal_area=2)
    expected = [r for r in flood_fill_regions(mask) if len(r) >= 2]
    assert len(expected) == 2 and regions.masks.shape == (2, 9, 13)
    for i, region in enumerate(expected):
        assert {tuple(p) for p in np.argwhere(regions.masks[i].numpy())} == region
        ys, xs = zip(*region)
        assert regions.boxes[i].tolist() == [min(xs), min(ys), max(xs), max(ys)]
        best = max(region, key=lambda p: probs[p].item())
        assert regions.points[i].tolist() == [best[1], best[0]]
    assert connected_regions(mask, probs, minimal_area=100) is None


class PromptSpy(torch.nn.Module):
    """A SAM whose prompt encoder records its prompts and whose decoder returns zeros."""

    mask_threshold = 0.0

    def __init__(self):
        super().__init__()
        self.image_encoder = torch.nn.Module()
        self.image_encoder.img_size = 1024
        self.seen = {}
        spy = self

        class Prompts(torch.nn.Module):
            def forward(self, points, boxes, masks):
                spy.seen.update(points=points, boxes=boxes, masks=masks)
                return torch.zeros(len(boxes), 3, 256), torch.zeros(1, 256, 64, 64)

            def get_dense_pe(self):
                return torch.zeros(1, 256, 64, 64)

        self.prompt_encoder = Prompts()
        self.mask_decoder = lambda **kw: (torch.zeros(len(kw["sparse_prompt_embeddings"]), 1, 256, 256),
                                          torch.zeros(len(kw["sparse_prompt_embeddings"]), 1))


def test_prompts_scaled_from_the_half_resolution_frame():
    """Boxes and points in the (20, 35) frame scale to SAM's 585x1024 input: x by 1024/35, y by 585/20; one
    foreground point per region; the mask prompt passes unbatched."""
    sam = PromptSpy()
    regions = Regions(torch.zeros(2, 20, 35, dtype=torch.uint8), torch.tensor([[1.0, 2, 10, 12], [20, 0, 34, 19]]),
                      torch.tensor([[5, 7], [30, 3]]))
    prompt = torch.zeros(1, 256, 256)
    refinement.predict_masks(sam, torch.zeros(1, 256, 64, 64), regions, prompt, (20, 35))
    sx, sy = 1024 / 35, 585 / 20
    boxes = np.array([[1 * sx, 2 * sy, 10 * sx, 12 * sy], [20 * sx, 0, 34 * sx, 19 * sy]])
    np.testing.assert_allclose(sam.seen["boxes"].numpy(), boxes, rtol=1e-6)
    coords, labels = sam.seen["points"]
    np.testing.assert_allclose(coords.numpy(), [[[5 * sx, 7 * sy]], [[30 * sx, 3 * sy]]], rtol=1e-6)
    assert labels.tolist() == [[1.0], [1.0]] and sam.seen["masks"].shape == (1, 256, 256)


def test_mask_prompt_kept_above_threshold_and_scaled():
    """The class's probabilities resized to the label image's long side 256, zero-padded, kept above
    ``coarse_thresh`` and scaled by ``sam_mask_coff``."""
    probs = torch.tensor([[0.1, 0.5], [0.3, 0.9]])
    settings = SamRefinementSettings(coarse_thresh=0.2, sam_mask_coff=0.01)
    prompt = refinement.class_mask_prompt(probs, (20, 40), settings)
    assert prompt.shape == (1, 256, 256)
    assert (prompt[0, 128:] == 0).all()  # 20x40 -> 128x256, the rest padding
    resized = torch.nn.functional.interpolate(probs[None, None], size=(128, 256), mode="bilinear")[0, 0]
    expected = torch.where(resized > 0.2, 0.01 * resized, torch.zeros(()))
    torch.testing.assert_close(prompt[0, :128], expected)


def test_acceptance_scores_and_failed_regions(monkeypatch):
    """Class 0's region fails (IoU 0.5 < 0.8): no mask; every class's score is raised to its probability inside the
    failed region afterwards, which does not change a label (the reference's rule compares after the raise).
    Class 1's mask covers the left half (logit +10 there, -10 right), class 2's the whole image (+1): labels = argmax
    of sigmoid(logit) · p inside each union, the coarse label where every score is 0."""
    height, width = 48, 64
    rng = np.random.default_rng(1)
    p = rng.random((3, height, width)) + 0.2
    p[0, :, 20:40] += 2  # class 0 in the middle, 1 on the left, 2 on the right
    p[1, :, :20] += 2
    p[2, :, 40:] += 2
    probs = torch.from_numpy(p / p.sum(0)).float()
    labels = probs.argmax(0)
    left = torch.full((1, 1, 256, 256), -10.0)
    left[..., :128] = 10.0
    scripted = {0: torch.tensor([0.5]), 1: torch.tensor([0.9]), 2: torch.tensor([0.95])}
    logits = {0: torch.zeros(1, 1, 256, 256), 1: left, 2: torch.ones(1, 1, 256, 256)}
    calls = []

    def predict_masks(sam, embedding, regions, prompt, frame):
        c = len(calls)
        calls.append((len(regions.masks), frame))
        return logits[c], scripted[c]

    monkeypatch.setattr(refinement, "predict_masks", predict_masks)
    sam = refinement.sam_prompting(1024, None)
    settings = SamRefinementSettings(coarse_thresh=0.2, minimal_area=4, sam_iou_thresh=0.8)
    refined, scores = sam_refine_labels(labels, probs, sam, None, (768, 1024), (height, width), settings)
    assert calls == [(1, (24, 32))] * 3
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    pn = probs.numpy().astype(np.float64)
    expected_scores = np.zeros((3, height, width))
    expected_scores[1, :, :32] = sig(10) * pn[1, :, :32]
    expected_scores[2] = sig(1) * pn[2]
    expected_labels = expected_scores.argmax(0)
    assert (refined.numpy() == expected_labels).all()
    failed = np.zeros((height, width), bool)
    failed[:, 20:40] = True  # class 0's coarse region, nearest-upsampled from the half map
    expected_scores = np.where(failed, np.maximum(expected_scores, pn), expected_scores)  # every class there
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-4, atol=1e-6)

    calls.clear()
    scripted.update({1: torch.tensor([0.1]), 2: torch.tensor([0.1])})  # nothing accepted: the inputs come back
    refined, scores = sam_refine_labels(labels, probs, sam, None, (768, 1024), (height, width), settings)
    assert refined is labels and scores is probs


def test_trident_refines_through_the_evaluator():
    """``Trident(sam_refinement=True)``: the evaluator hands its labels, class probabilities at the label size and the
    original image to the hook; off by default (no hook)."""
    from ovseg.eval.evaluator import Evaluator
    from ovseg.eval.protocols import load_protocol
    from tests.unit.test_trident import tiny_trident

    assert tiny_trident().label_refinement is None
    method = tiny_trident(sam_refinement=True, refinement={"minimal_area": 1, "sam_iou_thresh": -1e9})
    seen = []
    hook = method.refine_labels
    method.refine_labels = lambda labels, probs, original: seen.append((labels, probs, original)) or hook(
        labels, probs, original)
    evaluator = Evaluator(load_protocol("trident"), {"short_side": 64, "long_side_max": 256, "templates": "single",
                                                     "class_names": "{dataset}", "prob_threshold": None})
    entry = evaluator.add_dataset(method, "voc21", [["a"], ["b"], ["c"]], 0, torch.device("cpu"))
    image = torch.rand(3, 50, 90)
    pred = evaluator.predict(method, entry, image, (50, 90))
    (labels, probs, original), = seen
    assert pred.shape == labels.shape == (50, 90) and probs.shape == (3, 50, 90) and original is image
    torch.testing.assert_close(probs.sum(0), torch.ones(50, 90))


def test_class_probabilities_take_each_class_best_query():
    """Upsampled bilinearly, softmax of the scaled scores over all queries, then the max over each class's queries
    (Trident's background: the max over its background words), on a non-square grid."""
    from ovseg.eval.inference import class_probabilities

    scores = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    query_to_class = torch.tensor([0, 0, 1, 2])
    probs = class_probabilities(scores, (6, 10), query_to_class, 40.0)
    up = torch.nn.functional.interpolate(scores[None], size=(6, 10), mode="bilinear")[0].double()
    soft = np.exp(40 * up.numpy()) / np.exp(40 * up.numpy()).sum(0)
    expected = np.stack([np.maximum(soft[0], soft[1]), soft[2], soft[3]])
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_prompt_side_loaded_from_the_sam_checkpoint(tmp_path):
    """The prompt encoder and mask decoder take the checkpoint's tensors (the one whose image encoder Trident reads);
    a file without them is refused."""
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    full = _build_sam(32, 1, 2, [0])
    torch.save(full.state_dict(), tmp_path / "sam.pth")
    loaded = refinement.sam_prompting(1024, str(tmp_path / "sam.pth"))
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, full.state_dict()[name], rtol=0, atol=0)
    torch.save({"image_encoder.neck.0.weight": torch.zeros(1)}, tmp_path / "encoder_only.pth")
    with pytest.raises(ValueError, match="no SAM prompt encoder"):
        refinement.sam_prompting(1024, str(tmp_path / "encoder_only.pth"))


def test_trident_refinement_reuses_the_dense_pass_sam_embedding():
    """With the refinement on, SAM's encoder runs once per image (the dense pass's embedding feeds the prompts) and
    the labels are those of a second, fresh encoder pass."""
    from ovseg.eval.evaluator import Evaluator
    from ovseg.eval.protocols import load_protocol
    from tests.unit.test_trident import tiny_trident

    class NeverKeeps(dict):
        def __setitem__(self, key, value):
            pass

    def predict(method, images):
        passes = []
        handle = method.sam.encoder.register_forward_hook(lambda *_: passes.append(1))
        evaluator = Evaluator(load_protocol("trident"), {"short_side": 64, "long_side_max": 256, "templates": "single",
                                                         "class_names": "{dataset}", "prob_threshold": None})
        entry = evaluator.add_dataset(method, "voc21", [["a"], ["b"], ["c"]], 0, torch.device("cpu"))
        try:
            preds = [evaluator.predict(method, entry, image, tuple(image.shape[-2:])) for image in images]
        finally:
            handle.remove()
        return preds, len(passes)

    torch.manual_seed(0)
    images = [torch.rand(3, 50, 90), torch.rand(3, 70, 40)]
    method = tiny_trident(sam_refinement=True, refinement={"minimal_area": 1, "sam_iou_thresh": -1e9})
    reused, reused_passes = predict(method, images)
    assert reused_passes == len(images) and not method._sam_embeddings
    method._sam_embeddings = NeverKeeps()
    fresh, fresh_passes = predict(method, images)
    assert fresh_passes == 2 * len(images)
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)
