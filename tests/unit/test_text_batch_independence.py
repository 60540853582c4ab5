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


def test_maskclip_fp16_ensemble_is_made_and_used_as_maskclip_does():
    """prompt_engineering.py zeroshot_classifier: fp16 prompts normalised, averaged and normalised in fp16;
    MaskClipHead.cls_seg uses them without normalising again."""
    from ovseg.methods import MaskCLIP

    torch.manual_seed(0)
    method = MaskCLIP(clip=CLIPConfig(name="tiny-vit", pretrained=None, last_block="value")).eval()
    clip, templates = method.encoder, ["a photo of a {}.", "art of the {}.", "a {} in the scene."]
    options = DenseOptions(text_precision="fp16", text_ensemble_precision="text")
    with clip.using(options):
        ours = method.encode_text(["dog"], templates)[0]
        prompts = clip.encode_text([t.format("dog") for t in templates])
        images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        scaled = method.dense_logits(images, 2 * ours[None])
        plain = method.dense_logits(images, ours[None])
    prompts = prompts / prompts.norm(dim=-1, keepdim=True)
    mean = prompts.mean(dim=0)
    assert torch.equal(ours, (mean / mean.norm()).float())  # every step in fp16, as the reference
    torch.testing.assert_close(scaled, 2 * plain)  # the embedding as made: no re-normalisation
    with clip.using(DenseOptions(text_precision="fp16")):  # PixelCLIP's: the ensemble in fp32, then cosine
        fp32_ensemble = method.encode_text(["dog"], templates)[0]
        torch.testing.assert_close(method.dense_logits(images, 2 * ours[None]), plain / ours.norm())
    torch.testing.assert_close(fp32_ensemble, torch.nn.functional.normalize(prompts.float().mean(0), dim=0))
    assert not torch.equal(fp32_ensemble, ours)
