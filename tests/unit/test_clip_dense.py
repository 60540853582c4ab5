"""DenseCLIP against independent references: open_clip's own forward, timm's trunk, transformers' CLIPModel and
last-block variants re-computed with plain torch ops from the blocks' weights. Tiny random models only."""

import hashlib
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

import ovseg.models.clip as clip_module
from ovseg.models.clip import CLIPConfig, DenseCLIP, resize_positional_embedding

ATOL = 1e-5


def _tiny(name: str, **overrides) -> DenseCLIP:
    torch.manual_seed(0)
    return DenseCLIP(CLIPConfig(name=name, pretrained=None, **overrides)).eval()


@pytest.fixture(scope="module")
def tiny_vit() -> DenseCLIP:
    return _tiny("tiny-vit")


@pytest.fixture(scope="module")
def tiny_convnext() -> DenseCLIP:
    return _tiny("tiny-convnext")


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---- plain-torch reference of the last block -----------------------------------------------------------------


def _open_clip_block_weights(block) -> dict:
    assert isinstance(block.mlp.gelu, torch.nn.GELU) and block.mlp.gelu.approximate == "none"
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    c = w.shape[1]
    return dict(
        ln_1=(block.ln_1.weight, block.ln_1.bias, block.ln_1.eps),
        q=(w[:c], b[:c]), k=(w[c:2 * c], b[c:2 * c]), v=(w[2 * c:], b[2 * c:]),
        out=(block.attn.out_proj.weight, block.attn.out_proj.bias), heads=block.attn.num_heads,
        ln_2=(block.ln_2.weight, block.ln_2.bias, block.ln_2.eps),
        fc1=(block.mlp.c_fc.weight, block.mlp.c_fc.bias), fc2=(block.mlp.c_proj.weight, block.mlp.c_proj.bias),
        act=lambda t: 0.5 * t * (1 + torch.erf(t / 2 ** 0.5)),
    )


def _hf_layer_weights(layer) -> dict:
    attn, mlp = layer.self_attn, layer.mlp
    lin = lambda m: (m.weight, m.bias)  # noqa: E731
    return dict(
        ln_1=(layer.layer_norm1.weight, layer.layer_norm1.bias, layer.layer_norm1.eps),
        q=lin(attn.q_proj), k=lin(attn.k_proj), v=lin(attn.v_proj), out=lin(attn.out_proj), heads=attn.num_heads,
        ln_2=(layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps),
        fc1=lin(mlp.fc1), fc2=lin(mlp.fc2),
        act=lambda t: t * torch.sigmoid(1.702 * t),  # quick_gelu, the HF CLIP default
    )


def _reference_last_block(x, wts, last_block, residual, ffn):
    def layer_norm(t, p):
        weight, bias, eps = p
        mu = t.mean(-1, keepdim=True)
        var = t.var(-1, keepdim=True, unbiased=False)
        return (t - mu) / torch.sqrt(var + eps) * weight + bias

    def linear(t, p):
        return t @ p[0].T + p[1]

    def heads(t):  # [B, L, C] -> [B, H, L, C/H]
        b, length, c = t.shape
        return t.reshape(b, length, wts["heads"], c // wts["heads"]).permute(0, 2, 1, 3)

    y = layer_norm(x, wts["ln_1"])
    q, k, v = linear(y, wts["q"]), linear(y, wts["k"]), linear(y, wts["v"])
    if last_block == "value":
        mixed = v
    else:
        qh, kh, vh = heads(q), heads(k), heads(v)
        scale = qh.shape[-1] ** -0.5
        if last_block == "vanilla":
            attn = torch.softmax(qh @ kh.transpose(-1, -2) * scale, -1)
        else:  # qq_kk
            attn = torch.softmax(qh @ qh.transpose(-1, -2) * scale, -1) + torch.softmax(
                kh @ kh.transpose(-1, -2) * scale, -1)
        mixed = (attn @ vh).permute(0, 2, 1, 3).reshape(x.shape)
    out = linear(mixed, wts["out"])
    out = {"token": x + out, "cls": x[:, :1] + out, "none": out}[residual]
    if ffn:
        out = out + linear(wts["act"](linear(layer_norm(out, wts["ln_2"]), wts["fc1"])), wts["fc2"])
    return out


VARIANTS = [(lb, res, ffn) for lb in ("vanilla", "value", "qq_kk") for res in ("token", "cls", "none")
            for ffn in (True, False)]


# ---- ViT (open_clip) -----------------------------------------------------------------------------------------


def test_vanilla_dense_equals_open_clip_forward_at_trained_resolution(tiny_vit, images):
    visual = tiny_vit.model.visual
    with torch.no_grad():
        tokens = tiny_vit.encode_tokens(images)
        dense = tiny_vit.encode_dense(images)
        pooled = tiny_vit.model.encode_image(images)
        # open_clip's own path to the patch tokens after ln_post (NCHW), not projected
        ref = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, intermediates_only=True)
    ref_dense = torch.einsum("bchw,cd->bdhw", ref["image_intermediates"][-1], visual.proj)
    assert dense.shape == (2, tiny_vit.embed_dim, 4, 4)
    torch.testing.assert_close(tokens[:, 0], pooled, atol=ATOL, rtol=0)
    torch.testing.assert_close(dense, ref_dense, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit.encode_image(images), pooled, atol=0, rtol=0)


@pytest.mark.parametrize("last_block,residual,ffn", VARIANTS)
def test_last_block_variants_equal_plain_torch_reference(tiny_vit, images, last_block, residual, ffn):
    visual = tiny_vit.model.visual
    blocks = visual.transformer.resblocks
    tiny_vit.config.last_block, tiny_vit.config.residual, tiny_vit.config.ffn = last_block, residual, ffn
    try:
        with torch.no_grad():
            dense_tokens = tiny_vit.encode_tokens(images)
            # input of the last block, from open_clip's own intermediates (prefix = class token)
            inter = visual.forward_intermediates(images, indices=[len(blocks) - 2], intermediates_only=True,
                                                 output_fmt="NLC", output_extra_tokens=True)
            x = torch.cat([inter["image_intermediates_prefix"][0], inter["image_intermediates"][0]], dim=1)
            out = _reference_last_block(x, _open_clip_block_weights(blocks[-1]), last_block, residual, ffn)
            ref = F.layer_norm(out, (out.shape[-1],), visual.ln_post.weight, visual.ln_post.bias) @ visual.proj
    finally:
        tiny_vit.config.last_block, tiny_vit.config.residual, tiny_vit.config.ffn = "vanilla", "token", True
    torch.testing.assert_close(dense_tokens, ref, atol=ATOL, rtol=0)


def test_value_block_trains_only_the_value_slice_and_pos_embed():
    model = _tiny("tiny-vit", last_block="value", residual="cls")
    model.train()
    model.encode_dense(torch.randn(1, 3, 48, 80)).square().mean().backward()
    in_proj_grad = model.model.visual.transformer.resblocks[-1].attn.in_proj_weight.grad
    width = in_proj_grad.shape[1]
    assert in_proj_grad[: 2 * width].abs().max() == 0  # q and k of the last block are unused
    assert in_proj_grad[2 * width:].abs().max() > 0
    assert model.model.visual.positional_embedding.grad.abs().max() > 0  # through the bicubic resize


def test_positional_embedding_resize_identity_and_matches_timm():
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1 + 4 * 4, 8)
    assert resize_positional_embedding(pos, (4, 4), (4, 4)) is pos
    resized = resize_positional_embedding(pos, (4, 4), (3, 6))
    assert resized.shape == (1 + 3 * 6, 8)
    torch.testing.assert_close(resized[0], pos[0], atol=0, rtol=0)  # class position untouched
    ref = resample_abs_pos_embed(pos[None], new_size=[3, 6], old_size=[4, 4], num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=False)[0]
    torch.testing.assert_close(resized, ref, atol=1e-6, rtol=0)


def test_non_square_input_gives_right_grid(tiny_vit):
    with torch.no_grad():
        assert tiny_vit.encode_dense(torch.randn(1, 3, 48, 96)).shape == (1, tiny_vit.embed_dim, 3, 6)
        # sizes that are not multiples of the patch are floored, like the patch convolution
        assert tiny_vit.encode_dense(torch.randn(1, 3, 50, 100)).shape == (1, tiny_vit.embed_dim, 3, 6)


def test_resized_positional_embedding_cache_follows_parameter_updates():
    model = _tiny("tiny-vit")
    x = torch.randn(1, 3, 48, 96)
    pos = model.model.visual.positional_embedding
    with torch.no_grad():
        first = model.encode_dense(x)
        assert len(model._pos_cache) == 1
        model.encode_dense(x)
        assert len(model._pos_cache) == 1  # hit
        pos.add_(0.5)  # an in-place update (optimizer step / EMA) must not reuse the stale resize
        updated = model.encode_dense(x)
    assert len(model._pos_cache) == 2
    assert not torch.allclose(first, updated)


def test_text_encoding_matches_open_clip_and_chunks(tiny_vit, monkeypatch):
    texts = [f"a photo of a thing number {i}." for i in range(5)]
    with torch.no_grad():
        ref = tiny_vit.model.encode_text(open_clip.tokenize(texts))
        monkeypatch.setattr(clip_module, "TEXT_BATCH", 2)
        out = tiny_vit.encode_text(texts)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_normalize_uses_model_preprocess_stats(tiny_vit):
    cfg = open_clip.get_model_preprocess_cfg(tiny_vit.model)
    x = torch.rand(1, 3, 4, 4)
    ref = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(tiny_vit.normalize(x), ref)
    assert tiny_vit.patch_size == 16 and tiny_vit.input_size == 64 and tiny_vit.embed_dim == 64


def test_config_validation():
    with pytest.raises(ValueError, match="last_block"):
        CLIPConfig(last_block="qk")
    with pytest.raises(ValueError, match="residual"):
        CLIPConfig(residual="both")


def _register_tiny_variant(tmp_path, name, **vision_overrides):
    cfg = json.loads((clip_module.CONFIG_DIR / "tiny-vit.json").read_text())
    cfg["vision_cfg"].update(vision_overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)


@pytest.mark.parametrize("override,match", [
    ({"final_ln_after_pool": True}, "final_ln_after_pool"),
    ({"qk_norm": True}, "ResidualAttentionBlock"),
    ({"pool_type": "none"}, "pool_type"),
])
def test_unsupported_vit_options_raise(tmp_path, override, match):
    name = "ovseg-test-" + next(iter(override))
    _register_tiny_variant(tmp_path, name, **override)
    with pytest.raises(NotImplementedError, match=match):
        DenseCLIP(CLIPConfig(name=name, pretrained=None))


# ---- ConvNeXt (open_clip TimmModel) --------------------------------------------------------------------------


def test_convnext_dense_head_per_pixel(tiny_convnext, images):
    """open_clip's pooled path is proj(norm(avgpool(f))); the dense path is proj(norm(f)) at every pixel.

    So: on a 1×1 map the two are identical; in general the mean of the dense map is proj(mean(norm(f))) (proj is
    linear without bias), which is *not* encode_image because the norm does not commute with the mean.
    """
    visual = tiny_convnext.model.visual
    trunk, head_norm, proj = visual.trunk, visual.trunk.head.norm, visual.head.proj
    assert proj.bias is None
    with torch.no_grad():
        dense = tiny_convnext.encode_dense(images)
        pooled = tiny_convnext.encode_image(images)
        features = trunk.forward_features(images)
        normed = F.layer_norm(features.permute(0, 2, 3, 1), (features.shape[1],), head_norm.weight, head_norm.bias,
                              head_norm.eps)
        one_by_one = torch.randn(2, 3, 32, 32)
        dense_1x1, pooled_1x1 = tiny_convnext.encode_dense(one_by_one), tiny_convnext.encode_image(one_by_one)

    assert dense.shape == (2, tiny_convnext.embed_dim, 2, 2)
    torch.testing.assert_close(dense, (normed @ proj.weight.T).permute(0, 3, 1, 2), atol=ATOL, rtol=0)
    torch.testing.assert_close(dense.mean((2, 3)), normed.mean((1, 2)) @ proj.weight.T, atol=ATOL, rtol=0)
    normed_mean = F.layer_norm(features.mean((2, 3)), (features.shape[1],), head_norm.weight, head_norm.bias,
                               head_norm.eps)
    torch.testing.assert_close(pooled, normed_mean @ proj.weight.T, atol=ATOL, rtol=0)
    assert not torch.allclose(dense.mean((2, 3)), pooled, atol=1e-3)
    torch.testing.assert_close(dense_1x1.flatten(1), pooled_1x1, atol=ATOL, rtol=0)


def test_convnext_attributes_and_shapes(tiny_convnext):
    assert tiny_convnext.kind == "timm" and tiny_convnext.patch_size == 32 and tiny_convnext.input_size == 64
    with torch.no_grad():
        assert tiny_convnext.encode_dense(torch.randn(1, 3, 96, 160)).shape == (1, 64, 3, 5)
    with pytest.raises(NotImplementedError):
        tiny_convnext.encode_tokens(torch.randn(1, 3, 64, 64))


# ---- weights ---------------------------------------------------------------------------------------------------


def test_missing_weights_file_raises_before_open_clip(monkeypatch, tmp_path):
    def no_create(*args, **kwargs):
        raise AssertionError("open_clip.create_model must not be called for a missing file")

    monkeypatch.setattr(open_clip, "create_model", no_create)
    missing = tmp_path / "nope" / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DenseCLIP(CLIPConfig(name="tiny-vit", pretrained=str(missing)))
    with pytest.raises(IsADirectoryError, match="local-dir:"):
        DenseCLIP(CLIPConfig(name="tiny-vit", pretrained=str(tmp_path)))


def test_unknown_tag_lists_known_tags(monkeypatch):
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("must not create"))
    with pytest.raises(ValueError, match="laion2b_s34b_b88k") as err:
        DenseCLIP(CLIPConfig(name="ViT-B-16", pretrained="no_such_tag"))
    assert "openai" in str(err.value)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        DenseCLIP(CLIPConfig(name="ViT-B-17", pretrained=None))


def test_openai_tag_forces_quick_gelu(monkeypatch):
    calls = []
    real_create = open_clip.create_model

    def fake_create(name, pretrained=None, **kwargs):  # no download: record the call, build a tiny model
        calls.append((name, pretrained, kwargs))
        return real_create("tiny-vit", pretrained=None)

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    model = DenseCLIP(CLIPConfig(name="ViT-B-16", pretrained="openai"))
    assert calls[0][:2] == ("ViT-B-16", "openai") and calls[0][2]["force_quick_gelu"] is True
    assert model.weights_id == "ViT-B-16/openai"


def test_weights_file_and_local_dir_round_trip(tmp_path, tiny_vit, images):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_vit.model.state_dict(), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    torch.manual_seed(123)  # a different random init, so equality below means the file was loaded
    from_file = DenseCLIP(CLIPConfig(name="tiny-vit", pretrained=str(path))).eval()
    assert from_file.weights_id == f"tiny-vit/file:{path}#sha256:{sha}"
    assert tiny_vit.weights_id == "tiny-vit/random"

    folder = tmp_path / "local"
    folder.mkdir()
    torch.save(tiny_vit.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    model_cfg = json.loads((clip_module.CONFIG_DIR / "tiny-vit.json").read_text())
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    from_dir = DenseCLIP(CLIPConfig(name=f"local-dir:{folder}")).eval()
    assert from_dir.weights_id.startswith(f"local-dir:{folder}#sha256:")
    torch.testing.assert_close(from_dir.mean.flatten(), torch.tensor([0.5] * 3))

    with torch.no_grad():
        ref = tiny_vit.encode_dense(images)
        torch.testing.assert_close(from_file.encode_dense(images), ref, atol=0, rtol=0)
        torch.testing.assert_close(from_dir.encode_dense(images), ref, atol=0, rtol=0)

    with pytest.raises(FileNotFoundError, match="missing-folder"):
        DenseCLIP(CLIPConfig(name=f"local-dir:{tmp_path / 'missing-folder'}"))


# ---- transformers CLIPModel ('hf:') ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=77),
        vision_config=dict(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64),
        projection_dim=24,
    )
    folder = tmp_path_factory.mktemp("hf_clip")
    transformers.CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_dense(hf_folder):
    return DenseCLIP(CLIPConfig(name=f"hf:{hf_folder}", pretrained=None)).eval()


def _features(out):  # transformers 5 returns an output object, 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_hf_vanilla_cls_equals_image_features(hf_dense, images):
    hf = hf_dense.model
    assert hf_dense.kind == "hf_vit" and hf_dense.patch_size == 16 and hf_dense.embed_dim == 24
    assert hf_dense.weights_id.startswith("hf:") and "#sha256:" in hf_dense.weights_id
    non_square = torch.randn(1, 3, 80, 48)
    with torch.no_grad():
        torch.testing.assert_close(hf_dense.encode_tokens(images)[:, 0],
                                   _features(hf.get_image_features(pixel_values=images)), atol=ATOL, rtol=0)
        assert hf_dense.encode_dense(non_square).shape == (1, 24, 5, 3)
        # transformers' own bicubic position interpolation, on a non-square grid, agrees with ours
        ref = _features(hf.get_image_features(pixel_values=non_square, interpolate_pos_encoding=True))
        torch.testing.assert_close(hf_dense.encode_tokens(non_square)[:, 0], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("last_block,residual,ffn", [("value", "cls", True), ("qq_kk", "none", False)])
def test_hf_last_block_variants_equal_reference(hf_dense, images, last_block, residual, ffn):
    vision = hf_dense.model.vision_model
    hf_dense.config.last_block, hf_dense.config.residual, hf_dense.config.ffn = last_block, residual, ffn
    try:
        with torch.no_grad():
            tokens = hf_dense.encode_tokens(images)
            hidden = vision(pixel_values=images, output_hidden_states=True).hidden_states[-2]
            out = _reference_last_block(hidden, _hf_layer_weights(vision.encoder.layers[-1]), last_block, residual,
                                        ffn)
            ref = hf_dense.model.visual_projection(vision.post_layernorm(out))
    finally:
        hf_dense.config.last_block, hf_dense.config.residual, hf_dense.config.ffn = "vanilla", "token", True
    torch.testing.assert_close(tokens, ref, atol=ATOL, rtol=0)


def _write_openai_bpe_files(folder):
    """vocab.json + merges.txt of OpenAI's BPE, written from open_clip's shipped copy (same ids)."""
    import gzip

    from open_clip.tokenizer import default_bpe

    simple = open_clip.SimpleTokenizer()
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_hf_text_tokenizers(hf_folder, hf_dense, tmp_path):
    texts = ["a photo of a cat.", "there is the traffic light in the scene."]
    with torch.no_grad():
        # no tokenizer files, 49408-token vocabulary: open_clip's SimpleTokenizer (OpenAI's BPE)
        fallback = hf_dense.encode_text(texts)
        ref = _features(hf_dense.model.get_text_features(input_ids=open_clip.tokenize(texts)))
        torch.testing.assert_close(fallback, ref, atol=ATOL, rtol=0)

        # with vocab.json + merges.txt the folder's own tokenizer is used and gives the same ids
        import shutil

        with_files = tmp_path / "with_tokenizer"
        shutil.copytree(hf_folder, with_files)
        _write_openai_bpe_files(with_files)
        (with_files / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                          "image_std": [0.25] * 3}))
        own = DenseCLIP(CLIPConfig(name=f"hf:{with_files}")).eval()
        torch.testing.assert_close(own.std.flatten(), torch.tensor([0.25] * 3))
        torch.testing.assert_close(own.encode_text(texts), fallback, atol=ATOL, rtol=0)
        assert not isinstance(own._tokenizer, open_clip.SimpleTokenizer)

        # a transformers-5 style folder (tokenizer.json only) works the same
        json_only = tmp_path / "tokenizer_json_only"
        shutil.copytree(hf_folder, json_only)
        own._tokenizer.tokenizer.save_pretrained(json_only)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (json_only / name).unlink(missing_ok=True)
        assert (json_only / "tokenizer.json").is_file()
        from_json = DenseCLIP(CLIPConfig(name=f"hf:{json_only}")).eval()
        torch.testing.assert_close(from_json.encode_text(texts), fallback, atol=ATOL, rtol=0)


def test_hf_unknown_vocabulary_without_tokenizer_files_raises(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32),
        projection_dim=8,
    )
    transformers.CLIPModel(config).save_pretrained(tmp_path)
    model = DenseCLIP(CLIPConfig(name=f"hf:{tmp_path}"))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        model.encode_text(["a cat"])


def test_hf_missing_folder_raises(tmp_path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DenseCLIP(CLIPConfig(name=f"hf:{missing}"))
