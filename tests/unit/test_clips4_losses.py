"""CLIP-S4 losses, segments and unknown prototypes against hand-written references."""

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.methods.clips4 import (
    UnknownPrototypes,
    embedding_consistency,
    pixel_segment_infonce,
    segment_mean,
    semantic_consistency,
    spherical_kmeans,
)


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _infonce_reference(pixels, protos, positive, valid, exclude, tau):
    total = 0.0
    for i in range(pixels.shape[0]):
        terms = []
        for s in range(protos.shape[0]):
            if s != positive[i] and (not valid[s] or (exclude is not None and s == exclude[i])):
                continue
            terms.append(math.exp(float(pixels[i] @ protos[s]) / tau))
        total += -math.log(math.exp(float(pixels[i] @ protos[positive[i]]) / tau) / sum(terms))
    return total / pixels.shape[0]


def test_pixel_infonce_matches_reference_with_masks():
    pixels, protos = _unit(7, 8, seed=1), _unit(5, 8, seed=2)
    positive = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    exclude = torch.tensor([1, 2, 3, 4, 0, 0, 3])  # one equals the positive: must stay in
    valid = torch.tensor([True, True, False, True, True])
    got = pixel_segment_infonce(pixels, protos, positive, valid, exclude, 0.1)
    assert got.item() == pytest.approx(_infonce_reference(pixels, protos, positive, valid, exclude, 0.1), rel=1e-5)


def test_pixel_infonce_low_at_prototypes_high_when_shuffled():
    protos = _unit(40, 64, seed=3)
    positive = torch.arange(40).repeat(5)
    pixels = protos[positive]
    at_proto = pixel_segment_infonce(pixels, protos, positive, temperature=0.1)
    floor = math.log(1 + 39 * math.exp(-10))  # if every negative were orthogonal
    assert at_proto.item() < 0.01 and at_proto.item() >= floor * 0.5
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    shuffled = pixel_segment_infonce(pixels, protos, positive[order])
    assert shuffled.item() > 8.0
    assert pixel_segment_infonce(pixels[:0], protos, positive[:0]).item() == 0.0


def test_embedding_consistency_zero_gradient_when_embeddings_coincide():
    clip = torch.eye(16)[:10]  # orthonormal CLIP segment embeddings
    raw = (clip * 3.0).clone().requires_grad_(True)  # model segment embeddings before normalisation
    loss = embedding_consistency(F.normalize(raw, dim=-1), clip, torch.arange(10), mode="cosine")
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and raw.grad.abs().max().item() < 1e-6

    raw.grad = None
    loss = embedding_consistency(F.normalize(raw, dim=-1), clip, torch.arange(10), mode="infonce", temperature=0.1)
    loss.backward()
    assert loss.item() < 1e-3 and raw.grad.norm().item() < 1e-3

    # not coinciding: large loss and gradient
    shuffled = clip[torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0])].clone().requires_grad_(True)
    loss = embedding_consistency(shuffled, clip, torch.arange(10), mode="infonce", temperature=0.1)
    loss.backward()
    assert loss.item() > 5 and shuffled.grad.norm().item() > 1


def test_semantic_consistency_zero_when_predictions_match():
    segments, targets = _unit(12, 32, seed=4), _unit(9, 32, seed=5)
    model = segments.clone().requires_grad_(True)
    loss = semantic_consistency(model, segments, targets, 0.01)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and model.grad.abs().max().item() < 1e-5
    other = _unit(12, 32, seed=6)
    loss = semantic_consistency(other, segments, targets, 0.01)
    p = F.softmax(segments @ targets.t() / 0.01, -1)
    q = F.softmax(other @ targets.t() / 0.01, -1)
    reference = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-3) and loss.item() > 1


def test_spherical_kmeans_recovers_clusters_and_segment_mean():
    centres = torch.eye(8)[:4] * 1.0
    labels = torch.arange(4).repeat_interleave(25)
    x = F.normalize(centres[labels] + 0.05 * torch.randn(100, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    found = 0
    for seed in range(5):  # random init may merge two clusters; most restarts must not
        assign, _ = spherical_kmeans(x[None], 4, 20, torch.Generator().manual_seed(seed))
        pairs = set(zip(labels.tolist(), assign[0].tolist()))
        found += len(pairs) == 4 and len({a for _, a in pairs}) == 4
    assert found >= 3
    assign = labels[None]
    means = segment_mean(x[None], assign, 5)
    assert torch.allclose(means[0, 2], F.normalize(x[labels == 2].mean(0), dim=0), atol=1e-6)
    assert means[0, 4].abs().sum() == 0  # empty segment


def test_unknown_prototypes_init_ema_no_grad_unit_norm():
    dim = 16
    known = torch.eye(dim)[:6]  # known prototypes e0..e5 (with 2, a max softmax is always >= 0.5)
    bank = UnknownPrototypes(2, dim, momentum=0.9, threshold=0.5, temperature=0.01, init_min_segments=8)
    assert list(bank.parameters()) == [] and bank.active.shape == (0, dim)
    gen = torch.Generator().manual_seed(0)
    noise = lambda n, s: 0.002 * torch.randn(n, dim, generator=torch.Generator().manual_seed(s))  # noqa: E731
    explained = F.normalize(known[torch.arange(6)] + noise(6, 1), dim=-1)
    unexplained_dirs = torch.eye(dim)[torch.tensor([9, 13])]
    novel = F.normalize(unexplained_dirs[torch.arange(6) % 2] + noise(6, 2), dim=-1)
    assert bank.update(torch.cat([explained, novel]), known, gen) == 6
    assert not bool(bank.initialized)  # 6 < 8 collected so far
    novel2 = F.normalize(unexplained_dirs[torch.arange(4) % 2] + noise(4, 3), dim=-1)
    bank.update(torch.cat([novel2, explained]), known, gen)
    assert bool(bank.initialized)
    protos = bank.active
    # initialised from the unexplained segments only: one prototype per novel direction, none near e0/e1
    sims = protos @ unexplained_dirs.t()
    assert sorted(sims.argmax(1).tolist()) == [0, 1] and sims.max(1).values.min() > 0.95
    assert (protos @ known.t()).abs().max() < 0.2
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(2))

    # EMA: p <- normalize(m p + (1 - m) mean of its unexplained segments)
    before = protos.clone()
    step = F.normalize(unexplained_dirs + torch.eye(dim)[torch.tensor([10, 14])], dim=-1)
    bank.update(torch.cat([step, explained]), known, gen)
    target = step[(before @ step.t()).argmax(1)]
    expected = F.normalize(0.9 * before + 0.1 * target, dim=-1)
    torch.testing.assert_close(bank.active, expected)
    torch.testing.assert_close(bank.active.norm(dim=-1), torch.ones(2))
    assert not bank.prototypes.requires_grad
