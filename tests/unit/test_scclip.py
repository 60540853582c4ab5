"""SC-CLIP (ovseg.methods.scclip): the self-calibrated last stage against an independent float64 numpy re-computation of
the released forward on a non-square token grid, and each of its pieces (local outlier factor, anomaly resolution,
per-image centring) against a hand-built fixture or a property that must hold."""

import json

import numpy as np
import open_clip
import pytest
import torch

from ovseg.methods import SCCLIP
from ovseg.methods.scclip import SelfCalibration, anomaly_tokens, lof_scores, resolve_anomalies
from ovseg.models.clip import CLIPConfig

#: a 6-block ViT with 8-pixel patches: a 56x88 image is a 7x11 grid of 77 tokens (more than 30 neighbours + 1)
TEST_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 32, "head_width": 16,
                                            "layers": 6},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
#: block indices for 6 blocks (hidden outputs 0..4), each role a different block
CALIBRATION = SelfCalibration(pre_adjust_idx=3, post_adjust_idx=1, multi_start_idx=1, multi_end_idx=4)
GRID = (7, 11)


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scclip_config")
    (folder / "scclip-test-vit.json").write_text(json.dumps(TEST_VIT))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    return SCCLIP(clip=CLIPConfig(name="scclip-test-vit", pretrained=None), calibration=CALIBRATION).eval()


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(seed))


def _block_outputs(encoder, images) -> tuple[torch.Tensor, list[np.ndarray]]:
    """ovseg's tokens and the outputs of every block before the last (CLIP's blocks as trained), captured by hooks."""
    captured = []
    blocks = encoder.model.visual.transformer.resblocks
    handles = [b.register_forward_hook(lambda m, a, out: captured.append(out)) for b in blocks[:-1]]
    try:
        with torch.no_grad():
            tokens = encoder.encode_tokens(images)
    finally:
        for h in handles:
            h.remove()
    return tokens, [h.double().numpy() for h in captured]


def _layer_norm(x, module):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + module.eps) * _np(module.weight) + _np(module.bias)


def _np(t):
    return t.detach().double().numpy()


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _lof64(tokens, n_neighbors=30):
    """LOF as the released lof_pytorch defines it, token by token: the mean over the n nearest other tokens j of
    k-dist(i) / k-dist(j) (its reachability distance is the token's own k-distance)."""
    distances = ((tokens[:, None] - tokens[None]) ** 2).sum(-1)
    neighbours, k_distance = [], []
    for i in range(len(tokens)):
        order = [j for j in np.argsort(distances[i], kind="stable") if j != i][:n_neighbors]
        neighbours.append(order)
        k_distance.append(distances[i, order[-1]])
    k_distance = np.array(k_distance)
    return np.array([np.mean(k_distance[i] / k_distance[n]) for i, n in enumerate(neighbours)])


def _resolve64(patches, anomalous, grid):
    rows, cols = grid
    out = patches.copy()
    for i in np.flatnonzero(anomalous):
        r, c = divmod(i, cols)  # row-major
        near = [rr * cols + cc for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                if (rr, cc) != (r, c) and 0 <= rr < rows and 0 <= cc < cols and not anomalous[rr * cols + cc]]
        if near:
            out[i] = patches[near].mean(0)
    return out


def _scclip64(method, hidden, b, cal=CALIBRATION):
    """The released VisionTransformer.forward after its block loop, for image ``b``, in float64 numpy."""
    visual = method.encoder.model.visual
    last = visual.transformer.resblocks[-1]
    h = [x[b] for x in hidden]  # [1+N, C] per block
    heads = last.attn.num_heads
    w_q, w_k, w_v = (_np(w) for w in last.attn.in_proj_weight.chunk(3))
    b_q, b_k, b_v = (_np(w) for w in last.attn.in_proj_bias.chunk(3))

    def cosine(x):
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        return x @ x.T

    def aggregate(x, s):
        s = np.where(s < cal.beta, 0.0, s)
        return (s / (s.sum(-1, keepdims=True) + 1e-6)) @ x

    def attend(x, cls, s):
        y = _layer_norm(x, last.ln_1)
        k, v = y @ w_k.T + b_k, y @ w_v.T + b_v
        centred = (s - s.mean()) * 3.0
        guide = _softmax(np.where(centred < 0, -np.inf, centred))
        out = []
        for head in np.split(np.arange(k.shape[1]), heads):
            kh, vh = k[:, head], v[:, head]
            weights = (guide + _softmax(kh @ kh.T * len(head) ** -0.5)) / 2
            out.append(weights @ vh)
        return np.concatenate(out, -1) @ _np(last.attn.out_proj.weight).T + _np(last.attn.out_proj.bias) \
            + cal.res_cls * cls

    penultimate = h[-1]
    lof = _lof64(penultimate[1:])
    anomalous = lof > np.quantile(lof, 1 - cal.contamination)
    deep = cosine(_resolve64(h[cal.pre_adjust_idx][1:], anomalous, GRID))
    shallow = cosine(h[cal.post_adjust_idx][1:])
    x = aggregate(_resolve64(penultimate[1:], anomalous, GRID), deep)
    x = aggregate(attend(x, penultimate[:1], deep), shallow)
    fused = sum(h[cal.multi_start_idx:cal.multi_end_idx])
    x = x + aggregate(attend(fused[1:], fused[:1], deep), shallow)
    return _layer_norm(x, visual.ln_post) @ _np(visual.proj), anomalous


def test_scclip_patch_tokens_equal_float64_recomputation_on_a_non_square_grid(method):
    images = _images(2, seed=1)
    tokens, hidden = _block_outputs(method.encoder, images)
    assert tokens.shape == (2, 1 + 77, 32)
    for b in range(2):
        expected, anomalous = _scclip64(method, hidden, b)
        assert 1 <= anomalous.sum() <= 5  # the top 5 % of 77 tokens
        np.testing.assert_allclose(tokens[b, 1:].double().numpy(), expected, atol=2e-5, rtol=1e-4)


def test_class_slot_is_the_penultimate_class_token_through_ln_post_and_proj(method):
    tokens, hidden = _block_outputs(method.encoder, _images(1, seed=2))
    visual = method.encoder.model.visual
    expected = _layer_norm(hidden[-1][0, :1], visual.ln_post) @ _np(visual.proj)
    np.testing.assert_allclose(tokens[0, :1].double().numpy(), expected, atol=2e-5, rtol=1e-4)


def test_each_image_is_calibrated_alone_in_a_batch(method):
    """The reference centres the intermediate similarity on the batch's mean (one image there); ovseg on each
    image's own, so windows batched by the evaluator give what each gives alone."""
    images = torch.cat([_images(1, seed=3), 3 * _images(1, seed=4)])
    with torch.no_grad():
        together = method.encoder.encode_tokens(images)
        alone = torch.cat([method.encoder.encode_tokens(images[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)


def test_lof_equals_its_closed_form_and_flags_planted_outliers():
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, 60, 8, generator=generator, dtype=torch.float64)
    tokens[1, [7, 42]] += 25.0  # two tokens far from every other
    scores = lof_scores(tokens, n_neighbors=10)
    for b in range(2):
        np.testing.assert_allclose(scores[b].numpy(), _lof64(tokens[b].numpy(), 10), rtol=1e-10)
    flagged = anomaly_tokens(tokens, n_neighbors=10, contamination=0.05)
    assert flagged.sum(dim=1).tolist() == [3, 3]  # the tokens above the linear 95 % quantile of 60 scores
    assert flagged[1, 7] and flagged[1, 42]
    # fewer tokens than neighbours + 1: every other token is a neighbour
    np.testing.assert_allclose(lof_scores(tokens[:, :5], 30)[0].numpy(), _lof64(tokens[0, :5].numpy(), 4))


def test_anomalies_take_the_mean_of_their_normal_neighbours_row_major():
    rows, cols = 3, 4
    patches = torch.arange(rows * cols * 2, dtype=torch.float64).reshape(1, rows * cols, 2) ** 1.5
    anomalous = torch.zeros(1, rows * cols, dtype=torch.bool)
    anomalous[0, [0, 1, 7]] = True  # (0,0), (0,1), (1,3)
    out = resolve_anomalies(patches, anomalous, (rows, cols))[0]
    p = patches[0]
    # (0,0): neighbours (0,1) anomalous, (1,0), (1,1) -> ids 4, 5
    torch.testing.assert_close(out[0], p[[4, 5]].mean(0))
    # (0,1): neighbours (0,0) anomalous, (0,2), (1,0), (1,1), (1,2) -> ids 2, 4, 5, 6
    torch.testing.assert_close(out[1], p[[2, 4, 5, 6]].mean(0))
    # (1,3): neighbours (0,2), (0,3), (1,2), (2,2), (2,3) -> ids 2, 3, 6, 10, 11
    torch.testing.assert_close(out[7], p[[2, 3, 6, 10, 11]].mean(0))
    keep = ~anomalous[0]
    torch.testing.assert_close(out[keep], p[keep])
    # a token whose neighbours are all anomalous is kept as it is
    all_anomalous = torch.ones(1, 4, dtype=torch.bool)
    torch.testing.assert_close(resolve_anomalies(patches[:, :4], all_anomalous, (2, 2)), patches[:, :4])


def test_block_indices_must_fit_the_vit(tmp_path):
    with pytest.raises(ValueError, match=r"pre_adjust_idx=8.*this ViT has 2 blocks"):
        SCCLIP(clip=CLIPConfig(name="tiny-vit", pretrained=None))
    with pytest.raises(ValueError, match="multi_start_idx < multi_end_idx"):
        SelfCalibration(multi_start_idx=4, multi_end_idx=4)
