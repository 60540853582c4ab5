"""Two-view geometry: checked against coordinate maps that albumentations warps itself (an independent
reference for crop_coords / flip bookkeeping)."""

import numpy as np
import pytest
import torch

from ovseg.methods.clips4.views import TwoViewImages, TwoViews, correspondence, view_grid, warp_to_view


def _coords(height, width):
    """Source coordinate map: normalised (x, y) of each pixel centre, HxWx2 float32."""
    y, x = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    return np.stack([x, y], axis=-1).astype(np.float32)


def _view_with_coords(views, image):
    out = views.geometric(image=image, coords=_coords(*image.shape[:2]))
    from ovseg.methods.clips4.views import geometry_from_params

    return out["image"], out["coords"], geometry_from_params(out["applied_transforms"], *image.shape[:2])


@pytest.mark.parametrize("seed", range(4))
def test_view_grid_matches_albumentations_coordinate_map(seed):
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(40, 90, size=2))
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    views = TwoViews(crop_size=24, crop_scale=(0.1, 1.0))
    views.geometric.set_random_seed(seed)
    flips = 0
    for _ in range(6):
        _, coords, geometry = _view_with_coords(views, image)
        flips += int(geometry[4])
        grid = view_grid(torch.from_numpy(geometry), 24, 24).numpy()
        # linear maps survive bilinear resizing exactly; borders clamp by at most half a source pixel
        np.testing.assert_allclose(grid[..., 0], coords[..., 0], atol=0.5 / width + 1e-5)
        np.testing.assert_allclose(grid[..., 1], coords[..., 1], atol=0.5 / height + 1e-5)
    assert 0 < flips < 6 or seed  # flips do happen


def test_corresponding_pixels_map_to_the_same_source_pixel():
    rng = np.random.default_rng(0)
    height, width, size = 60, 80, 32
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    views = TwoViews(crop_size=size, crop_scale=(0.3, 1.0))
    views.geometric.set_random_seed(1)
    checked = 0
    for _ in range(10):
        _, coords_a, geom_a = _view_with_coords(views, image)
        _, coords_b, geom_b = _view_with_coords(views, image)
        index, valid = correspondence(torch.from_numpy(geom_a)[None], torch.from_numpy(geom_b)[None], size, size)
        index, valid = index[0].numpy(), valid[0].numpy()
        ca, cb = coords_a.reshape(-1, 2), coords_b.reshape(-1, 2)
        # the source pixel seen by A's pixel and by its corresponding pixel of B: within one B pixel
        pixel_b = np.array([(geom_b[2] - geom_b[0]) / size, (geom_b[3] - geom_b[1]) / size])
        tolerance = pixel_b / 2 + np.array([0.5 / width, 0.5 / height]) + 1e-5
        assert np.all(np.abs(ca[valid] - cb[index[valid]]) <= tolerance)
        # and validity is exactly "A's pixel centre lies inside B's crop box"
        inside = ((ca[:, 0] >= geom_b[0]) & (ca[:, 0] < geom_b[2]) & (ca[:, 1] >= geom_b[1]) & (ca[:, 1] < geom_b[3]))
        interior = (np.abs(ca[:, 0] - geom_b[0]) > 1 / width) & (np.abs(ca[:, 0] - geom_b[2]) > 1 / width) & \
            (np.abs(ca[:, 1] - geom_b[1]) > 1 / height) & (np.abs(ca[:, 1] - geom_b[3]) > 1 / height)
        np.testing.assert_array_equal(valid[interior], inside[interior])
        checked += int(valid.sum())
    assert checked > 500


def test_teacher_features_warped_into_a_view_line_up_with_its_crop():
    # a smooth image; "teacher features" = the whole image itself at teacher resolution
    height, width, size = 64, 96, 32
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    image = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, x * y], -1)
    image = (image * 255).astype(np.uint8)
    views = TwoViews(crop_size=size, crop_scale=(0.2, 0.6), color_jitter=0, grayscale=0)
    views.geometric.set_random_seed(3)
    features = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    errors, shuffled = [], []
    for _ in range(8):
        crop, _, geometry = _view_with_coords(views, image)
        warped = warp_to_view(features, torch.from_numpy(geometry)[None], (size, size))[0]
        crop_t = torch.from_numpy(crop).permute(2, 0, 1).float()
        errors.append((warped - crop_t).abs().mean().item())
        shuffled.append((warped.flip(-1).flip(-2) - crop_t).abs().mean().item())
    assert max(errors) < 3.0  # grey levels out of 255: interpolation noise only
    assert min(shuffled) > 5 * max(errors)


def test_two_view_source_batches(tmp_path):
    from ovseg.data.synthetic import write_synthetic

    write_synthetic("voc_aug", tmp_path, split="trainaug", num_images=3, seed=0)
    source = TwoViewImages(crop_size=32, teacher_short_side=48, teacher_multiple=16)
    dataset = source.build(tmp_path)
    np.random.seed(0)
    samples = [dataset[i] for i in range(3)]
    batch = source.collate(samples)
    assert batch["image"].shape == (3, 2, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["geometry"].shape == (3, 2, 5)
    g = batch["geometry"]
    assert torch.all((g[..., :4] >= 0) & (g[..., :4] <= 1)) and torch.all(g[..., 2] > g[..., 0])
    for t in batch["teacher_image"]:
        assert t.shape[0] == 3 and t.shape[1] % 16 == 0 and t.shape[2] % 16 == 0 and min(t.shape[1:]) == 48
    # the two views of an image differ (fresh parameters per view), and a re-draw differs again
    assert not torch.equal(g[0, 0], g[0, 1]) and not torch.equal(dataset[0]["geometry"], samples[0]["geometry"])


def test_every_view_setting_is_reachable_from_a_config():
    """The training sources forward their views' settings (``**views``), so a config reaches each of them, e.g.
    ``color_jitter_p``, and a misspelt one is refused at parse time."""
    import jsonargparse
    import pytest

    from ovseg.data.sources import TrainSource

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(TrainSource, "train")
    config = parser.parse_object({"train": {"class_path": "ovseg.methods.clips4.views.TwoViewImages",
                                            "init_args": {"crop_size": 32, "color_jitter_p": 0.3}}})
    source = parser.instantiate_classes(config).train
    jitter = [t for t in source.views.photometric.transforms if type(t).__name__ == "ColorJitter"]
    assert source.views.crop_size == 32 and [t.p for t in jitter] == [0.3]
    with pytest.raises(Exception, match="color_jiter_p"):
        parser.parse_object({"train": {"class_path": "ovseg.methods.clips4.views.TwoViewImages",
                                       "init_args": {"color_jiter_p": 0.3}}})
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(TrainSource, "train")
    config = parser.parse_object({"train": {"class_path": "ovseg.methods.pixelclip.data.SA1B",
                                            "init_args": {"crop_size": 64, "resize_short": 96, "blur_prob": 0.1}}})
    views = parser.instantiate_classes(config).train.views
    assert (views.crop_size, views.resize_short) == (64, 96)
    assert [t.p for t in views.photometric.transforms if type(t).__name__ == "GaussianBlur"] == [0.1]
