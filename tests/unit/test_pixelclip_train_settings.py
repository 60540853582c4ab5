"""PixelCLIP's training settings that follow the authors' code, each against an independent recomputation:
the SA-1B geometry (detectron2's ``ResizeShortestEdge`` with the 1333 long-side cap, PIL bilinear / nearest, then
the crop) and the optimizer's weight-decay groups (train_net.py ``build_optimizer``)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.methods.pixelclip.data import PixelCLIPViews, pil_nearest_index
from tests.unit.test_pixelclip import make_model


@pytest.mark.parametrize("n_in, n_out", [(7, 3), (10, 25), (1125, 1333), (750, 889), (97, 96), (5, 5)])
def test_pil_nearest_index_is_pils_own_nearest_resize(n_in, n_out):
    row = np.arange(n_in, dtype=np.int32)[None].repeat(2, 0)  # each pixel holds its column index
    resized = np.asarray(Image.fromarray(row, mode="I").resize((n_out, 2), Image.NEAREST))
    np.testing.assert_array_equal(pil_nearest_index(n_in, n_out), resized[0])


def test_views_resize_with_the_long_side_cap_then_crop_as_the_authors_mapper():
    rng_image = np.random.default_rng(0)
    height, width, crop = 75, 225, 64  # 3:1 -> short 100 gives 100x300, capped at 200: 67x200
    image = rng_image.integers(0, 256, (height, width, 3), dtype=np.uint8)
    masks = rng_image.random((3, height, width)) > 0.5
    views = PixelCLIPViews(resize_short=100, crop_size=crop, ssd_color=False, flip_prob=0.0, strong=False,
                           mask_resolution=None, resize_long_max=200, resize_library="pil")
    out = views(image, masks, np.random.default_rng(1))

    rh, rw = 67, 200  # detectron2: 100 x 300 -> scale 200/300 -> (66.67, 200) -> int(+0.5)
    assert views.resized_shape(height, width) == (rh, rw)
    rng = np.random.default_rng(1)
    y0, x0 = int(rng.integers(0, rh - crop + 1)), int(rng.integers(0, rw - crop + 1))
    weak = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))[y0:y0 + crop, x0:x0 + crop]
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), weak)
    expected = np.stack([np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((rw, rh), Image.NEAREST))
                         [y0:y0 + crop, x0:x0 + crop] > 0 for m in masks])
    expected = expected[expected.reshape(len(expected), -1).any(1)]
    np.testing.assert_array_equal(out["masks"].numpy(), expected)


def test_without_the_cap_the_long_side_follows_the_short_side():
    views = PixelCLIPViews(resize_short=1024, crop_size=640, resize_long_max=None)
    assert views.resized_shape(750, 1125) == (1024, 1536)
    assert PixelCLIPViews(resize_short=1024, crop_size=640).resized_shape(750, 1125) == (889, 1333)


def _decay_of(model, parameter) -> float:
    groups = [g for g in model.parameter_groups() if any(p is parameter for p in g["params"])]
    assert len(groups) == 1
    return groups[0]["weight_decay"]


def test_detectron2_rule_decays_positional_embedding_and_prompts_but_not_norms():
    model = make_model(weight_decay_rule="detectron2")
    visual = model.encoder.model.visual
    assert _decay_of(model, visual.positional_embedding) == 1e-4
    assert _decay_of(model, model.prompts.tokens) == 1e-4
    assert _decay_of(model, visual.transformer.resblocks[-1].attn.in_proj_weight) == 1e-4
    norm = next(m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm))
    assert _decay_of(model, norm.weight) == 0.0


def test_norm_embed_rule_keeps_ovsegs_old_groups():
    model = make_model(weight_decay_rule="norm_embed")
    visual = model.encoder.model.visual
    assert _decay_of(model, visual.positional_embedding) == 0.0
    assert _decay_of(model, model.prompts.tokens) == 0.0
    assert _decay_of(model, visual.transformer.resblocks[-1].attn.in_proj_weight) == 1e-4
    with pytest.raises(ValueError, match="weight_decay_rule"):
        make_model(weight_decay_rule="timm")


def test_training_input_is_normalised_on_0_255_then_resized_as_the_authors_forward():
    import torch.nn.functional as F

    model = make_model()  # tiny CLIP with OpenAI's mean/std, clip_resolution 64
    images = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    # pixelclip/config.py CLIP_PIXEL_MEAN / CLIP_PIXEL_STD, applied as pixelclip/pixelclip.py forward does
    mean = torch.tensor([122.7709383, 116.7460125, 104.09373615]).view(1, 3, 1, 1)
    std = torch.tensor([68.5005327, 66.6321579, 70.3231630]).view(1, 3, 1, 1)
    theirs = F.interpolate((images.float() - mean) / std, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(model._clip_input(model.encoder, images), theirs)  # bitwise
    # the float [0, 1] path (normalize, then resize) agrees to rounding
    ours01 = model._clip_input(model.encoder, images.float() / 255)
    torch.testing.assert_close(ours01, theirs, atol=1e-5, rtol=0)
