"""The last-block attention registry and the training-free methods built on it (SCLIP, ClearCLIP, NACLIP): each
method's dense tokens against an independent float64 re-computation of its paper's formula from the block's
weights, and a throw-away attention registered from this test module (not from ovseg/) run through `ovseg test`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.methods import NACLIP, SCLIP, ClearCLIP
from ovseg.methods.naclip import neighbourhood_bias
from ovseg.models.attention import LAST_BLOCK_ATTENTIONS, AttentionTokens, get_attention, register_attention
from ovseg.models.clip import CLIPConfig, DenseCLIP

REPO = Path(__file__).resolve().parents[2]


def _tiny_method(cls):
    torch.manual_seed(0)
    default = cls.__init__.__defaults__[0]  # the method's own CLIPConfig (last block, residual, FFN)
    clip = CLIPConfig(name="tiny-vit", pretrained=None, last_block=default.last_block, residual=default.residual,
                      ffn=default.ffn)
    return cls(clip=clip)


def _last_block_input(encoder, images):
    """Tokens entering the last block, [B, 1+N, C] (class token first): the output of the block before it, captured
    with a hook (the positional-embedding resize for a non-square grid is tested in test_clip_dense.py)."""
    captured = []
    handle = encoder.model.visual.transformer.resblocks[-2].register_forward_hook(
        lambda module, args, output: captured.append(output))
    try:
        encoder.encode_tokens(images)
    finally:
        handle.remove()
    return captured[0]


def _paper_tokens(encoder, images, grid, attention: str):
    """float64 re-computation of the last block + ln_post + proj for each paper's attention."""
    visual = encoder.model.visual
    block = visual.transformer.resblocks[-1]
    x = _last_block_input(encoder, images).double()
    d = lambda t: t.detach().double()  # noqa: E731
    y = F.layer_norm(x, (x.shape[-1],), d(block.ln_1.weight), d(block.ln_1.bias), block.ln_1.eps)
    q, k, v = (y @ d(w).T + d(b) for w, b in zip(block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)))
    heads = block.attn.num_heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scale = q.shape[-1] ** -0.5
    if attention == "sclip":  # SCLIP Eq. 4: softmax(q qᵀ) + softmax(k kᵀ), then the block's residual and MLP
        weights = torch.softmax(q @ q.transpose(-1, -2) * scale, -1) + torch.softmax(k @ k.transpose(-1, -2) * scale,
                                                                                     -1)
    elif attention == "clearclip":  # ClearCLIP: softmax(q qᵀ), no residual, no MLP
        weights = torch.softmax(q @ q.transpose(-1, -2) * scale, -1)
    else:  # NACLIP: softmax(k kᵀ s + Gaussian over patch distance, σ = 5 patches), class token unbiased
        rows, cols = grid
        omega = torch.zeros(1 + rows * cols, 1 + rows * cols, dtype=torch.float64)
        for p in range(rows * cols):
            for p2 in range(rows * cols):
                dist2 = (p // cols - p2 // cols) ** 2 + (p % cols - p2 % cols) ** 2
                omega[1 + p, 1 + p2] = math.exp(-dist2 / (2 * 5.0**2))
        weights = torch.softmax(k @ k.transpose(-1, -2) * scale + omega, -1)
    mixed = (weights @ v).permute(0, 2, 1, 3).reshape(x.shape)
    out = mixed @ d(block.attn.out_proj.weight).T + d(block.attn.out_proj.bias)
    if attention == "sclip":
        out = x + out
        hidden = F.layer_norm(out, (out.shape[-1],), d(block.ln_2.weight), d(block.ln_2.bias), block.ln_2.eps)
        hidden = hidden @ d(block.mlp.c_fc.weight).T + d(block.mlp.c_fc.bias)
        out = out + F.gelu(hidden) @ d(block.mlp.c_proj.weight).T + d(block.mlp.c_proj.bias)
    out = F.layer_norm(out, (out.shape[-1],), d(visual.ln_post.weight), d(visual.ln_post.bias), visual.ln_post.eps)
    return out @ d(visual.proj)


@pytest.mark.parametrize("cls,attention", [(SCLIP, "sclip"), (ClearCLIP, "clearclip"), (NACLIP, "naclip")])
def test_method_dense_tokens_equal_float64_paper_formula(cls, attention):
    method = _tiny_method(cls)
    visual = method.encoder.model.visual
    assert isinstance(visual.transformer.resblocks[-1].mlp.gelu, torch.nn.GELU)  # the reference's activation
    images = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(3))  # a 3x5 grid: not square
    with torch.no_grad():
        tokens = method.encoder.encode_tokens(images)
        reference = _paper_tokens(method.encoder, images, (3, 5), attention)
    assert tokens.shape == reference.shape == (2, 16, method.encoder.embed_dim)
    torch.testing.assert_close(tokens.double(), reference, atol=1e-5, rtol=1e-5)


def test_naclip_bias_is_the_gaussian_of_patch_distance_and_moves_the_output():
    bias = neighbourhood_bias((3, 5), std=5.0, dtype=torch.float64)
    assert bias.shape == (16, 16) and bias[0].abs().max() == 0 and bias[:, 0].abs().max() == 0
    # patch (0, 0) -> (2, 4): squared distance 4 + 16
    assert bias[1, 1 + 2 * 5 + 4].item() == pytest.approx(math.exp(-20 / 50))
    assert torch.equal(bias, bias.T) and torch.all(bias[1:, 1:].diagonal() == 1)
    # without the bias NACLIP's attention is plain key-key attention: the bias must change the result
    method = _tiny_method(NACLIP)
    images = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with_bias = method.encoder.encode_tokens(images)
        method.encoder.config.last_block = "kk"
        without = method.encoder.encode_tokens(images)
    assert (with_bias - without).abs().max() > 1e-4


def test_registry_lists_names_imports_module_paths_and_refuses_a_second_owner():
    assert {"vanilla", "value", "qq_kk", "qq", "kk", "naclip"} <= set(LAST_BLOCK_ATTENTIONS)
    with pytest.raises(ValueError, match=r"last_block must be one of \[.*'naclip'.*got 'nope'"):
        CLIPConfig(name="tiny-vit", pretrained=None, last_block="nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_attention("tests.unit.test_attention_methods:missing")
    assert get_attention(f"{__name__}:mean_attention") is mean_attention
    with pytest.raises(ValueError, match="already registered"):
        register_attention("naclip")(mean_attention)


# -- a throw-away variant, defined here and nowhere in ovseg ---------------------------------------------------


def mean_attention(tokens: AttentionTokens) -> torch.Tensor:
    """Every token attends uniformly to all tokens: the mean of the values."""
    return tokens.v.mean(dim=2, keepdim=True).expand_as(tokens.v)


register_attention("test_mean")(mean_attention)


def test_a_variant_registered_outside_ovseg_equals_its_formula():
    torch.manual_seed(0)
    model = DenseCLIP(CLIPConfig(name="tiny-vit", pretrained=None, last_block="test_mean", residual="none",
                                 ffn=False)).eval()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens = model.encode_tokens(images)
    # every token averages the same values with no residual: all outputs are identical
    torch.testing.assert_close(tokens, tokens[:, :1].expand_as(tokens), atol=1e-6, rtol=0)


def test_ovseg_test_runs_a_variant_from_a_test_module(synthetic_root, tmp_path):
    from ovseg.cli import main

    out = tmp_path / "res"
    main(["test", "--config", str(REPO / "configs/tiny/clip.yaml"), "--data.root", str(synthetic_root),
          "--data.datasets", "[voc21]", "--model.init_args.clip.last_block", f"{__name__}:mean_attention",
          "--model.init_args.clip.residual", "none", "--model.init_args.clip.ffn", "false",
          "--model.init_args.protocol_overrides",
          "{short_side: 64, long_side_max: 256, mode: whole, templates: single}",
          "--model.init_args.results_dir", str(out), "--trainer.default_root_dir", str(out),
          "--trainer.logger.init_args.save_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"]["clip"]["last_block"] == f"{__name__}:mean_attention"
    voc21 = results["datasets"]["voc21"]
    # whole-image inference and identical tokens everywhere: each image is one class, so at most 3 are predicted
    predicted = np.array(voc21["confusion_matrix"]).sum(axis=0)
    assert voc21["num_images"] == 3 and 1 <= np.count_nonzero(predicted) <= 3
