"""PixelCLIP's DINO masks (issue 24 item 3): the authors' k-means library and DINO's positional-embedding resize as
named settings of DinoConfig (the comparison with the authors' code itself: tests/parity/test_dino.py)."""

import pytest
import torch

from ovseg.methods.pixelclip.dino import DinoConfig, DinoMasker, authors_kmeans

TINY = dict(name="vit_small_patch16_224", weights=None, clusters=3, model_kwargs=dict(depth=1, embed_dim=32,
                                                                                        num_heads=2))


def _blobs(seed: int) -> torch.Tensor:
    """[2, 60, 8]: three tight, far-apart blobs per item, 20 points each."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, 3, 8, generator=generator) * 10
    return (centres.repeat_interleave(20, dim=1) + 0.01 * torch.randn(2, 60, 8, generator=generator))


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(torch.equal(x[:, None] == x[None], y[:, None] == y[None]) for x, y in zip(a, b))


def test_authors_kmeans_is_the_library_per_item_from_torchs_generator():
    from fast_pytorch_kmeans import KMeans

    x = _blobs(0)
    torch.manual_seed(5)
    ours = authors_kmeans(x, 3)
    torch.manual_seed(5)
    library = KMeans(n_clusters=3)
    theirs = torch.stack([library.fit_predict(item) for item in x])  # get_dino_masks: one KMeans, images in turn
    assert torch.equal(ours, theirs)
    # from this start it finds the blobs (labels may be permuted)
    assert _same_partition(ours, torch.arange(3).repeat_interleave(20).expand(2, -1))


def test_dino_positional_resize_is_dinos_not_timms():
    torch.manual_seed(0)
    dino = DinoMasker(DinoConfig(**TINY, pos_embed_interpolation="dino"))
    timm_resize = DinoMasker(DinoConfig(**TINY, pos_embed_interpolation="timm"))
    timm_resize.load_state_dict(dino.state_dict())
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    same, _ = dino.features(images)
    torch.testing.assert_close(same, timm_resize.features(images)[0], rtol=0, atol=0)  # trained grid: no resize
    oblong = torch.rand(1, 3, 320, 480, generator=torch.Generator().manual_seed(2))
    ours, grid = dino.features(oblong)
    assert grid == (20, 30)
    # DINO samples by scale_factor (grid + 0.1) / 14, timm by the size: another embedding away from the corners
    assert (ours - timm_resize.features(oblong)[0]).abs().max() > 1e-4


def test_masks_from_the_authors_kmeans_tile_the_image():
    torch.manual_seed(0)
    masker = DinoMasker(DinoConfig(**TINY, kmeans="fast_pytorch_kmeans"))
    masks = masker(torch.rand(2, 3, 50, 70, generator=torch.Generator().manual_seed(3)))
    assert masks.shape == (2, 3, 50, 70) and torch.equal(masks.sum(1), torch.ones(2, 50, 70, dtype=torch.long))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="kmeans"):
        DinoConfig(kmeans="sklearn")
    with pytest.raises(ValueError, match="pos_embed_interpolation"):
        DinoConfig(pos_embed_interpolation="bilinear")
