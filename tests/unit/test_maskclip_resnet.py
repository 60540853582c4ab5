"""MaskCLIP's CLIP-ResNet dense path, its attention keys, prompt denoising and key smoothing, each against an
independent recomputation (float64 loops over positions, a per-pixel numpy version of MaskCLIP's refine_output)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg.methods.zeroshot import MaskCLIP, key_smoothing, prompt_denoising
from ovseg.models.clip import CLIPConfig, DenseCLIP


@pytest.fixture(scope="module")
def tiny_rn() -> DenseCLIP:
    torch.manual_seed(0)
    model = DenseCLIP(CLIPConfig(name="tiny-rn", pretrained=None)).eval()
    # non-trivial BatchNorm statistics and biases, so a skipped or reordered layer shows
    with torch.no_grad():
        for module in model.model.visual.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
        for linear in (model.model.visual.attnpool.v_proj, model.model.visual.attnpool.c_proj,
                       model.model.visual.attnpool.k_proj):
            linear.bias.uniform_(-0.5, 0.5)
    return model


def _last_stage(model: DenseCLIP, images: torch.Tensor) -> torch.Tensor:
    visual = model.model.visual
    x = visual.stem(images)
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))


def test_resnet_dense_is_value_then_output_projection_per_position(tiny_rn):
    images = torch.randn(2, 3, 96, 130)
    features, keys = tiny_rn.encode_dense_keys(images)
    stage = _last_stage(tiny_rn, images).double()
    pool = tiny_rn.model.visual.attnpool
    wv, bv = pool.v_proj.weight.double(), pool.v_proj.bias.double()
    wc, bc = pool.c_proj.weight.double(), pool.c_proj.bias.double()
    wk, bk = pool.k_proj.weight.double(), pool.k_proj.bias.double()
    assert features.shape == (2, tiny_rn.embed_dim, *stage.shape[-2:])
    for b in range(2):
        for i in range(stage.shape[2]):
            for j in range(stage.shape[3]):
                x = stage[b, :, i, j]
                expected = wc @ (wv @ x + bv) + bc
                torch.testing.assert_close(features[b, :, i, j].double(), expected, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(keys[b, :, i, j].double(), wk @ x + bk, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("height,width", [(64, 64), (63, 63), (65, 97), (250, 330), (33, 31)])
def test_resnet_token_grid_is_the_trunk_output_size(tiny_rn, height, width):
    features = tiny_rn.encode_dense(torch.randn(1, 3, height, width))
    assert tuple(features.shape[-2:]) == tiny_rn.token_grid(height, width)


def test_vit_keys_are_out_projected_key_projection_of_the_last_block_input():
    torch.manual_seed(1)
    model = DenseCLIP(CLIPConfig(name="tiny-vit", pretrained=None, last_block="value")).eval()
    last = model.model.visual.transformer.resblocks[-1]
    captured = {}
    handle = last.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0].detach()))
    images = torch.randn(1, 3, 64, 64)  # the trained size: open_clip's own forward gives the last block's input
    try:
        model.model.visual(images)
    finally:
        handle.remove()
    _, keys = model.encode_dense_keys(images)
    x = captured["x"].double()[0, 1:]  # patch tokens
    attn, width = last.attn, captured["x"].shape[-1]
    ln = torch.nn.functional.layer_norm(x, (width,), last.ln_1.weight.double(), last.ln_1.bias.double(), last.ln_1.eps)
    wk = attn.in_proj_weight[width:2 * width].double()
    bk = attn.in_proj_bias[width:2 * width].double()
    expected = (ln @ wk.T + bk) @ attn.out_proj.weight.double().T + attn.out_proj.bias.double()
    torch.testing.assert_close(keys[0].flatten(1).T.double(), expected, rtol=1e-5, atol=1e-6)


def _refine_numpy(logits: np.ndarray, keys: np.ndarray, ks: float, pd: float) -> np.ndarray:
    """MaskCLIP's refine_output for one image, pixel by pixel: logits [Q, h, w], keys [C, h, w]."""
    logits = logits.astype(np.float64).copy()
    q, h, w = logits.shape

    def softmax100(v):
        e = np.exp(100 * (v - v.max()))
        return e / e.sum()

    if pd > 0:
        best = np.zeros(q)
        for i in range(h):
            for j in range(w):
                best = np.maximum(best, softmax100(logits[:, i, j]))
        logits[best < pd] = -100.0
    if ks <= 0:
        return logits
    probs = np.stack([[softmax100(logits[:, i, j]) for j in range(w)] for i in range(h)])  # [h, w, Q]
    k = keys.reshape(keys.shape[0], -1).T.astype(np.float64)  # [hw, C]
    k = k / np.linalg.norm(k, axis=0, keepdims=True)  # per channel, over positions (the reference's dim=1)
    flat = probs.reshape(h * w, q)
    out = flat.copy()
    for p in range(h * w):
        if flat[p].max() < ks:
            out[p] = sum(float(k[p] @ k[r]) * flat[r] for r in range(h * w))
    return out.reshape(h, w, q).transpose(2, 0, 1)


@pytest.mark.parametrize("ks,pd", [(0.0, 0.5), (1.0, 0.0), (1.0, 0.5), (0.9, 0.3)])
def test_refinements_match_a_per_pixel_recomputation(ks, pd):
    rng = np.random.default_rng(0)
    # cosines within ±0.08: softmax(100·x) then has classes both above and below the thresholds
    logits = rng.uniform(-0.08, 0.08, (2, 5, 4, 6)).astype(np.float32)
    logits[0, 1] += 0.06  # a confident class in image 0
    keys = rng.normal(size=(2, 7, 4, 6)).astype(np.float32)
    out = torch.from_numpy(logits)
    if pd > 0:
        out = prompt_denoising(out, pd)
    if ks > 0:
        out = key_smoothing(out, torch.from_numpy(keys), ks)
    for b in range(2):
        np.testing.assert_allclose(out[b].double().numpy(), _refine_numpy(logits[b], keys[b], ks, pd), rtol=1e-4,
                                   atol=1e-6)


def test_prompt_denoising_removes_exactly_the_classes_never_confident():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 0] = 0.2  # class 0 wins one position outright
    out = prompt_denoising(logits, 0.5)
    assert torch.equal(out[0, 0], logits[0, 0])
    assert torch.all(out[0, 1:] == -100)


def test_maskclip_refinements_change_labels_only_when_on(tiny_rn):
    torch.manual_seed(0)
    plain = MaskCLIP(clip=CLIPConfig(name="tiny-rn", pretrained=None))
    plain.encoder.load_state_dict(tiny_rn.state_dict())
    refined = MaskCLIP(clip=CLIPConfig(name="tiny-rn", pretrained=None), ks_thresh=1.0, pd_thresh=0.5)
    refined.encoder.load_state_dict(tiny_rn.state_dict())
    images = torch.rand(1, 3, 160, 160)
    text = torch.randn(4, tiny_rn.embed_dim)
    base = plain.dense_logits(images, text)
    features, keys = tiny_rn.encode_dense_keys(tiny_rn.normalize(images))
    expected = key_smoothing(prompt_denoising(base, 0.5), keys, 1.0)
    torch.testing.assert_close(refined.dense_logits(images, text), expected)
    assert refined.hparams["ks_thresh"] == 1.0 and refined.hparams["pd_thresh"] == 0.5
    with pytest.raises(ValueError, match="ks_thresh"):
        MaskCLIP(clip=CLIPConfig(name="tiny-rn", pretrained=None), ks_thresh=-1)


def test_clips4_student_on_a_clip_resnet_fine_tunes_the_last_stages_and_the_value_path(tiny_rn):
    from ovseg.methods.clips4 import CLIPDenseEncoder

    student = CLIPDenseEncoder(trainable_blocks=1, output_stride=8, head_dim=16)
    student.build(tiny_rn)
    trainable = {name for name, p in student.clip.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("model.visual.layer4.", "model.visual.attnpool.v_proj.",
                                              "model.visual.attnpool.c_proj.")) for name in trainable)
    assert any(name.startswith("model.visual.attnpool.c_proj.") for name in trainable)
    images = torch.rand(2, 3, 96, 128)
    out = student(images)
    assert out.shape == (2, tiny_rn.embed_dim, 12, 16)  # stride 32 -> 8
    # the head starts as plain upsampling of the teacher's dense features
    teacher = tiny_rn.encode_dense(tiny_rn.normalize(images))
    expected = torch.nn.functional.interpolate(teacher, scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
