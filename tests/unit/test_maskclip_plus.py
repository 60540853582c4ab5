"""MaskCLIP+: the DeepLab-v2 student's pieces (ASPP-v2, dilation, deep stem), the pseudo-label cross-entropy step and
the optimiser against independent recomputations, and the training crops (tiny random CLIP)."""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from ovseg.methods.maskclip_plus import MMSegCrop, MaskCLIPPlus, photometric_distortion, pseudo_label_cross_entropy
from ovseg.models.clip import CLIPConfig
from ovseg.models.deeplab import ASPPv2, DeepLabResNet, dilate_resnet

TINY = CLIPConfig(name="tiny-vit", pretrained=None, last_block="value", residual="token")


def tiny_student(**kwargs):
    args = dict(depth=18, base_width=8, stem="deep", head="aspp_v2", atrous_rates=(1, 2, 3, 4))
    return DeepLabResNet(**{**args, **kwargs})


def make(**kwargs):
    torch.manual_seed(0)
    args = dict(clip=TINY, classes=["cat", "dog", "sky"], train_templates="single", student=tiny_student(),
                teacher_protocol="toyworld")
    return MaskCLIPPlus(**{**args, **kwargs})


# -- the student ------------------------------------------------------------------------------------------------
def test_aspp_v2_branches_are_dilated_3x3_convs_summed():
    """A hand-built check: each branch's kernel holds a single 1 at its top-left tap, BN is the identity, so an
    impulse at (y, x) reaches (y + d, x + d) through the branch of dilation d, and the sum holds one impulse per
    branch; the output keeps the input size (padding = dilation)."""
    aspp = ASPPv2(1, 1, dilations=(2, 5)).eval()
    for branch in aspp.branches:
        conv, bn = branch[0], branch[1]
        assert conv.bias is None and conv.kernel_size == (3, 3)
        nn.init.zeros_(conv.weight)
        conv.weight.data[0, 0, 0, 0] = 1.0
        bn.eps = 0.0
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 4, 6] = 3.0
    out = aspp(x)
    expected = torch.zeros_like(x)
    for d in (2, 5):
        expected[0, 0, 4 + d, 6 + d] += 3.0
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)
    # a negative input is cut by each branch's ReLU before the sum
    assert aspp(-x).abs().sum() == 0


def test_dilation_matches_torchvision_replace_stride_with_dilation():
    """Bottleneck ResNets: the strides turned into dilations (contract_dilation) equal torchvision's own."""
    x = torch.randn(1, 3, 64, 64)
    for output_stride, dilate in ((8, [False, True, True]), (16, [False, False, True])):
        torch.manual_seed(0)
        reference = torchvision.models.resnet50(replace_stride_with_dilation=dilate).eval()
        torch.manual_seed(0)
        ours = torchvision.models.resnet50()
        dilate_resnet(ours, output_stride)
        ours.eval()
        body = lambda r: nn.Sequential(*list(r.children())[:-2])(x)  # noqa: E731
        out = body(ours)
        assert out.shape[-1] == 64 // output_stride
        torch.testing.assert_close(out, body(reference), rtol=0, atol=0)


def test_basic_block_stages_dilate_their_first_conv_like_mmseg():
    """mmseg ResNetV1c(depth=18, dilations=(1, 1, 2, 4), contract_dilation=True): layer3 at 1 then 2, layer4 at 2 then
    4, on each BasicBlock's conv1 only; output stride 8."""
    student = tiny_student(embed_dim=16)
    layer3, layer4 = student.body[6], student.body[7]
    assert [b.conv1.dilation[0] for b in layer3] == [1, 2] and [b.conv1.dilation[0] for b in layer4] == [2, 4]
    assert all(b.conv2.dilation == (1, 1) and b.conv1.padding == b.conv1.dilation for b in [*layer3, *layer4])
    assert student(torch.rand(2, 3, 64, 48)).shape == (2, 16, 8, 6)


def test_deep_stem_loads_mmseg_resnet_v1c_names(tmp_path):
    """An mmseg ResNetV1c checkpoint (``backbone.stem.{0,1,3,4,6,7}``, ``backbone.layerN``) lands in the student."""
    torch.manual_seed(1)
    source = DeepLabResNet(depth=18, stem="deep", head="aspp_v2", atrous_rates=(1,), embed_dim=8)
    stem, layers = source.body[0], {f"layer{i}": source.body[3 + i] for i in range(1, 5)}
    state = {f"backbone.stem.{k}": v for k, v in stem.state_dict().items()}
    for name, layer in layers.items():
        state |= {f"backbone.{name}.{k}": v for k, v in layer.state_dict().items()}
    assert {"backbone.stem.0.weight", "backbone.stem.7.running_var"} <= set(state)
    torch.save({"state_dict": state}, tmp_path / "resnet18_v1c.pth")
    torch.manual_seed(2)
    loaded = DeepLabResNet(depth=18, stem="deep", head="aspp_v2", atrous_rates=(1,), embed_dim=8,
                           weights=str(tmp_path / "resnet18_v1c.pth"))
    for key, value in source.body.state_dict().items():
        torch.testing.assert_close(loaded.body.state_dict()[key], value, rtol=0, atol=0)


# -- the training step --------------------------------------------------------------------------------------------
def _bilinear_upsample(scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """align_corners=False bilinear resize of ``[K, h, w]``, written out per output pixel (float64)."""
    k, h, w = scores.shape
    out = np.zeros((k, height, width))
    for y in range(height):
        sy = max((y + 0.5) * h / height - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(width):
            sx = max((x + 0.5) * w / width - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, y, x] = ((1 - fy) * ((1 - fx) * scores[:, y0, x0] + fx * scores[:, y0, x1])
                            + fy * ((1 - fx) * scores[:, y1, x0] + fx * scores[:, y1, x1]))
    return out


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-pixel CE of ``[K, H, W]`` scores (float64), 0 where the target is 255."""
    shifted = logits - logits.max(axis=0, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=0, keepdims=True))
    safe = np.where(targets == 255, 0, targets)
    ce = -np.take_along_axis(log_p, safe[None], axis=0)[0]
    return np.where(targets == 255, 0.0, ce)


@pytest.mark.parametrize("average", ["all_pixels", "labelled"])
def test_pseudo_label_cross_entropy_against_numpy(average):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 4, size=(2, 12, 20))
    targets[:, 8:, :] = 255
    loss = pseudo_label_cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets), average)
    per_pixel = np.stack([_cross_entropy(_bilinear_upsample(lg.astype(np.float64), 12, 20), t)
                          for lg, t in zip(logits, targets)])
    denominator = per_pixel.size if average == "all_pixels" else (targets != 255).sum()
    assert loss.item() == pytest.approx(per_pixel.sum() / denominator, rel=1e-5)


def test_training_step_trains_the_student_on_the_teachers_argmax():
    model = make().train()
    images = torch.rand(2, 3, 64, 64)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[1, 40:] = False  # bottom padding of the second crop
    out = model.compute_loss(images, valid)

    # pseudo labels: argmax of the teacher's cosine scores, bilinearly upsampled to the crop; padding 255; the
    # padding reads as the ImageNet mean colour (0 after normalisation)
    filled = images.clone()
    filled[1, :, 40:] = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    teacher = model.teacher.encoder
    features = teacher.encode_dense(teacher.normalize(filled)).double()
    features = features / features.norm(dim=1, keepdim=True)
    scores = torch.einsum("bdhw,kd->bkhw", features, model.class_text.double()).numpy()
    expected = np.stack([_bilinear_upsample(s, 64, 64).argmax(0) for s in scores])
    expected[1, 40:] = 255
    np.testing.assert_array_equal(out["targets"].numpy(), expected)

    # student scores: raw features . unit text (norm_feat false); the loss over all pixels, padding adding 0
    feats = model.student(model.fill_padding(images, valid)).detach().double()
    logits = torch.einsum("bdhw,kd->bkhw", feats, model.class_text.double())
    torch.testing.assert_close(out["logits"].detach().double(), logits, rtol=1e-5, atol=1e-5)
    per_pixel = np.stack([_cross_entropy(_bilinear_upsample(lg, 64, 64), t)
                          for lg, t in zip(logits.numpy(), expected)])
    assert out["loss"].item() == pytest.approx(per_pixel.mean(), rel=1e-5)

    out["loss"].backward()
    assert all(p.grad is not None for p in model.student.parameters())
    assert all(p.grad is None for p in model.teacher.parameters()) and not model.class_text.requires_grad


def test_inference_scores_are_the_training_scores_for_any_vocabulary():
    model = make().eval()
    images = torch.rand(1, 3, 64, 64)
    text = model.encode_text(["cat", "tree"], ["a photo of a {}."])
    torch.testing.assert_close(model.dense_logits(images, text), model.class_logits(images, text))
    assert model.dense_logits(images, text).shape == (1, 2, 8, 8)


def test_optimiser_is_sgd_with_mmcv_poly_and_its_floor():
    model = make()
    model._trainer = type("T", (), {"estimated_stepping_batches": 10})()
    opt = model.configure_optimizers()
    sgd, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    assert {id(p) for p in sgd.param_groups[0]["params"]} == {id(p) for p in model.student.parameters()}
    for step in range(11):
        # mmcv PolyLrUpdaterHook: (base - min_lr) * (1 - iter / max_iters) ** 0.9 + min_lr
        assert sgd.param_groups[0]["lr"] == pytest.approx((0.01 - 1e-4) * (1 - step / 10) ** 0.9 + 1e-4)
        sgd.step()
        scheduler.step()


# -- the training crops ---------------------------------------------------------------------------------------------
def test_crop_resizes_like_mmcv_and_pads_bottom_right():
    image = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    crop = MMSegCrop(crop_size=512, img_scale=(2048, 512), ratio_range=(0.5, 0.5), photometric=False)
    np.random.seed(0)
    assert crop.resize(image).shape == (256, 341, 3)  # scale (1024, 256): the short side rules, 500 * 256 / 375
    np.random.seed(0)
    out = crop({"image": image, "meta": {"index": 3}})
    assert out["image"].shape == (3, 512, 512) and out["image"].dtype == torch.uint8
    assert out["valid"][:256, :341].all() and not out["valid"][256:].any() and not out["valid"][:, 341:].any()
    assert out["image"][:, 256:].sum() == 0 and out["meta"] == {"index": 3}


def test_photometric_distortion_follows_mmseg_draw_order():
    """With every coin showing 1 and fixed magnitudes the result is brightness, contrast, saturation, hue in mmseg's
    order (mode 1: contrast second), each step recomputed here with cv2 on the RGB image."""
    import cv2

    class Draws:
        def __init__(self):
            self.uniforms = iter([10.0, 1.2, 0.8])

        def randint(self, low, high=None):
            return 5 if high is not None else 1  # hue shift +5; every coin 1 (mode 1)

        def uniform(self, low, high):
            return next(self.uniforms)

    image = np.random.default_rng(1).integers(0, 255, (8, 9, 3), dtype=np.uint8)
    saved = np.random.randint, np.random.uniform
    draws = Draws()
    np.random.randint, np.random.uniform = draws.randint, draws.uniform
    try:
        out = photometric_distortion(image)
    finally:
        np.random.randint, np.random.uniform = saved
    step = np.clip(image.astype(np.float32) + 10.0, 0, 255).astype(np.uint8)
    step = np.clip(step.astype(np.float32) * 1.2, 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(step, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * 0.8, 0, 255).astype(np.uint8)
    step = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    hsv = cv2.cvtColor(step, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 5) % 180
    np.testing.assert_array_equal(out, cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
