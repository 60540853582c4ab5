"""The ``synonyms`` protocol setting: ``max`` (each synonym its own query) or ``mean_embedding`` (CAT-Seg's and
PixelCLIP's ``class_embeddings``: per template the mean of the synonyms' unit embeddings, re-normalised, then the
template mean), checked against a float64 numpy recomputation on hand-built embeddings."""

import numpy as np
import pytest
import torch

from ovseg.eval.evaluator import Evaluator, Vocabulary, dense_options
from ovseg.eval.protocols import ProtocolSettings, load_protocol
from ovseg.models.text import TextBank

TEMPLATES = ["a photo of a {}.", "art of the {}.", "itap of a {}."]
WORDS = ["building", "edifice", "house", "sky", "road", "route"]


def _hand_built_encoder(dim: int = 6):
    """Prompt -> a fixed random vector (not unit length), the same vector every time it is asked for."""
    rng = np.random.default_rng(3)
    table = {t.format(w): rng.normal(size=dim) * rng.uniform(0.5, 3) for t in TEMPLATES for w in WORDS}
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.tensor(np.stack([table[t] for t in texts]), dtype=torch.float32)

    return table, encode, calls


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _expected(table, synonyms):
    """class_embeddings by hand: per template, the unit prompt embeddings of the synonyms averaged and
    re-normalised; then the mean over templates, re-normalised (their test branch)."""
    per_template = []
    for template in TEMPLATES:
        mean = np.zeros_like(table[template.format(synonyms[0])])
        for word in synonyms:
            mean += _unit(table[template.format(word)]) / len(synonyms)
        per_template.append(_unit(mean))
    return _unit(np.mean(per_template, axis=0))


def test_mean_embedding_is_per_template_synonym_mean_then_template_mean():
    table, encode, calls = _hand_built_encoder()
    bank = TextBank(encode, TEMPLATES)
    classes = [("building", "edifice", "house"), "sky", ("road", "route")]
    ours = bank.embed(classes).double().numpy()
    for row, names in zip(ours, classes):
        names = (names,) if isinstance(names, str) else names
        np.testing.assert_allclose(row, _expected(table, names), rtol=0, atol=1e-6)
    # one encoder call per class, template-major as class_embeddings builds its batch
    assert calls[0] == [t.format(w) for t in TEMPLATES for w in ("building", "edifice", "house")]
    # the per-template re-normalisation matters: the flat mean over all prompts is another vector
    flat = _unit(np.mean([_unit(table[t.format(w)]) for t in TEMPLATES for w in ("road", "route")], axis=0))
    assert np.abs(ours[2] - flat).max() > 1e-3
    # and one synonym is the plain prompt ensemble
    np.testing.assert_array_equal(ours[1], bank.embed(["sky"]).double().numpy()[0])


def test_vocabulary_queries_per_setting():
    names = [["wall"], ["building", "edifice"], ["sky"]]
    maximum = Vocabulary(names)
    assert maximum.queries == ["wall", "building", "edifice", "sky"]
    assert maximum.query_to_class.tolist() == [0, 1, 1, 2]
    mean = Vocabulary(names, "mean_embedding")
    assert mean.queries == ["wall", ("building", "edifice"), "sky"]
    assert mean.query_to_class.tolist() == [0, 1, 2]


def test_setting_is_validated_and_pixelclip_averages_where_sclip_takes_the_max():
    with pytest.raises(ValueError, match="synonyms"):
        ProtocolSettings(synonyms="mean")
    pixelclip = load_protocol("pixelclip")
    assert pixelclip.version == 5
    assert pixelclip.settings_for("ade847").synonyms == "mean_embedding"
    assert pixelclip.settings_for("pc459").synonyms == "mean_embedding"
    assert load_protocol("pixelclip_masks").settings_for("ade847").synonyms == "mean_embedding"
    assert load_protocol("sclip").settings_for("ade847").synonyms == "max"


def test_evaluator_sends_one_averaged_query_per_class_under_pixelclip():
    """Through the evaluator and a dense CLIP (fp16 text under the protocol): the class text is the numpy mean of
    the encoder's own prompt embeddings, and a prediction runs on one score map per class."""
    from ovseg.methods import MaskCLIP
    from ovseg.models.clip import CLIPConfig

    torch.manual_seed(0)
    method = MaskCLIP(clip=CLIPConfig(name="tiny-vit", pretrained=None, last_block="value"))
    evaluator = Evaluator(load_protocol("pixelclip"), {"class_names": "{dataset}", "templates": TEMPLATES})
    names = [["wall"], ["building", "edifice", "house"], ["sky"]]
    entry = evaluator.add_dataset(method, "ade847", names, None, torch.device("cpu"))
    assert entry.text.shape[0] == 3 and entry.settings.text_precision == "fp16"
    with dense_options(method, entry.settings), torch.no_grad():
        table = {t.format(w): method.encoder.encode_text([t.format(w)])[0].double().numpy()
                 for t in TEMPLATES for w in ("wall", "building", "edifice", "house", "sky")}
    for row, synonyms in zip(entry.text.double().numpy(), names):
        np.testing.assert_allclose(row, _expected(table, synonyms), rtol=0, atol=3e-3)  # fp16 prompt embeddings
    image = torch.rand(3, 37, 45)
    pred = evaluator.predict(method, entry, image, (37, 45))
    assert pred.shape == (37, 45) and int(pred.max()) <= 2
