"""The reference-pipeline protocol settings that live in the shared evaluator: validation, two-step
upsampling, and the dense options being scoped to one prediction."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.eval.inference import labels_from_logits
from ovseg.eval.protocols import ProtocolSettings, load_protocol


@pytest.mark.parametrize("name,value", [("resize_library", "skimage"), ("resize_rule", "timm"),
                                        ("normalization", "laion"), ("patch_padding", "center"),
                                        ("pos_embed_interpolation", "bilinear"), ("logits_upsample", "twice"),
                                        ("vision_activation", "relu"), ("vision_ln_eps", 0.0)])
def test_unknown_choices_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        ProtocolSettings(**{name: value})


def test_every_builtin_protocol_records_every_setting():
    for name in ("maskclip", "pixelclip", "sclip"):
        settings = load_protocol(name).settings_for("voc21" if name != "pixelclip" else "voc20").as_dict()
        for key in ("resize_library", "resize_rule", "normalization", "patch_padding", "pos_embed_interpolation",
                    "logits_upsample", "vision_activation", "vision_ln_eps"):
            assert key in settings


def test_image_then_label_upsampling_equals_two_naive_steps_in_chunks():
    torch.manual_seed(0)
    logits = torch.randn(7, 5, 6)
    via, out = (33, 41), (50, 37)
    naive = F.interpolate(F.interpolate(logits[None], size=via, mode="bilinear", align_corners=False),
                          size=out, mode="bilinear", align_corners=False)[0].argmax(0)
    one_step = F.interpolate(logits[None], size=out, mode="bilinear", align_corners=False)[0].argmax(0)
    query_to_class = torch.arange(7)
    chunked = labels_from_logits(logits, out, query_to_class, via_size=via, max_chunk_bytes=2 * 33 * 41 * 4)
    assert torch.equal(chunked, naive)
    assert not torch.equal(naive, one_step)  # the two rules do differ on this input
    assert torch.equal(labels_from_logits(logits, out, query_to_class), one_step)


def test_dense_options_hold_for_one_prediction_only():
    from ovseg.eval.evaluator import Evaluator, dense_options
    from ovseg.eval.protocols import load_protocol
    from ovseg.methods import MaskCLIP
    from ovseg.models.clip import CLIPConfig, DenseOptions

    method = MaskCLIP(clip=CLIPConfig(name="tiny-vit", pretrained=None, last_block="value"))
    clip = method.encoder
    before = [type(m.mlp.gelu) for m in clip.model.visual.transformer.resblocks]
    settings = ProtocolSettings(normalization="imagenet", patch_padding="corner", pos_embed_interpolation="sclip",
                                vision_activation="gelu", vision_ln_eps=1e-6)
    with dense_options(method, settings):
        assert clip.options == DenseOptions("imagenet", "corner", "sclip", "gelu", 1e-6)
        assert all(isinstance(m.mlp.gelu, torch.nn.GELU) for m in clip.model.visual.transformer.resblocks)
        assert {m.eps for m in clip.model.visual.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    assert clip.options == DenseOptions()
    assert [type(m.mlp.gelu) for m in clip.model.visual.transformer.resblocks] == before
    assert {m.eps for m in clip.model.visual.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}

    # and through the evaluator: a corner-padded prediction leaves the model as loaded
    evaluator = Evaluator(load_protocol("maskclip"), {"patch_padding": "corner", "short_side": 40,
                                                      "class_names": "{dataset}"})
    entry = evaluator.add_dataset(method, "voc21", [["background"], ["cat"]], 0, torch.device("cpu"))
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 37, 45))).float() / 255
    pred = evaluator.predict(method, entry, image, (37, 45))
    assert pred.shape == (37, 45) and clip.options == DenseOptions()


def test_methods_trained_in_ovseg_keep_their_clips_native_reading_under_maskclip():
    """CLIP-S4 (and its probes) pin the model-reading settings; the user's overrides still win; MaskCLIP does
    not pin them (the maskclip protocol reproduces its released model)."""
    from ovseg.eval.protocols import MODEL_NATIVE_SETTINGS
    from ovseg.methods.probes import KNNProbe
    from ovseg.methods import CLIPS4, MaskCLIP

    assert CLIPS4.NATIVE_SETTINGS == KNNProbe.NATIVE_SETTINGS == MODEL_NATIVE_SETTINGS
    assert MaskCLIP.NATIVE_SETTINGS == {}
    protocol = load_protocol("maskclip")
    pinned = protocol.settings_for("voc21", {**CLIPS4.NATIVE_SETTINGS, "vision_ln_eps": 1e-6})
    assert (pinned.normalization, pinned.vision_activation, pinned.vision_ln_eps) == ("model", "model", 1e-6)
