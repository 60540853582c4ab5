"""Template sets and the cached prompt-ensemble text bank."""

import zlib

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from ovseg.models.text import TEMPLATES, TextBank, get_templates

DIM = 16


class CountingEncoder:
    """A deterministic fake text encoder: a fixed random vector per text, and a log of every call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def vector(self, text: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return torch.randn(DIM, generator=generator) * 3 + 1  # far from unit norm on purpose

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([self.vector(t) for t in texts])


def test_template_sets():
    assert {name: len(t) for name, t in TEMPLATES.items()} == {"clip80": 80, "maskclip85": 85, "pixelclip8": 8,
                                                                "single": 1}
    assert TEMPLATES["clip80"] == [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    assert TEMPLATES["clip80"][0] == "a bad photo of a {}."
    assert TEMPLATES["maskclip85"][:80] == TEMPLATES["clip80"]
    assert TEMPLATES["maskclip85"][80:] == ["there is a {} in the scene.", "there is the {} in the scene.",
                                           "this is a {} in the scene.", "this is the {} in the scene.",
                                           "this is one {} in the scene."]
    assert TEMPLATES["pixelclip8"][-1] == "A photo of a {} in the scene"
    assert all(t.count("{}") == 1 for templates in TEMPLATES.values() for t in templates)


def test_get_templates():
    assert get_templates("single") == ["a photo of a {}."]
    assert get_templates(["{} here", "a {}"]) == ["{} here", "a {}"]
    get_templates("clip80").append("mutating a copy")
    assert len(TEMPLATES["clip80"]) == 80
    with pytest.raises(ValueError, match="pixelclip8"):
        get_templates("clip81")
    with pytest.raises(ValueError, match="{}"):
        get_templates(["no placeholder"])


def test_ensemble_equals_manual_computation():
    encoder = CountingEncoder()
    templates = TEMPLATES["pixelclip8"]
    bank = TextBank(encoder, "pixelclip8")
    names = ["cat", "traffic light", "sky"]
    out = bank.embed(names)

    expected = []
    for name in names:
        per_template = [F.normalize(encoder.vector(t.format(name)), dim=0) for t in templates]
        expected.append(F.normalize(torch.stack(per_template).mean(0), dim=0))
    torch.testing.assert_close(out, torch.stack(expected))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_cache_hits_do_not_call_the_encoder():
    encoder = CountingEncoder()
    bank = TextBank(encoder, "single")
    first = bank.embed(["cat", "dog", "cat"])
    # one call per class (its templates are the batch), each class once
    assert encoder.calls == [["a photo of a cat."], ["a photo of a dog."]]

    again = bank.embed(["dog", "cat", "dog"])  # order and duplicates follow the request
    assert len(encoder.calls) == 2
    torch.testing.assert_close(again, first[[1, 0, 1]])
    torch.testing.assert_close(first[0], first[2])

    bank.embed(["cat", "bird"])  # only the new name is encoded
    assert encoder.calls[-1] == ["a photo of a bird."]

    bank.embed(["cat"], templates=["art of the {}."])  # another template set is another cache entry
    assert encoder.calls[-1] == ["art of the cat."]
    assert len(bank) == 4

    bank.clear()
    bank.embed(["cat"])
    assert len(encoder.calls) == 5


def test_with_tiny_clip_text_encoder():
    from ovseg.models import CLIPConfig, DenseCLIP

    torch.manual_seed(0)
    model = DenseCLIP(CLIPConfig(name="tiny-vit", pretrained=None)).eval()
    bank = TextBank(model.encode_text, ["a photo of a {}.", "art of the {}."])
    with torch.no_grad():
        raw = F.normalize(model.encode_text(["a photo of a cat.", "art of the cat."]), dim=-1)
    torch.testing.assert_close(bank.embed(["cat"])[0], F.normalize(raw.mean(0), dim=0), atol=1e-6, rtol=0)
