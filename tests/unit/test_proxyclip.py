"""ProxyCLIP (ovseg.methods.proxyclip, ovseg.models.attention.proxy_attention, ovseg.models.vfm): the proxy attention
against a float64 numpy re-computation with loops on non-square grids (the VFM's grid not CLIP's), its masking of
negative similarities and per-image centring, the VFM feature sources on tiny random models, and the method's
features against its pieces."""

import numpy as np
import pytest
import torch

from tests.unit.test_maskclip_plus import _bilinear_upsample  # align_corners=False, a loop per pixel

from ovseg.models.attention import proxy_attention
from ovseg.models.vfm import VFMConfig, VisionFoundationModel, pos_embed_resized

TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}
TINY_SAM = {"depth": 2, "embed_dim": 32, "num_heads": 2, "out_chans": 16, "window_size": 4,
            "global_attn_indexes": (1,)}


def _reference(values: np.ndarray, grid, proxy: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """The paper's Eq. 3-4 as ProxyCLIP's custom_attn computes it, per image, with loops: [B, heads, HW, d]."""
    batch, heads, _, head_dim = values.shape
    rows, cols = grid
    _, _, height, width = proxy.shape
    out = np.zeros((batch, heads, height * width, head_dim))
    for b in range(batch):
        tokens = proxy[b].reshape(proxy.shape[1], -1).T  # [HW, C]
        tokens = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
        n = len(tokens)
        similarity = np.array([[tokens[m] @ tokens[k] for k in range(n)] for m in range(n)])
        centred = (similarity - similarity.mean() * beta) * gamma
        weights = np.zeros_like(centred)
        for m in range(n):
            kept = centred[m] >= 0
            e = np.exp(centred[m][kept] - centred[m][kept].max())
            weights[m][kept] = e / e.sum()
        for h in range(heads):
            patches = values[b, h, 1:].reshape(rows, cols, head_dim).transpose(2, 0, 1)
            resized = _bilinear_upsample(patches, height, width).reshape(head_dim, -1).T  # [HW, d]
            out[b, h] = weights @ resized
    return out


def _inputs(seed: int, grid=(3, 5), vfm_grid=(4, 7), batch=2, heads=3, head_dim=4, channels=6):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, heads, 1 + grid[0] * grid[1], head_dim, generator=g, dtype=torch.float64)
    # a shared direction plus noise: similarities spread on both sides of the threshold
    proxy = torch.randn(batch, channels, *vfm_grid, generator=g, dtype=torch.float64) + torch.randn(
        batch, channels, 1, 1, generator=g, dtype=torch.float64)
    return values, proxy


@pytest.mark.parametrize("beta, gamma", [(1.2, 3.0), (0.5, 1.0)])
def test_proxy_attention_equals_a_loop_recomputation_on_non_square_grids(beta, gamma):
    values, proxy = _inputs(0)
    ours = proxy_attention(values, (3, 5), proxy, beta, gamma)
    assert ours.shape == (2, 3, 4 * 7, 4)
    np.testing.assert_allclose(ours.numpy(), _reference(values.numpy(), (3, 5), proxy.numpy(), beta, gamma),
                               rtol=1e-10, atol=1e-12)


def test_proxy_attention_centres_each_image_on_its_own_mean():
    """The batch's images are independent: each one alone gives its rows of the batched result."""
    values, proxy = _inputs(1)
    proxy[1] *= -3.0  # the second image's similarities are those of another set of tokens: scaled and mirrored
    proxy[1, :, :2] = torch.randn(6, 2, 7, dtype=torch.float64)
    batched = proxy_attention(values, (3, 5), proxy)
    for b in range(2):
        torch.testing.assert_close(batched[b:b + 1], proxy_attention(values[b:b + 1], (3, 5), proxy[b:b + 1]),
                                   rtol=1e-12, atol=1e-12)


def test_proxy_attention_masks_negative_similarities():
    """Two groups of VFM tokens pointing in opposite directions: after centring, similarities across the groups are
    negative and get exactly zero weight; within a group every token gets the same weight."""
    rows, cols = 2, 3
    proxy = torch.zeros(1, 2, 2, 4, dtype=torch.float64)
    proxy[0, 0, :, :2] = 1.0  # left half: +e0
    proxy[0, 0, :, 2:] = -1.0  # right half: -e0
    values = torch.randn(1, 1, 1 + rows * cols, 2, dtype=torch.float64)
    out = proxy_attention(values, (rows, cols), proxy, beta=1.2, gamma=3.0)
    # the attended values of a token are the mean of its own group's (resized) values
    patches = values[:, :, 1:].reshape(1, rows, cols, 2).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(patches, size=(2, 4), mode="bilinear", align_corners=False)[0]
    left, right = resized[:, :, :2].reshape(2, -1).mean(1), resized[:, :, 2:].reshape(2, -1).mean(1)
    out = out[0, 0].reshape(2, 4, 2)
    torch.testing.assert_close(out[:, :2], left.expand(2, 2, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 2:], right.expand(2, 2, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, kwargs, size, grid, channels", [
    ("dino", TINY_VIT, (61, 90), (7, 11), 32),  # patch 8 at the image's own size, remainder dropped
    ("dinov2", TINY_VIT, (61, 90), (4, 6), 32),  # patch 14, four register tokens dropped
    ("mae", {**TINY_VIT, "img_size": 48}, (61, 90), (3, 3), 32),  # resized to input_size 48
    ("sam", TINY_SAM, (61, 90), (4, 4), 16),  # resized to input_size 64, the neck's channels
])
def test_vfm_features_have_each_kinds_grid(kind, kwargs, size, grid, channels):
    input_size = {"mae": 48, "sam": 64}.get(kind)
    torch.manual_seed(0)
    vfm = VisionFoundationModel(VFMConfig(kind=kind, weights=None, input_size=input_size, model_kwargs=kwargs))
    features = vfm(torch.rand(2, 3, *size))
    assert features.shape == (2, channels, *grid)
    assert vfm.grid(*size) == grid
    assert torch.isfinite(features).all()


def test_dino_features_are_the_last_normed_patch_tokens():
    """The feature map is the ViT's last block through its final norm, class token dropped, row-major."""
    torch.manual_seed(0)
    vfm = VisionFoundationModel(VFMConfig(kind="dino", weights=None, model_kwargs=TINY_VIT))
    images = torch.rand(1, 3, 40, 64)
    vit = vfm.model
    x = vfm.normalize(images)
    tokens = vit.patch_embed(x)
    tokens = vit._pos_embed(tokens)
    for block in vit.blocks:
        tokens = block(tokens)
    tokens = vit.norm(tokens)[:, 1:]
    torch.testing.assert_close(vfm(images), tokens.transpose(1, 2).reshape(1, 32, 5, 8))


def test_positional_embedding_rules():
    """dino: DINO's scale factor (grid + 0.1) / trained; mae: to the size, not antialiased; timm: antialiased."""
    pos = torch.randn(1, 16, 3)
    grid_in = pos.reshape(1, 4, 4, 3).permute(0, 3, 1, 2)

    def flat(x):
        return x.permute(0, 2, 3, 1).reshape(1, -1, 3)

    torch.testing.assert_close(pos_embed_resized(pos, (4, 4), (6, 5), "dino"), flat(torch.nn.functional.interpolate(
        grid_in, scale_factor=(6.1 / 4, 5.1 / 4), mode="bicubic")))
    torch.testing.assert_close(pos_embed_resized(pos, (4, 4), (3, 2), "mae"), flat(torch.nn.functional.interpolate(
        grid_in, size=(3, 2), mode="bicubic", align_corners=False)))
    assert not torch.allclose(pos_embed_resized(pos, (4, 4), (3, 2), "timm"), pos_embed_resized(pos, (4, 4), (3, 2),
                                                                                                 "mae"))
    assert pos_embed_resized(pos, (4, 4), (4, 4), "dino") is pos


def test_method_features_are_the_proxy_block_through_ln_post_and_proj():
    """ProxyCLIP's dense features: CLIP's blocks but the last as trained, the proxy last block on the VFM's features
    (no residual, no MLP), ln_post, proj; on the VFM's grid."""
    from ovseg.methods import ProxyCLIP
    from ovseg.methods.proxyclip import proxy_last_block
    from ovseg.models.clip import CLIPConfig, TransformerBlockView

    torch.manual_seed(0)
    method = ProxyCLIP(clip=CLIPConfig(name="tiny-vit", pretrained=None),
                       vfm=VFMConfig(weights=None, model_kwargs=TINY_VIT)).eval()
    images = torch.rand(2, 3, 48, 80)
    features = method.dense_features(images)
    assert features.shape == (2, 64, 6, 10)  # DINO patch 8, CLIP grid 3x5

    visual = method.encoder.model.visual
    x = method.encoder.normalize(images)
    captured = []
    handle = visual.transformer.resblocks[-2].register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        method.encoder.encode_tokens(x)  # ProxyLastStage without a proxy raises: run the plain path
    except RuntimeError:
        pass
    handle.remove()
    with torch.no_grad():
        proxy = method.vfm(method._vfm_images(images, x))
        block = proxy_last_block(captured[0], TransformerBlockView.from_open_clip(visual.transformer.resblocks[-1]),
                                 (3, 5), proxy, 1.2, 3.0)
        expected = visual.ln_post(block) @ visual.proj
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), expected, rtol=1e-5, atol=1e-6)
