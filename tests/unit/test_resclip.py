"""ResCLIP (ovseg.methods.resclip) against independent float64 re-computations of its released code's formulas on
small non-square grids: SFR's patch labels and feedback attention (plain loops, exact path arithmetic), and the
whole last stage (RCS maps from the earlier blocks' weights, the first pass, PAMR, SFR, the final attention)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.eval.evaluator import Evaluator
from ovseg.eval.pamr import PAMR
from ovseg.eval.protocols import load_protocol
from ovseg.methods.resclip import DATASET_SETTINGS, DEMO_SETTINGS, ResCLIP, feedback_attention, patch_labels
from ovseg.models.clip import CLIPConfig

GRID = (5, 7)  # rows, cols: non-square
STD = 1.5  # a kernel of 10 -> 11 taps, shorter than a row of 35 patches, so the blur's zero padding shows


def _label_grid() -> torch.Tensor:
    # two regions of label 1 joined only around a corner, a label-2 wall between them, scattered 0s
    grid = torch.tensor([[1, 1, 2, 1, 1, 0, 3],
                         [1, 1, 2, 1, 1, 3, 3],
                         [0, 2, 2, 2, 1, 1, 3],
                         [1, 1, 2, 0, 0, 1, 3],
                         [1, 1, 1, 1, 2, 3, 3]])
    assert tuple(grid.shape) == GRID
    return grid


def _round_half_even(x: Fraction) -> int:
    floor = math.floor(x)
    rest = x - floor
    if rest != Fraction(1, 2):
        return floor + (rest > Fraction(1, 2))
    return floor + (floor % 2)


def _feedback_reference(labels: np.ndarray, std: float, delete_same_entity: bool) -> np.ndarray:
    """generate_attention_sfr + ``/ max`` with loops, exact path coordinates and float64 numbers."""
    rows, cols = labels.shape
    n = rows * cols
    pos = [(i // cols, i % cols) for i in range(n)]
    dist = np.array([[max(abs(a[0] - b[0]), abs(a[1] - b[1])) for b in pos] for a in pos])
    max_steps = dist.max()
    same = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            same[i, j] = 1.0 if (labels[pos[i]] == labels[pos[j]] or i == j) else 0.0
            if delete_same_entity:
                # the reference samples max_steps + 1 points of the whole segment, checks the first steps + 1
                intact = all(labels[_round_half_even(pos[i][0] * (1 - Fraction(k, max_steps))
                                                     + pos[j][0] * Fraction(k, max_steps)),
                                    _round_half_even(pos[i][1] * (1 - Fraction(k, max_steps))
                                                     + pos[j][1] * Fraction(k, max_steps))] == labels[pos[i]]
                             for k in range(dist[i, j] + 1))
                if not intact:
                    same[i, j] *= math.exp(-dist[i, j] / max_steps)
    size = min(n, int(6 * std + 1))
    size += 1 - size % 2
    taps = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * std**2))
    taps /= taps.sum()
    blurred = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            blurred[i, j] = sum(taps[t] * same[i, j + t - size // 2] for t in range(size) if 0 <= j + t - size // 2 < n)
    blurred = np.maximum(blurred, 0)
    blurred /= blurred.sum(axis=1, keepdims=True) + 1e-8
    out = np.zeros((n + 1, n + 1))
    out[1:, 1:] = blurred
    return out / out.max()


@pytest.mark.parametrize("delete_same_entity", [True, False])
def test_feedback_attention_equals_loop_reference(delete_same_entity):
    labels = _label_grid()
    ours = feedback_attention(labels, STD, delete_same_entity)
    expected = _feedback_reference(labels.numpy(), STD, delete_same_entity)
    assert ours.shape == (1 + 35, 1 + 35)
    np.testing.assert_allclose(ours.double().numpy(), expected, atol=2e-7)
    # the class token's row and column stay 0; a broken path decays (the label-1 regions are not one entity)
    assert ours[0].abs().sum() == 0 and ours[:, 0].abs().sum() == 0


def test_patch_labels_take_the_most_frequent_query_after_the_threshold():
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(2, 4, 5 * 4 + 3, 7 * 4 + 2, generator=generator, dtype=torch.float64), 1)
    ours = patch_labels(probs, 4, threshold=0.5)
    top = probs.max(dim=1)
    per_pixel = np.where(top.values.numpy() < 0.5, 0, top.indices.numpy())
    expected = np.zeros((2, 5, 7), np.int64)
    for b in range(2):
        for r in range(5):
            for c in range(7):
                counts = np.bincount(per_pixel[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4].ravel(), minlength=4)
                expected[b, r, c] = int(np.argmax(counts))  # the smallest of tied labels
    assert (ours.numpy() == expected).all()
    assert (expected == 0).mean() > 0.3  # the threshold did act


def _tiny(last_block="naclip", residual="none", ffn=False, **kwargs) -> ResCLIP:
    torch.manual_seed(0)
    clip = CLIPConfig(name="toyworld-vit", pretrained=None, last_block=last_block, residual=residual, ffn=ffn)
    return ResCLIP(clip=clip, rcs_layers=[1, 2], gaussian_std=STD, **kwargs).eval()


def _block_inputs(encoder, images) -> list[torch.Tensor]:
    """Every block's input [B, 1+N, C], captured with hooks while the encoder runs."""
    inputs = []
    handles = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
               for b in encoder.model.visual.transformer.resblocks[:-1]]
    try:
        encoder.encode_dense(images)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _reference_logits(method: ResCLIP, images: torch.Tensor, text: torch.Tensor, settings, baseline: str):
    """float64: ResCLIP's last stage (clip/model.py forward, create_logit_temp, custom_attn) and the cosine logits."""
    encoder = method.encoder
    visual = encoder.model.visual
    blocks = visual.transformer.resblocks
    d = lambda t: t.detach().double()  # noqa: E731
    x_norm = encoder.normalize(images)
    method.encoder.last_stage = None  # the plain blocks, to capture their inputs
    inputs = _block_inputs(encoder, x_norm)
    method.encoder.last_stage = method._last_stage
    # the last block's input: the block before it, run in float64 from its captured input (plain CLIP block)
    last_in = blocks[-2](inputs[-1]).double()
    rows, cols = GRID
    n = rows * cols

    def qkv(block, x):
        y = F.layer_norm(x, (x.shape[-1],), d(block.ln_1.weight), d(block.ln_1.bias), block.ln_1.eps)
        q, k, v = (y @ d(w).T + d(b) for w, b in zip(block.attn.in_proj_weight.chunk(3),
                                                     block.attn.in_proj_bias.chunk(3)))
        split = lambda t: t.reshape(t.shape[0], t.shape[1], block.attn.num_heads, -1).permute(0, 2, 1, 3)  # noqa
        return split(q), split(k), split(v)

    rcs = 0
    for i in (1, 2):
        q, k, _ = qkv(blocks[i], inputs[i].double())
        rcs = rcs + torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) / 2

    omega = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for p in range(n):
        for p2 in range(n):
            dist2 = (p // cols - p2 // cols) ** 2 + (p % cols - p2 % cols) ** 2
            omega[1 + p, 1 + p2] = math.exp(-dist2 / (2 * STD**2))

    def last_block(sfr):
        block = blocks[-1]
        q, k, v = qkv(block, last_in)
        s = 1 / math.sqrt(q.shape[-1])
        scores = {"naclip": [k @ k.transpose(-1, -2) * s], "qq_kk": [q @ q.transpose(-1, -2) * s,
                                                                     k @ k.transpose(-1, -2) * s]}[baseline]
        probs = 0
        for a in scores:
            if sfr is not None:
                tau, lam = settings.sfr_weights
                # custom_attn: the matrix in fp16, lambda * it computed and rounded in fp16
                lam_sfr = (sfr.half()[:, None] * lam).double()
                a = tau * ((1 - lam) * a + lam_sfr)
            if baseline == "naclip":
                a = a + omega
            probs = probs + torch.softmax(a, -1)
        tau, lam = settings.rcs_weights
        probs = tau * ((1 - lam) * probs + lam * rcs)
        out = (probs @ v).permute(0, 2, 1, 3).reshape(last_in.shape) @ d(block.attn.out_proj.weight).T
        out = out + d(block.attn.out_proj.bias)
        if baseline == "qq_kk":  # SCLIP's block: token residual and MLP
            out = last_in + out
            hidden = F.layer_norm(out, (out.shape[-1],), d(block.ln_2.weight), d(block.ln_2.bias), block.ln_2.eps)
            hidden = hidden @ d(block.mlp.c_fc.weight).T + d(block.mlp.c_fc.bias)
            out = out + F.gelu(hidden) @ d(block.mlp.c_proj.weight).T + d(block.mlp.c_proj.bias)
        out = F.layer_norm(out, (out.shape[-1],), d(visual.ln_post.weight), d(visual.ln_post.bias),
                           visual.ln_post.eps)
        features = F.normalize((out @ d(visual.proj))[:, 1:], dim=-1)
        logits = features @ F.normalize(text.double(), dim=-1).T
        return logits.transpose(1, 2).reshape(images.shape[0], -1, rows, cols)

    first = F.interpolate(last_block(None), size=images.shape[-2:], mode="bilinear", align_corners=False)
    first = torch.cat([PAMR(x[None].double(), 10, (8, 16))(f[None]) for x, f in zip(x_norm, first)])
    labels = patch_labels(torch.softmax(40 * first, dim=1), encoder.patch_size, settings.temp_thd)
    sfr = torch.stack([torch.from_numpy(_feedback_reference(grid.numpy(), STD, settings.delete_same_entity))
                       for grid in labels])
    return last_block(sfr)


@pytest.mark.parametrize("baseline", ["naclip", "qq_kk"])
def test_resclip_logits_equal_float64_reference(baseline):
    extra = {"residual": "token", "ffn": True} if baseline == "qq_kk" else {}
    method = _tiny(baseline, **extra)
    # the toy CLIP's GELU, exact: the float64 reference uses F.gelu
    assert isinstance(method.encoder.model.visual.transformer.resblocks[-1].mlp.gelu, torch.nn.GELU)
    text = method.encode_text(["red square", "blue circle", "green grass", "sky"], ["a photo of a {}."])
    images = torch.rand(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(1))
    with method.scoring("voc20"):
        ours = method.dense_logits(images, text)
        expected = _reference_logits(method, images, text, DATASET_SETTINGS["voc20"], baseline)
    assert ours.shape == (2, 4, *GRID)
    torch.testing.assert_close(ours.double(), expected, atol=2e-5, rtol=0)
    # RCS and SFR each move the logits (a reference ignoring either would differ)
    for off in ({"rcs": False}, {"sfr": False}):
        ablated = _tiny(baseline, **extra, **off)
        with ablated.scoring("voc20"):
            assert (ablated.dense_logits(images, text) - ours).abs().max() > 1e-3


def test_evaluator_scores_each_dataset_with_its_released_settings():
    """The evaluator names the dataset it scores; ResCLIP then uses that dataset's released settings (and the
    user's changes), any other dataset the demo's."""
    method = _tiny(dataset_settings={"voc21": {"temp_thd": 0.9}, "mine": {"sfr_weights": [1.0, 0.5]}})
    assert method.settings["voc21"].temp_thd == 0.9 and method.settings["voc21"].sfr_weights == (2.2, 0.7)
    assert method.settings["mine"].sfr_weights == (1.0, 0.5) and method.settings["mine"].temp_thd == 0.10
    seen = []
    dense_logits = method.dense_logits

    def record(images, text):
        seen.append(method.current)
        return dense_logits(images, text)

    method.dense_logits = record
    overrides = {"short_side": 40, "long_side_max": 80, "mode": "whole", "templates": "single",
                 "class_names": "{dataset}", "prob_threshold": None}
    evaluator = Evaluator(load_protocol("naclip"), overrides)
    image = torch.rand(3, 40, 56)
    for name in ("voc20", "voc21", "toy"):
        entry = evaluator.add_dataset(method, name, [["a"], ["b"]], None, torch.device("cpu"))
        evaluator.predict(method, entry, image, (40, 56))
    assert seen == [DATASET_SETTINGS["voc20"], method.settings["voc21"], DEMO_SETTINGS]
    assert method.current == DEMO_SETTINGS  # restored after each dataset


def test_bad_settings_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match=r"rcs_layers \[5, 6, 7, 8\] must be blocks between .* \(1 … 2\)"):
        ResCLIP(clip=CLIPConfig(name="toyworld-vit", pretrained=None, last_block="naclip", residual="none",
                                ffn=False))
    with pytest.raises(ValueError, match=r"ResCLIP runs on the baselines .* got 'value'"):
        ResCLIP(clip=CLIPConfig(name="toyworld-vit", pretrained=None, last_block="value"), rcs_layers=[1])
    with pytest.raises(ValueError, match=r"rcs_weights must be \(tau, lambda\)"):
        _tiny(dataset_settings={"voc21": {"rcs_weights": [2.0]}})


@pytest.mark.parametrize("baseline", ["naclip", "qq_kk", "qq", "vanilla"])
def test_resclip_attention_equals_float64_formula_of_each_baseline(baseline):
    """custom_attn of each attn_strategy, float64 tokens: the SFR mix on the logits (the matrix and λ_s times it in
    fp16), NACLIP's bias after the mix, softmaxes summed, the RCS mix on the probabilities."""
    from types import SimpleNamespace

    from ovseg.methods.resclip import resclip_attention
    from ovseg.models.attention import AttentionTokens

    g = torch.Generator().manual_seed(3)
    rows, cols, heads, width = 2, 3, 2, 8
    n = 1 + rows * cols
    w = {name: torch.randn(width, width, generator=g, dtype=torch.float64) for name in "qkv"}
    b = {name: torch.randn(width, generator=g, dtype=torch.float64) for name in "qkv"}
    block = SimpleNamespace(q_weight=w["q"], q_bias=b["q"], k_weight=w["k"], k_bias=b["k"], v_weight=w["v"],
                            v_bias=b["v"], num_heads=heads)
    normed = torch.randn(2, n, width, generator=g, dtype=torch.float64)
    rcs = torch.softmax(torch.randn(2, heads, n, n, generator=g, dtype=torch.float64), -1)
    sfr = torch.rand(2, n, n, generator=g, dtype=torch.float64)
    sfr = sfr / sfr.amax(dim=(1, 2), keepdim=True)
    ours = resclip_attention(AttentionTokens(normed, block, (rows, cols)), baseline, rcs, (2.0, 0.3), sfr, (2.2, 0.7),
                             std=1.3)

    split = lambda t: t.reshape(2, n, heads, -1).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = (split(normed @ w[x].T + b[x]) for x in "qkv")
    omega = torch.zeros(n, n, dtype=torch.float64)
    for p in range(n - 1):
        for p2 in range(n - 1):
            dist2 = (p // cols - p2 // cols) ** 2 + (p % cols - p2 % cols) ** 2
            omega[1 + p, 1 + p2] = math.exp(-dist2 / (2 * 1.3**2))
    lam_sfr = (sfr.half() * 0.7).double()[:, None]  # the fp16 matrix times λ_s, rounded to fp16
    pairs = {"naclip": [(k, k)], "qq_kk": [(q, q), (k, k)], "qq": [(q, q)], "vanilla": [(q, k)]}[baseline]
    probs = 0
    for a, c in pairs:
        logits = 2.2 * (0.3 * (a @ c.transpose(-1, -2)) / 2 + lam_sfr)
        probs = probs + torch.softmax(logits + (omega if baseline == "naclip" else 0), -1)
    expected = 2.0 * (0.7 * probs + 0.3 * rcs) @ v
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)


def test_corner_padding_is_refused_naming_the_setting():
    from ovseg.models.clip import DenseOptions

    method = _tiny()
    text = method.encode_text(["a", "b"], ["a photo of a {}."])
    with method.encoder.using(DenseOptions(patch_padding="corner")):
        with pytest.raises(ValueError, match=r"padding \('corner'\) gives a \(6, 8\) grid .* patch_padding: none"):
            method.dense_logits(torch.rand(1, 3, 44, 60), text)
