"""The ``maskclip`` protocol's reference settings (MaskCLIP's released mmseg code), each against an independent
recomputation: corner patch padding, ImageNet normalisation (mmseg ``img_norm_cfg`` numbers), the GELU /
LayerNorm-eps swap of the image tower, the mmcv keep-ratio size, the cv2 resize, and MaskCLIP's class lists."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ovseg.data.classnames import read_class_names
from ovseg.data.specs import get_spec
from ovseg.eval.inference import protocol_resize
from ovseg.utils.geometry import keep_ratio_size
from ovseg.eval.protocols import load_protocol
from ovseg.models.clip import CLIPConfig, DenseCLIP, DenseOptions

MMSEG_MEAN = np.array([123.675, 116.28, 103.53])  # MaskCLIP configs/_base_/datasets/*.py img_norm_cfg
MMSEG_STD = np.array([58.395, 57.12, 57.375])
MASKCLIP_OPTIONS = DenseOptions(normalization="imagenet", patch_padding="corner", vision_activation="gelu",
                                vision_ln_eps=1e-6)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return DenseCLIP(CLIPConfig(name="tiny-vit", pretrained=None, quick_gelu=True, last_block="value")).eval()


def test_protocol_defaults_are_maskclips_pipeline():
    protocol = load_protocol("maskclip")
    voc, context, city = (protocol.settings_for(d) for d in ("voc20", "context59", "cityscapes"))
    assert (voc.resize_library, voc.resize_rule, voc.normalization, voc.patch_padding, voc.logits_upsample,
            voc.vision_activation, voc.vision_ln_eps, voc.pos_embed_interpolation) == (
        "cv2", "mmcv", "imagenet", "corner", "image_then_label", "gelu", 1e-6, "grid")
    assert isinstance(voc.vision_ln_eps, float)
    assert (voc.short_side, voc.long_side_max, voc.templates, voc.logit_scale) == (512, 2048, "maskclip85", None)
    assert (context.short_side, context.long_side_max) == (520, 520)
    assert (city.short_side, city.long_side_max) == (512, 1024)


def test_corner_padding_token_grid_and_zero_padded_pixels(clip):
    height, width = 37, 50  # 3x4 tokens after padding to 48x64; floor would give 2x3
    image = torch.rand(1, 3, height, width)
    seen = {}
    hook = clip.model.visual.conv1.register_forward_hook(lambda m, args, out: seen.update(x=args[0].clone()))
    try:
        with clip.using(MASKCLIP_OPTIONS):
            normalised = clip.normalize(image)
            features = clip.encode_dense(normalised)
    finally:
        hook.remove()
    assert features.shape[-2:] == (math.ceil(height / 16), math.ceil(width / 16)) == (3, 4)
    padded = np.zeros((1, 3, 48, 64), np.float32)  # AdaptivePadding('corner'): F.pad with zeros, bottom/right
    padded[..., :height, :width] = normalised.numpy()
    np.testing.assert_array_equal(seen["x"].numpy(), padded)
    with clip.using(DenseOptions()):
        assert clip.encode_dense(clip.normalize(image)).shape[-2:] == (2, 3)


def test_imagenet_normalisation_is_mmsegs_img_norm_cfg(clip):
    pixels = np.random.default_rng(0).integers(0, 256, (1, 3, 5, 7)).astype(np.float64)
    expected = (pixels - MMSEG_MEAN[:, None, None]) / MMSEG_STD[:, None, None]  # mmcv imnormalize on 0..255
    with clip.using(MASKCLIP_OPTIONS):
        ours = clip.normalize(torch.from_numpy(pixels / 255).float())
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)
    with clip.using(DenseOptions()):
        assert not np.allclose(clip.normalize(torch.from_numpy(pixels / 255).float()).numpy(), expected, atol=1e-2)


def test_gelu_and_ln_eps_swap_every_image_tower_layer_and_restore(clip):
    visual = clip.model.visual
    norms = [visual.ln_pre, visual.ln_post] + [n for b in visual.transformer.resblocks for n in (b.ln_1, b.ln_2)]
    originals = [type(b.mlp.gelu) for b in visual.transformer.resblocks]
    text_act = type(clip.model.transformer.resblocks[0].mlp.gelu)
    image = torch.rand(1, 3, 48, 48)
    with clip.using(MASKCLIP_OPTIONS):
        assert all(type(b.mlp.gelu) is nn.GELU and b.mlp.gelu.approximate == "none"
                   for b in visual.transformer.resblocks)
        assert all(n.eps == 1e-6 for n in norms)  # every LayerNorm of the image tower (mmseg norm_cfg)
        assert type(clip.model.transformer.resblocks[0].mlp.gelu) is text_act  # text tower untouched
        assert clip.model.ln_final.eps == 1e-5
        ours = clip.encode_dense(image)
    assert [type(b.mlp.gelu) for b in visual.transformer.resblocks] == originals and originals[0] is not nn.GELU
    assert all(n.eps == 1e-5 for n in norms)
    # independent recomputation: a model built with exact GELU and eps 1e-6 from the start
    torch.manual_seed(0)
    other = DenseCLIP(CLIPConfig(name="tiny-vit", pretrained=None, quick_gelu=False, last_block="value")).eval()
    other.load_state_dict(clip.state_dict())
    with other.using(DenseOptions(patch_padding="corner")):
        for module in other.model.visual.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = 1e-6
        expected = other.encode_dense(image)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    with clip.using(DenseOptions(patch_padding="corner")):
        assert not torch.allclose(clip.encode_dense(image), expected, atol=1e-4)


@pytest.mark.parametrize("size,scale,expected", [((375, 500), (2048, 512), (512, 683)),
                                                 ((375, 500), (520, 520), (390, 520)),
                                                 ((1024, 2048), (1024, 512), (512, 1024)),
                                                 ((397, 541), (2048, 512), (512, 698))])
def test_keep_ratio_size_is_mmcv_rescale_size(size, scale, expected):
    height, width = size
    # mmcv.rescale_size: one factor min(long_max / long, short_max / short), each side int(x * f + 0.5)
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    assert (int(height * factor + 0.5), int(width * factor + 0.5)) == expected
    assert keep_ratio_size(height, width, min(scale), max(scale), "mmcv") == expected


def test_cv2_resize_is_cv2_on_uint8():
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(1).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    ours = protocol_resize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, 40, 2048, None, "cv2")
    expected = cv2.resize(image, (54, 40), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal((ours[0].permute(1, 2, 0) * 255).round().byte().numpy(), expected)


# tools/maskclip_utils/prompt_engineering.py (MaskCLIP): a few names per list, and the COCO-Stuff clean-ups
MASKCLIP_NAMES = {
    "voc20": {0: "airplane", 10: "dining table", 15: "potted plant", 19: "tv monitor"},
    "context59": {0: "airplane", 39: "potted plant", 54: "tv monitor", 58: "wood"},
    "coco_stuff171": {4: "airplane", 84: "building", 91: "tile ceiling", 103: "floor", 106: "wood floor",
                      145: "sky", 159: "brick wall", 161: "wall", 169: "window", 170: "wood"},
    "ade150": {7: "bed", 149: "flag"},
    "cityscapes": {0: "road", 18: "bicycle"},
}


@pytest.mark.parametrize("dataset", ["voc20", "voc21", "context59", "context60", "coco_stuff171", "ade150",
                                     "cityscapes"])
def test_maskclip_class_lists(dataset):
    settings = load_protocol("maskclip").settings_for(dataset)
    assert settings.class_names == f"maskclip/{dataset}"
    names = [s[0] for s in read_class_names(settings.class_names)]
    spec = get_spec(dataset)
    assert len(names) == len(spec.class_names)
    offset = 1 if dataset in ("voc21", "context60") else 0
    if offset:
        assert spec.background_index == 0 and names[0] == "background"
    for index, name in MASKCLIP_NAMES[dataset.replace("voc21", "voc20").replace("context60", "context59")].items():
        assert names[index + offset] == name
