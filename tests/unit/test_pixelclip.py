"""PixelCLIP: Sinkhorn (1 vs 2 processes, balance), gradients, EMA teacher, loss support, prompts, optimiser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ovseg.methods.pixelclip import PixelCLIP, cluster_targets, distributed_sinkhorn
from ovseg.methods.pixelclip.prompts import LearnablePrompts
from ovseg.models.clip import CLIPConfig

TINY = CLIPConfig(name="tiny-vit", pretrained=None, last_block="value", residual="cls", ffn=True)


def sinkhorn_reference(logits: np.ndarray, iterations: int) -> np.ndarray:
    """SwAV/PixelCLIP Sinkhorn in float64 numpy, written from the paper's description."""
    q = np.exp(logits - logits.max(axis=1, keepdims=True))
    q = (q / q.sum(axis=1, keepdims=True)).T  # [K, B]
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


def make_model(**kwargs) -> PixelCLIP:
    torch.manual_seed(0)
    defaults = dict(clip=TINY, clip_resolution=64, mask_resolution=32, num_clusters=8)
    return PixelCLIP(**{**defaults, **kwargs})


def random_batch(batch=2, size=48, seed=0, num_masks=(5, 3)):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8, generator=g),
        "image_strong": torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8, generator=g),
        "masks": [torch.rand(n, size, size, generator=g) > 0.6 for n in num_masks[:batch]],
    }


# -- Sinkhorn ---------------------------------------------------------------------------------------------------------
def test_sinkhorn_matches_reference_and_rows_sum_to_one():
    logits = torch.randn(37, 8, dtype=torch.float64) * 5
    q = distributed_sinkhorn(logits, iterations=3)
    ref = sinkhorn_reference(logits.numpy(), 3)
    np.testing.assert_allclose(q.double().numpy(), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(q.sum(dim=1).numpy(), 1.0, rtol=1e-5)


def test_sinkhorn_balances_clusters():
    g = torch.Generator().manual_seed(0)
    masks, clusters = 800, 8
    logits = torch.randn(masks, clusters, generator=g)
    logits[:, 0] += 3.0  # every mask prefers cluster 0
    assert torch.bincount(logits.argmax(1), minlength=clusters)[0] > 0.9 * masks
    counts = torch.bincount(distributed_sinkhorn(logits, 3).argmax(1), minlength=clusters)
    assert counts.min() >= masks / clusters * 0.5 and counts.max() <= masks / clusters * 1.6, counts


def _dist_worker(rank: int, world: int, init_file: str, logits: torch.Tensor, splits: list[int], feats, masks,
                 protos, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(splits[:rank])
        q = distributed_sinkhorn(logits[start:start + splits[rank]], 3)
        half = len(feats) // world
        lo, hi = rank * half, (rank + 1) * half
        targets, info = cluster_targets(feats[lo:hi], masks[lo:hi], protos, 100.0, 16, 3, 2)
        torch.save({"q": q, "targets": targets, "assignment": info["assignment"]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_two_processes_equal_one(tmp_path):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 6, generator=g) * 4
    splits = [7, 5]  # uneven mask counts per process
    feats = torch.randn(4, 16, 4, 4, generator=g)
    masks = [torch.rand(n, 16, 16, generator=g) > 0.5 for n in (4, 0, 3, 5)]  # one image without masks
    protos = torch.randn(6, 16, generator=g)
    out = str(tmp_path / "res")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), logits, splits, feats, masks, protos, out), nprocs=2,
             join=True)
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    single = distributed_sinkhorn(logits, 3)
    torch.testing.assert_close(torch.cat([p["q"] for p in parts]), single, rtol=1e-5, atol=1e-6)
    targets, info = cluster_targets(feats, masks, protos, 100.0, 16, 3, 2)
    assert torch.equal(torch.cat([p["assignment"] for p in parts]), info["assignment"])
    assert torch.equal(torch.cat([p["targets"] for p in parts]), targets)


# -- clustering and targets ------------------------------------------------------------------------------------------
def test_cluster_targets_are_unions_of_assigned_masks():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 8, 4, 4, generator=g)
    masks = [torch.rand(4, 16, 16, generator=g) > 0.5, torch.zeros(2, 16, 16, dtype=torch.bool)]
    masks[1][0, 3, 3] = True  # a 1-pixel mask is dropped; the other is empty
    protos = torch.randn(5, 8, generator=g)
    targets, info = cluster_targets(feats, masks, protos, 100.0, 16, 3, 2)
    assert info["num_masks"] == 4 and targets[1].sum() == 0
    # independent reference: pooled teacher features -> scores -> Sinkhorn -> argmax -> union
    up = F.interpolate(feats, size=(16, 16), mode="bilinear", align_corners=False)[0]
    m = masks[0].float()
    pooled = (up[None] * m[:, None]).sum((2, 3)) / m.sum((1, 2))[:, None]
    logits = 100.0 * F.normalize(pooled, dim=-1) @ F.normalize(protos, dim=-1).T
    hard = torch.from_numpy(sinkhorn_reference(logits.double().numpy(), 3)).argmax(1)
    assert torch.equal(hard, info["assignment"])
    for j in range(5):
        expected = masks[0][hard == j].any(dim=0) if (hard == j).any() else torch.zeros(16, 16, dtype=torch.bool)
        assert torch.equal(targets[0, j].bool(), expected)


# -- what trains -----------------------------------------------------------------------------------------------------
def test_only_intended_parameters_receive_gradients():
    model = make_model()
    loss, _ = model.compute_loss(random_batch())
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    visual = {n for n, _ in model.named_parameters() if n.startswith("encoder.model.visual.")}
    expected_visual = {n for n in visual if ".attn." in n or n.endswith("visual.positional_embedding")}
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert with_grad == expected_visual | head | {"prompts.tokens"}
    assert not any(n.startswith("teacher.") for n, p in model.named_parameters() if p.requires_grad)
    text = [n for n, p in model.named_parameters() if n.startswith("encoder.model.") and "visual" not in n]
    assert text and not any(model.get_parameter(n).requires_grad for n in text)


def test_convnext_trains_the_whole_visual_encoder():
    model = make_model(clip=CLIPConfig(name="tiny-convnext", pretrained=None), clip_resolution=64)
    assert model.eps == 1.0
    visual = dict(model.encoder.model.visual.named_parameters())
    assert visual and all(p.requires_grad for p in visual.values())
    assert not any(p.requires_grad for n, p in model.encoder.model.named_parameters() if not n.startswith("visual."))


def test_teacher_follows_ema_rule_exactly():
    model = make_model(ema_momentum=0.9)
    teacher = model.teacher.model.visual
    student = model.encoder.model.visual
    images = torch.rand(1, 3, 64, 64)
    cached = model.teacher.encode_dense(model.teacher.normalize(images))  # fills the pos-embed cache
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    model.update_teacher()
    for name, s in student.named_parameters():
        t = dict(teacher.named_parameters())[name]
        expected = 0.9 * before[name] + 0.1 * s if s.requires_grad else before[name]
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7)
        if not s.requires_grad:
            assert torch.equal(t, s)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    # a fresh teacher pass sees the updated positional embedding (no stale cache)
    with torch.no_grad():
        after = model.teacher.encode_dense(model.teacher.normalize(images))
        model.teacher.clear_cache()
        fresh = model.teacher.encode_dense(model.teacher.normalize(images))
    assert torch.equal(after, fresh) and not torch.allclose(after, cached)


def test_teacher_update_happens_in_the_training_step():
    model = make_model()
    student_pos = model.encoder.model.visual.positional_embedding
    with torch.no_grad():
        student_pos.add_(1.0)
    before = model.teacher.model.visual.positional_embedding.clone()
    model.compute_loss(random_batch())
    torch.testing.assert_close(model.teacher.model.visual.positional_embedding,
                               0.999 * before + 0.001 * student_pos.detach())


# -- loss support ----------------------------------------------------------------------------------------------------
def test_pixels_under_no_mask_do_not_contribute():
    # clip 64 / patch 16 -> 4x4 grid -> head output 16x16 == mask_resolution: no interpolation between them
    model = make_model(mask_resolution=16)
    captured = {}
    head_forward = model.head.forward

    def spy(x):
        out = head_forward(x)
        out.retain_grad()
        captured["out"] = out
        return out

    model.head.forward = spy
    batch = random_batch(batch=1, size=16, num_masks=(3,))
    covered = torch.zeros(16, 16, dtype=torch.bool)
    batch["masks"] = [torch.zeros(2, 16, 16, dtype=torch.bool)]
    batch["masks"][0][0, 2:8, 2:10] = True
    batch["masks"][0][1, 9:14, 5:15] = True
    covered = batch["masks"][0].any(0)
    loss, _ = model.compute_loss(batch)
    loss.backward()
    grad = captured["out"].grad.reshape(8, 16, 16)  # [K, R, R]
    assert grad[:, ~covered].abs().max() == 0
    assert grad[:, covered].abs().min() > 0
    # independent reference: BCE over the covered pixels only, all clusters
    logits = captured["out"].detach().reshape(8, 16, 16)
    targets, _ = cluster_targets(model.teacher.encode_dense(model.teacher.normalize(
        F.interpolate(batch["image"].float() / 255, size=(64, 64), mode="bilinear", align_corners=False))),
        batch["masks"], model.prototypes(), model.eps, 16)
    expected = F.binary_cross_entropy_with_logits(logits[:, covered], targets[0][:, covered])
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)


def test_batch_without_masks_gives_zero_loss_with_gradients_defined():
    model = make_model()
    batch = random_batch()
    batch["masks"] = [torch.zeros(0, 48, 48, dtype=torch.bool), torch.zeros(1, 48, 48, dtype=torch.bool)]
    loss, info = model.compute_loss(batch)
    assert info["num_masks"] == 0 and loss.item() == 0.0
    loss.backward()


def test_overfitting_one_batch_lowers_the_loss():
    model = make_model(lr=3e-3)
    batch = random_batch(seed=3)
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=3e-3)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss, _ = model.compute_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


# -- prompts ---------------------------------------------------------------------------------------------------------
def test_prompts_start_from_seeded_vocabulary_embeddings():
    a, b, c = make_model(), make_model(), make_model(prompt_seed=1)
    emb = a.encoder.model.token_embedding.weight
    assert torch.equal(a.prompts.tokens.detach(), emb[a.prompts.init_words].detach())
    assert a.prompts.tokens.shape == (8, 4, 64) and int(a.prompts.init_words.max()) < emb.shape[0] - 10
    assert torch.equal(a.prompts.tokens, b.prompts.tokens) and not torch.equal(a.prompts.tokens, c.prompts.tokens)


def test_prompts_from_init_words():
    import open_clip

    tokenizer = open_clip.get_tokenizer("tiny-vit")
    words = ["photo", "scene", "with"]
    pool = {int(t) for w in words for t in tokenizer([w])[0] if t != 0} - {49406, 49407}  # start/end of text
    model = make_model(prompt_init_words=words)
    drawn = set(model.prompts.init_words.flatten().tolist())
    assert drawn <= pool and len(drawn) > 1
    emb = model.encoder.model.token_embedding.weight
    assert torch.equal(model.prompts.tokens.detach(), emb[model.prompts.init_words].detach())
    with pytest.raises(ValueError, match="have no tokens"):
        LearnablePrompts(model.encoder.model, tokenizer, num_prompts=2, init_words=[""])


def test_prompt_prototypes_equal_open_clip_text_of_the_same_tokens():
    import open_clip

    model = make_model(num_clusters=2)
    tokenizer = open_clip.get_tokenizer("tiny-vit")
    sentences = ["A photo of a red cat on grass in the scene", "A photo of a big old blue car in the scene"]
    words = [s[len("A photo of a "):-len(" in the scene")] for s in sentences]
    ids = [tokenizer([w])[0] for w in words]
    ids = [i[(i != 0)][1:-1] for i in ids]
    assert all(len(i) == 4 for i in ids)
    with torch.no_grad():
        model.prompts.tokens.copy_(model.encoder.model.token_embedding(torch.stack(ids)))
        expected = model.encoder.model.encode_text(tokenizer(sentences))
        torch.testing.assert_close(model.prototypes(), expected, rtol=1e-5, atol=1e-5)


# -- inference and optimiser -----------------------------------------------------------------------------------------
def test_dense_logits_upsample_student_features_to_64_and_use_plain_cosine():
    model = make_model().eval()
    images, text = torch.rand(2, 3, 64, 64), torch.randn(3, 64)
    out = model.dense_logits(images, text)
    feats = model.encoder.encode_dense((images - model.encoder.mean) / model.encoder.std)
    feats = F.interpolate(feats, size=(64, 64), mode="bilinear", align_corners=False)
    expected = torch.einsum("bdhw,qd->bqhw", feats / feats.norm(dim=1, keepdim=True), text / text.norm(dim=1,
                                                                                                           keepdim=True))
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert model.input_size == 64 and model.default_protocol == "pixelclip"


def test_parameter_groups_and_cosine_schedule():
    model = make_model(max_steps=100)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert groups["clip"]["lr"] == pytest.approx(2e-6) and groups["prompts"]["lr"] == pytest.approx(2e-3)
    assert groups["decoder"]["lr"] == pytest.approx(2e-4) and groups["decoder"]["weight_decay"] == 1e-4
    # default weight_decay_rule=detectron2 (the authors' build_optimizer): prompts and positional embedding decay
    assert groups["prompts"]["weight_decay"] == 1e-4 and groups["decoder_no_decay"]["weight_decay"] == 0.0
    assert id(model.encoder.model.visual.positional_embedding) in {id(p) for p in groups["clip"]["params"]}
    assert all(p.ndim == 1 for p in groups["decoder_no_decay"]["params"])  # GroupNorm weights and biases
    optimizer = model.configure_optimizers()
    opt, sched = optimizer["optimizer"], optimizer["lr_scheduler"]["scheduler"]
    base = [g["lr"] for g in opt.param_groups]
    lrs = []
    for _ in range(101):
        lrs.append([g["lr"] / b for g, b in zip(opt.param_groups, base)])
        opt.step()
        sched.step()
    for step, expected in ((0, 1.0), (50, 0.75), (100, 0.5)):
        assert lrs[step] == pytest.approx([expected] * len(base))
    assert lrs[25][0] == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * 0.25)))


def test_dino_masks_tile_the_weak_view_and_supervise_every_pixel():
    from ovseg.methods.pixelclip import DinoConfig

    model = make_model(masks="dino", dino=DinoConfig(name="vit_small_patch16_224", weights=None, clusters=4,
                                                     iterations=20,
                                                     model_kwargs=dict(depth=1, embed_dim=32, num_heads=2)))
    batch = random_batch(size=64)
    del batch["masks"]
    masks = model.dino(batch["image"].float() / 255)
    assert masks.shape == (2, 4, 64, 64) and torch.equal(masks.sum(1), torch.ones(2, 64, 64, dtype=torch.long))
    loss, info = model.compute_loss(batch)
    assert torch.isfinite(loss) and info["valid_fraction"] == 1.0 and 2 <= info["num_masks"] <= 8
