"""fp16 class embeddings do not depend on the rest of the vocabulary (issue 29): TextBank encodes one class per
text-encoder call, as MaskCLIP's ``zeroshot_classifier`` and PixelCLIP's ``class_embeddings`` do, and half-precision
matrix kernels round differently for other batch sizes (on the CPU at text width 64)."""

import open_clip
import pytest
import torch

from ovseg.models import CLIPConfig, DenseCLIP, TextBank
from ovseg.models.clip import DenseOptions

#: 144 distinct class names (more than a real benchmark's vocabulary chunk of prompts)
NAMES = [f"{colour} {thing}" for colour in ("red", "green", "blue", "small", "large", "old", "wet", "dark", "striped",
                                            "wooden", "metal", "paper")
         for thing in ("car", "dog", "tree", "house", "boat", "chair", "lamp", "road", "sky", "wall", "cup", "bird")]


def _clip(text_width: int, monkeypatch) -> DenseCLIP:
    """Width 64: the shipped trained toy CLIP (its fp16 text output of a prompt alone differs from the same prompt
    in a batch on the CPU; random weights of that width happen not to show it). Width 512: random weights."""
    if text_width == 64:
        return DenseCLIP(CLIPConfig(name="toyworld-vit", pretrained="toyworld")).eval()
    name = f"test-text{text_width}"
    config = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "head_width": 32,
                                               "layers": 1},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": text_width // 64,
                           "layers": 2}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, config)
    torch.manual_seed(0)
    return DenseCLIP(CLIPConfig(name=name, pretrained=None)).eval()


@pytest.mark.parametrize("text_width", [64, 512])
def test_fp16_class_embedding_is_the_same_alone_and_among_144(text_width, monkeypatch):
    assert len(set(NAMES)) == 144
    clip = _clip(text_width, monkeypatch)
    assert clip.model.transformer.width == text_width
    with clip.using(DenseOptions(text_precision="fp16")):
        together = TextBank(clip.encode_text, "single").embed(NAMES)
        for index in range(len(NAMES)):
            alone = TextBank(clip.encode_text, "single").embed([NAMES[index]])
            assert torch.equal(alone[0], together[index]), f"{NAMES[index]!r} at text width {text_width}"


def test_fp16_text_tower_is_reused_until_a_weight_changes(monkeypatch):
    clip = _clip(64, monkeypatch)
    texts = ["a photo of a dog."]
    with clip.using(DenseOptions(text_precision="fp16")):
        first = clip.encode_text(texts)
        copy = clip._fp16_text_model()
        assert clip._fp16_text_model() is copy  # one copy for all the classes of a vocabulary
        with torch.no_grad():
            clip.model.text_projection.mul_(2)  # in place, as an optimiser step or load_state_dict
        torch.testing.assert_close(clip.encode_text(texts), 2 * first, rtol=2e-3, atol=0)
        assert clip._fp16_text_model() is not copy
        clip.clear_cache()
        assert clip._fp16_text_model() is not copy
