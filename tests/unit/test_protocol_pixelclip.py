"""The ``pixelclip`` protocol's reference settings (the authors' detectron2 test pipeline), each against an
independent recomputation: the PIL resize on uint8, detectron2's ``ResizeShortestEdge`` size rule, the class
embeddings in fp16 (open_clip's own fp16 model), and the authors' class spellings."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from ovseg.data.classnames import read_class_names
from ovseg.eval.inference import protocol_resize
from ovseg.utils.geometry import keep_ratio_size
from ovseg.eval.protocols import load_protocol
from ovseg.models.clip import CLIPConfig, DenseCLIP, DenseOptions


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return DenseCLIP(CLIPConfig(name="tiny-vit", pretrained=None, quick_gelu=True, last_block="value")).eval()


def test_protocol_defaults_are_the_authors_test_pipeline():
    settings = load_protocol("pixelclip").settings_for("voc20")
    assert (settings.resize_library, settings.resize_rule, settings.text_precision, settings.normalization,
            settings.patch_padding, settings.templates) == ("pil", "detectron2", "fp16", "model", "none",
                                                            "pixelclip8")
    assert (settings.short_side, settings.long_side_max, settings.square) == (640, 2560, "model")


@pytest.mark.parametrize("height, width, expected", [
    (375, 500, (640, 853)),     # 500 * 640/375 = 853.33
    (333, 500, (640, 961)),     # 960.96 rounds up
    (1024, 2048, (640, 1280)),
    (100, 1000, (256, 2560)),   # 640 x 6400, then the 2560 cap shrinks both
    (750, 1125, (889, 1333)),   # SA-1B (halved) under MIN_SIZE_TRAIN 1024 / MAX_SIZE_TRAIN 1333: 1024 x 1536 capped
])
def test_detectron2_size_rule_by_hand(height, width, expected):
    short, cap = (1024, 1333) if (height, width) == (750, 1125) else (640, 2560)
    assert keep_ratio_size(height, width, short, cap, rule="detectron2") == expected


def test_detectron2_rule_sets_the_short_side_exactly_where_mmcv_rounds_it():
    # 481 x 641 to short 640: mmcv scales both sides by 640/481 and rounds; detectron2 sets 640 then scales
    assert keep_ratio_size(481, 641, 640, 2560, rule="detectron2")[0] == 640
    h, w = 1001, 333
    d2, mm = keep_ratio_size(h, w, 640, 1333, rule="detectron2"), keep_ratio_size(h, w, 640, 1333, rule="mmcv")
    assert d2 == (1333, int(333 * 1333 / 1001 + 0.5))  # 1924 x 640 capped at 1333
    assert mm == (int(h * 1333 / 1001 + 0.5), int(w * 1333 / 1001 + 0.5))


def test_pil_resize_is_pils_own_call_on_uint8():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    size = keep_ratio_size(97, 131, 64, 2560, rule="detectron2")
    expected = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    ours = protocol_resize(tensor, 64, 2560, None, "pil", "detectron2")
    np.testing.assert_array_equal((ours[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), expected)
    # shrinking: PIL antialiases, torch's bilinear does not, so the two libraries really differ
    torch_resized = protocol_resize(tensor, 64, 2560, None, "torch", "detectron2")
    assert not torch.equal((torch_resized * 255).round(), (ours * 255).round())


def test_fp16_text_equals_open_clips_own_fp16_model_and_leaves_weights_alone(clip):
    texts = ["a photo of a cat.", "itap of a diningtable.", "a origami tvmonitor."]
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    with torch.no_grad():
        fp32 = clip.encode_text(texts)
        with clip.using(DenseOptions(text_precision="fp16")):
            fp16 = clip.encode_text(texts)
        # open_clip's fp16 model: convert_weights_to_lp and LayerNormFp32 in the text tower (its own code path)
        reference = open_clip.create_model("tiny-vit", pretrained=None, precision="fp16", force_quick_gelu=True)
        reference.load_state_dict(clip.model.state_dict())
        expected = reference.eval().encode_text(clip._get_tokenizer()(texts))
    assert fp16.dtype == torch.float16
    torch.testing.assert_close(fp16, expected, rtol=0, atol=0)
    assert (fp16.float() - fp32).abs().max() > 1e-5  # fp16 really is another computation
    assert all(torch.equal(before[k], v) for k, v in clip.model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(clip.encode_text(texts), fp32)  # and the option is scoped


def test_text_precision_is_validated():
    with pytest.raises(ValueError, match="text_precision"):
        load_protocol("pixelclip").settings_for("voc20", {"text_precision": "fp8"})


def test_class_names_are_the_authors_spelling():
    voc = [c[0] for c in read_class_names("pixelclip/voc20")]
    assert voc[10] == "diningtable" and voc[15] == "pottedplant" and voc[19] == "tvmonitor"
    context = [c[0] for c in read_class_names("pixelclip/context59")]
    assert "diningtable" in context and "dining table" not in context
    assert len(context) == 59
