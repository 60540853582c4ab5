"""CLIPS4 method: training vocabulary, gradients, backbones, known/unknown scores (tiny random CLIP)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.data.folds import fold_classes, known_classes
from ovseg.eval.metrics import scores_from_confusion
from ovseg.methods.clips4 import CLIPS4, CLIPDenseEncoder, vocabulary_split_scores
from ovseg.models.clip import CLIPConfig

TINY = CLIPConfig(name="tiny-vit", pretrained=None, last_block="value", residual="token")


def make(**kwargs):
    torch.manual_seed(0)
    args = dict(clip=TINY, train_templates="single", num_segments=4, kmeans_iterations=3, num_unknown=2,
                backbone=CLIPDenseEncoder(trainable_blocks=1, head_dim=8), protocol_overrides={"templates": "single"})
    return CLIPS4(**{**args, **kwargs})


@pytest.mark.parametrize("fold", [0, 3])
def test_only_the_training_vocabulary_is_encoded(fold):
    model = make(known_classes=f"context59-fold{fold}", strict_vocabulary=True)
    assert model.known_names == known_classes(fold)
    assert model.encoded_prompts == [f"a photo of a {n}." for n in known_classes(fold)]
    held_out_prompts = {f"a photo of a {n}." for n in fold_classes(fold)}
    assert not held_out_prompts & set(model.encoded_prompts)
    assert model.known_text.shape == (len(known_classes(fold)), model.encoder.embed_dim)
    # while fitting, a held-out name is refused; known names are fine
    model._fitting = lambda: True
    with pytest.raises(ValueError, match="strict_vocabulary"):
        model.encode_text([fold_classes(fold)[0]], ["a photo of a {}."])
    model.encode_text(known_classes(fold)[:2], ["a photo of a {}."])
    assert not held_out_prompts & set(model.encoded_prompts)


def test_student_starts_as_the_teacher_and_only_it_gets_gradients():
    model = make(known_classes=["cat", "dog", "sky"])
    images = torch.rand(2, 3, 64, 64)
    teacher = model.encoder.encode_dense(model.encoder.normalize(images))
    expected = F.interpolate(teacher, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.backbone(images), expected, atol=1e-5, rtol=1e-4)  # zero-init head
    assert model.backbone.clip.model.transformer is None  # the student carries no text tower

    views = torch.rand(2, 2, 3, 64, 64)
    geometry = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.25, 0.0, 1.0, 0.75, 1.0]]).expand(2, 2, 5).contiguous()
    teacher_images = [torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), torch.rand(3, 64, 64)]
    regions = [(torch.arange(64)[:, None] // 32).expand(64, 96),
               torch.arange(64)[None].expand(64, -1) // 16]  # two horizontal bands; four vertical stripes
    out = model.compute_losses(views, geometry, teacher_images, regions)
    assert all(torch.isfinite(out[k]) for k in ("loss", "pixel", "embedding", "semantic"))
    assert 0.3 < out["overlap"].item() < 0.9
    out["loss"].backward()
    groups = model.backbone.param_groups()
    assert groups["backbone"] and groups["head"]
    assert all(p.grad is not None for p in groups["head"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["backbone"])
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.unknown.prototypes.grad is None
    frozen = [p for n, p in model.backbone.clip.named_parameters() if "resblocks.0." in n]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    # optimiser: SGD, momentum 0.9, weight decay 1e-3, backbone lr x0.1
    model._trainer = type("T", (), {"estimated_stepping_batches": 10})()
    opt = model.configure_optimizers()
    sgd, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert isinstance(sgd, torch.optim.SGD) and [g["lr"] for g in sgd.param_groups] == [0.01, 0.001]
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-3
    for _ in range(5):
        sgd.step()
        scheduler.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)


def test_deeplab_backbone_option():
    from ovseg.models.deeplab import DeepLabResNet

    model = make(known_classes=["cat", "dog"], backbone=DeepLabResNet(depth=50, output_stride=8, weights=None))
    images = torch.rand(2, 3, 64, 64)
    assert model.embed(images).shape == (2, model.encoder.embed_dim, 8, 8)
    views = torch.rand(1, 2, 3, 64, 64)
    geometry = torch.tensor([[[0.0, 0.0, 1.0, 1.0, 0.0], [0.1, 0.1, 0.9, 0.9, 1.0]]])
    out = model.compute_losses(views, geometry, [torch.rand(3, 64, 64)], [torch.zeros(64, 64, dtype=torch.long)])
    out["loss"].backward()
    assert model.backbone.head[1].weight.grad is not None
    assert model.hparams["backbone"]["class_path"] == "ovseg.models.deeplab.DeepLabResNet"


def test_segsort_baseline_trains_without_clip(monkeypatch):
    """configs/segsort_voc.yaml: CLIP losses and unknown prototypes off -> the teacher never runs, the loss is the
    SegSort pixel loss alone, and the DeepLab backbone keeps its own width (32)."""
    from ovseg.models.deeplab import DeepLabResNet

    with pytest.raises(ValueError, match="width"):
        make(known_classes=["cat"], backbone=DeepLabResNet(depth=50, weights=None, embed_dim=32, own_width=True))
    model = make(known_classes=["cat"], backbone=DeepLabResNet(depth=50, weights=None, embed_dim=32, own_width=True),
                 pixel_loss="segsort", lambda_embedding=0.0, lambda_semantic=0.0, num_unknown=0)
    assert not model.uses_clip and model.embed(torch.rand(2, 3, 64, 64)).shape == (2, 32, 8, 8)
    monkeypatch.setattr(model, "teacher_features", lambda *a: pytest.fail("the teacher ran"))
    views = torch.rand(1, 2, 3, 64, 64)
    geometry = torch.tensor([[[0.0, 0.0, 1.0, 1.0, 0.0], [0.1, 0.1, 0.9, 0.9, 1.0]]])
    regions = [torch.arange(64)[None].expand(64, -1) // 32]
    out = model.compute_losses(views, geometry, [torch.rand(3, 64, 64)], regions)
    assert torch.equal(out["loss"], out["pixel"]) and out["embedding"] == 0 and out["semantic"] == 0
    out["loss"].backward()
    assert model.backbone.head[1].weight.grad.abs().sum() > 0


def test_known_unknown_scores_from_the_confusion_matrix():
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 50, (5, 5)) + np.diag(rng.integers(50, 200, 5))
    cm[3] = 0
    cm[:, 3] = 0  # a class absent from labels and predictions: NaN IoU, excluded
    names = [["background"], ["cat", "kitty"], ["dog"], ["sky"], ["tree"]]
    out = vocabulary_split_scores(cm, names, {"kitty", "sky"})
    iou = scores_from_confusion(cm).iou
    assert out["known_classes"] == ["cat", "sky"] and out["unknown_classes"] == ["dog", "tree"]
    assert out["known_mIoU"] == pytest.approx(round(iou[1], 2))  # sky is NaN
    assert out["unknown_mIoU"] == pytest.approx(round((iou[2] + iou[4]) / 2, 2))
    k, u = out["known_mIoU"], out["unknown_mIoU"]
    assert out["hIoU"] == pytest.approx(round(2 * k * u / (k + u), 2))
    assert vocabulary_split_scores(cm, names, {"cat", "dog", "sky", "tree"})["hIoU"] is None


def test_checkpoints_that_call_the_frozen_clip_teacher_still_load():
    model = make(known_classes=["cat", "dog"])
    old_key = lambda k: "teacher." + k[len("encoder."):] if k.startswith("encoder.") else k  # noqa: E731
    state = {old_key(k): v.clone() + 1 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    fresh = make(known_classes=["cat", "dog"])
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[old_key(key)])
    # checkpoints from before the unknown rule's calibration buffers load with it unmeasured
    for name in ("gap", "offset", "known_means", "calibrated"):
        del state[f"unknown.{name}"]
    fresh = make(known_classes=["cat", "dog"])
    fresh.load_state_dict(state)
    assert not fresh.unknown.calibrated and fresh.unknown.gap == 0 and not fresh.unknown.known_means.any()
