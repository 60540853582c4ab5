"""ITACLIP (ovseg.methods.itaclip, the ``itaclip`` protocol) against independent float64 re-computations of its
released code's formulas on a small non-square grid: the last block (self-self maps of the last and intermediate
blocks, mixed, token residual, no MLP), the image-engineering views and their combination, the auxiliary-text
mixing of the evaluator, and the label closing."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.eval.evaluator import Evaluator
from ovseg.eval.inference import close_labels
from ovseg.eval.protocols import load_protocol
from ovseg.methods.itaclip import ITACLIP, engineered_logits
from ovseg.models.clip import CLIPConfig
from tests.unit.clip_float64 import d, grid_images, heads, layer_norm, softmax_rows
from tests.unit.test_resclip import _block_inputs

GRID = (5, 7)  # rows, cols: non-square
LAYERS = (1, 2)  # the toy CLIP's 4 blocks: the two between the first and the last


def _tiny(**kwargs) -> ITACLIP:
    torch.manual_seed(0)
    clip = CLIPConfig(name="toyworld-vit", pretrained=None, residual="token", ffn=False)
    return ITACLIP(clip=clip, **{"intermediate_layers": LAYERS, **kwargs}).eval()


def _reference_tokens(method: ITACLIP, images: torch.Tensor, self_self: bool = True) -> np.ndarray:
    """float64 with loops over images and heads: clip/model.py VisionTransformer.forward (custom_attn maps of blocks
    ``LAYERS`` at their inputs and of the last block, ``0.5 * last + 0.5 * mean``, ``x + out_proj(A v)``, ln_post,
    proj)."""
    encoder = method.encoder
    visual = encoder.model.visual
    blocks = visual.transformer.resblocks
    x_norm = encoder.normalize(images)
    encoder.last_stage = None  # the plain blocks, to capture their inputs
    inputs = _block_inputs(encoder, x_norm)
    encoder.last_stage = method._last_stage
    last_in = blocks[-2](inputs[-1]).detach().double().numpy()

    def attention_map(block, x):
        qs, ks, _ = heads(block, x)
        maps = []
        for q, k in zip(qs, ks):
            s = 1 / math.sqrt(q.shape[-1])
            maps.append(softmax_rows(q @ q.T * s) + softmax_rows(k @ k.T * s) if self_self
                        else softmax_rows(q @ k.T * s))
        return maps

    out = []
    for b in range(images.shape[0]):
        mid = [attention_map(blocks[i], d(inputs[i][b])) for i in LAYERS]
        last = blocks[-1]
        last_maps = attention_map(last, last_in[b])
        _, _, vs = heads(last, last_in[b])
        attended = np.concatenate([(0.5 * last_maps[j] + 0.5 * (mid[0][j] + mid[1][j]) / 2) @ vs[j]
                                   for j in range(len(vs))], axis=-1)
        x = last_in[b] + attended @ d(last.attn.out_proj.weight).T + d(last.attn.out_proj.bias)
        out.append(layer_norm(x, visual.ln_post) @ d(visual.proj))
    return np.stack(out)


@pytest.mark.parametrize("self_self", [True, False])
def test_last_stage_equals_float64_loop_reference(self_self):
    method = _tiny(self_self=self_self)
    images = grid_images(method, GRID)
    with torch.no_grad():
        ours = method.encoder.encode_tokens(method.encoder.normalize(images)).double().numpy()
        theirs = _reference_tokens(method, images, self_self)
    assert ours.shape == (2, 1 + GRID[0] * GRID[1], theirs.shape[-1])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())


def _gray(x: np.ndarray) -> np.ndarray:
    """T.Grayscale on [3, H, W]: 0.2989 r + 0.587 g + 0.114 b, repeated to 3 channels."""
    return np.repeat((0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None], 3, axis=0)


def _blur(x: np.ndarray, size: int = 11, sigma: float = 5.0) -> np.ndarray:
    """T.GaussianBlur(11, 5) on [3, H, W]: separable normalised Gaussian taps, reflect padding, loops over taps."""
    half = size // 2
    taps = np.exp(-0.5 * (np.linspace(-half, half, size) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(x, ((0, 0), (half, half), (half, half)), mode="reflect")
    height, width = x.shape[-2:]
    out = np.zeros_like(x)
    for i in range(size):
        for j in range(size):
            out += taps[i] * taps[j] * padded[:, i:i + height, j:j + width]
    return out


def test_image_engineering_equals_float64_reference():
    """dense_logits: views built independently (numpy gray, blur, flips), each encoded alone, combined in float64:
    mean of normalised features of (x, gray, blur) · text, c · that + (1 - c) · mean of the flips' logits flipped
    back (itaclip_segmentor.py forward_feature)."""
    method = _tiny()
    images = grid_images(method, GRID)
    torch.manual_seed(2)
    text = torch.randn(4, method.encoder.embed_dim) * 0.1  # not unit norm: used as given
    with torch.no_grad(), method.scoring("voc21"):
        ours = method.dense_logits(images, text).double().numpy()
        x = method.encoder.normalize(images).double().numpy()
        t = text.double().numpy()
        theirs = []
        for b in range(images.shape[0]):
            def features(view: np.ndarray) -> np.ndarray:
                f = method.encoder.encode_dense(torch.from_numpy(view[None]).float())[0].double().numpy()
                return f / np.sqrt((f**2).sum(axis=0, keepdims=True))

            mean = sum(features(v) for v in (x[b], _gray(x[b]), _blur(x[b]))) / 3
            logits = np.einsum("dhw,qd->qhw", mean, t)
            flips = (np.einsum("dhw,qd->qhw", features(x[b][:, ::-1].copy()), t)[:, ::-1]
                     + np.einsum("dhw,qd->qhw", features(x[b][:, :, ::-1].copy()), t)[:, :, ::-1]) / 2
            theirs.append(0.7 * logits + 0.3 * flips)  # voc21's img_eng_coefficient
    np.testing.assert_allclose(ours, np.stack(theirs), rtol=0, atol=2e-5 * np.abs(theirs).max())
    with torch.no_grad(), method.scoring("somewhere"):  # other datasets: the segmentor's default 0.75
        assert method.current == 0.75


def test_engineered_logits_combination_with_loops():
    torch.manual_seed(3)
    views = [torch.randn(1, 3, *GRID) for _ in range(3)]
    flips = [torch.randn(1, 3, *GRID) for _ in range(2)]
    text = torch.randn(2, 3)
    ours = engineered_logits(views, flips, text, 0.6).double().numpy()[0]
    unit = lambda f: f.double().numpy()[0] / np.linalg.norm(f.double().numpy()[0], axis=0)  # noqa: E731
    expected = np.zeros((2, *GRID))
    rows, cols = GRID
    for q in range(2):
        for r in range(rows):
            for c in range(cols):
                mean = sum(unit(v)[:, r, c] for v in views) / 3
                vflip = unit(flips[0])[:, rows - 1 - r, c] @ text[q].double().numpy()
                hflip = unit(flips[1])[:, r, cols - 1 - c] @ text[q].double().numpy()
                expected[q, r, c] = 0.6 * (mean @ text[q].double().numpy()) + 0.4 * (vflip + hflip) / 2
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


class _TextStub(torch.nn.Module):
    """encode_text: a fixed pseudo-random unit vector per name, its whitespace cleaned as CLIP's tokenizer cleans it
    (``whitespace_clean``: their ``"sky "`` and ovseg's ``"sky"`` are the same tokens)."""

    device = torch.device("cpu")

    def encode_text(self, names, templates):
        rows = []
        for name in names:
            name = " ".join(name.split())
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(name)))
            rows.append(F.normalize(torch.randn(8, generator=g), dim=0))
        return torch.stack(rows)


def test_auxiliary_texts_are_mixed_per_class_and_skip_the_background(tmp_path):
    aux = tmp_path / "aux.txt"
    aux.write_text("cat >=a small feline.\ndog >=a loyal, barking animal\n")
    protocol = load_protocol("itaclip")
    evaluator = Evaluator(protocol, {"class_names": "{dataset}", "auxiliary_texts": str(aux),
                                     "auxiliary_weight": 0.2})
    names = [["background", "sky"], ["cat", "kitty"], ["dog"]]
    stub = _TextStub()
    entry = evaluator.add_dataset(stub, "mine", names, 0, torch.device("cpu"))
    own = stub.encode_text(["background", "sky", "cat", "kitty", "dog"], [])
    a_cat, a_dog = stub.encode_text(["a small feline.", "a loyal, barking animal"], [])
    expected = [own[0], own[1], 0.8 * own[2] + 0.2 * a_cat, 0.8 * own[3] + 0.2 * a_cat, 0.8 * own[4] + 0.2 * a_dog]
    torch.testing.assert_close(entry.text, torch.stack(expected), rtol=0, atol=1e-7)
    # a file of another class list fails naming the class
    aux.write_text("dog >=x\ncat >=y\n")
    with pytest.raises(ValueError, match="class 1 \\('cat'\\) names 'dog'"):
        evaluator.add_dataset(stub, "mine2", names, 0, torch.device("cpu"))
    aux.write_text("cat >=y\n")
    with pytest.raises(ValueError, match="1 lines for 3 classes"):
        evaluator.add_dataset(stub, "mine3", names, 0, torch.device("cpu"))


def _reference_mixing(class_file: str, aux_file: str, weight: float, background: bool, encode) -> np.ndarray:
    """float64 re-computation of itaclip_segmentor.py ``__init__``'s text: ``get_cls_idx`` (", "-separated names per
    line, newlines dropped), ``get_aux_text`` (each line without its newline, the part after ``>=``), and per query
    ``(1 - w) · own + w · aux[class]``; with ``background`` (their voc21 / context60 / coco_object) the file skips the
    background class 0, whose queries come first and keep their own embedding, ``aux[class - 1]`` for the rest."""
    names, query_idx = [], []
    for idx, line in enumerate(class_file.split("\n")):
        for name in line.split(", "):
            names.append(name.replace("\n", ""))
            query_idx.append(idx)
    aux = [line.replace("\n", "").split(">=")[1] for line in aux_file.splitlines(keepends=True)]
    own = encode(names).double().numpy()
    aux_features = encode(aux).double().numpy()
    out = np.zeros_like(own)
    for q, c in enumerate(query_idx):
        if background and c == 0:
            out[q] = own[q]
        else:
            out[q] = (1 - weight) * own[q] + weight * aux_features[c - 1 if background else c]
    return out


@pytest.mark.parametrize("background", [False, True])
def test_synonym_file_mixing_equals_float64_reference(tmp_path, background):
    """A synonyms file as Cityscapes' (one ``name >=synonym`` line per class, no background) and as COCO-Object's
    (every class but the background): each of a class's queries is mixed with its class's synonym."""
    classes = ["road, street", "sidewalk", "traffic light, signal, stoplight", "sky "]
    synonyms = ["road >=highway", "sidewalk >= path, walkway", "traffic light >=signal>=lamp", "sky  >=heavens"]
    if background:
        classes = ["background, wall"] + classes
    aux = tmp_path / "synonyms.txt"
    aux.write_text("\n".join(synonyms) + "\n")
    class_file = tmp_path / "mine.txt"
    class_file.write_text("\n".join(classes))
    evaluator = Evaluator(load_protocol("itaclip"), {"class_names": str(class_file), "auxiliary_texts": str(aux),
                                                     "auxiliary_weight": 0.05})
    stub = _TextStub()
    names = [c.split(", ") for c in classes]
    entry = evaluator.add_dataset(stub, "mine", names, 0 if background else None, torch.device("cpu"))
    expected = _reference_mixing(class_file.read_text(), aux.read_text(), 0.05, background,
                                 lambda words: stub.encode_text(words, []))
    np.testing.assert_allclose(entry.text.double().numpy(), expected, rtol=0, atol=1e-7)


def test_evaluator_scores_each_dataset_with_its_image_coefficient(monkeypatch, tmp_path):
    """The evaluator's dense scores run inside ``scoring(dataset)``: the configs' ``img_eng_coefficient`` (0.7 for
    cfg_voc21.py / cfg_cityscapes.py, 0.75 for the rest) is the one the views are mixed with (two words and one
    window keep it light)."""
    import ovseg.methods.itaclip as itaclip_module

    used = []

    def recording(views, flips, text, image_coefficient):
        used.append(image_coefficient)
        return engineered_logits(views, flips, text, image_coefficient)

    monkeypatch.setattr(itaclip_module, "engineered_logits", recording)
    method = _tiny()
    words = tmp_path / "words.txt"
    words.write_text("road\nsky\n")
    evaluator = Evaluator(load_protocol("itaclip"), {
        "short_side": 48, "crop": 48, "stride": 48, "pamr_steps": 0, "templates": "single",
        "class_names": str(words), "auxiliary_weight": 0.0, "prob_threshold": None, "area_threshold": None})
    image = torch.rand(3, 48, 64)
    for dataset, coefficient in [("cityscapes", 0.7), ("coco_stuff171", 0.75), ("voc21", 0.7), ("context60", 0.75)]:
        entry = evaluator.add_dataset(method, dataset, [["road"], ["sky"]], None, torch.device("cpu"))
        used.clear()
        evaluator.predict(method, entry, image, (48, 64))
        assert used and set(used) == {coefficient}, dataset
    assert method.current == 0.75  # the default again outside the block


def test_itaclip_protocol_reads_the_released_settings():
    protocol = load_protocol("itaclip")
    voc = protocol.settings_for("voc21")
    assert (voc.stride, voc.crop, voc.logit_scale, voc.prob_threshold, voc.area_threshold) == (28, 224, 60, 0.1, 0.1)
    assert (voc.auxiliary_texts, voc.auxiliary_weight, voc.pamr_steps, voc.label_closing) == (
        "itaclip/voc21_definitions", 0.05, 10, 3)
    stuff = protocol.settings_for("coco_stuff171")
    assert (stuff.short_side, stuff.logit_scale, stuff.auxiliary_weight, stuff.class_names) == (
        448, 40, 0.2, "itaclip/coco_stuff171")
    # the shipped files line up with ovseg's datasets (names checked line by line)
    from ovseg.data.auxiliary_texts import class_auxiliary_texts
    from ovseg.data.classnames import read_class_names
    from ovseg.data.specs import get_spec

    for dataset in ("voc21", "context60", "coco_object", "coco_stuff171", "cityscapes"):
        s = protocol.settings_for(dataset)
        names = read_class_names(s.class_names)
        texts = class_auxiliary_texts(s.auxiliary_texts, names, get_spec(dataset).background_index)
        assert len(names) == len(get_spec(dataset).class_names)
        assert sum(t is None for t in texts) == (get_spec(dataset).background_index is not None)


def test_label_closing_equals_cv2_morphology():
    generator = torch.Generator().manual_seed(0)
    for shape in [(37, 53), (6, 5), (1, 9)]:
        labels = torch.randint(0, 7, shape, generator=generator)
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
        expected = cv2.morphologyEx(labels.numpy().astype(np.uint8), cv2.MORPH_CLOSE, kernel)
        np.testing.assert_array_equal(close_labels(labels, 3).numpy(), expected)
    with pytest.raises(ValueError, match="odd"):
        load_protocol("itaclip").settings_for("voc21", {"label_closing": 2})


def test_bad_settings_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="intermediate_layers"):
        _tiny(intermediate_layers=(0, 1))
    with pytest.raises(ValueError, match="auxiliary_weight"):
        load_protocol("itaclip").settings_for("voc21", {"auxiliary_weight": 1.5})


def test_parity_harness_loads_their_clip_in_fp32_on_any_device():
    """ovseg.parity.itaclip.fp32_clip_load: their ``clip.load`` gives ``.float()`` of what it built (on CUDA OpenAI's
    loader keeps fp16 weights) while the block runs, and is their own function again afterwards."""
    from types import SimpleNamespace

    from ovseg.parity.itaclip import fp32_clip_load

    def load(name, device="cuda", jit=False):
        return torch.nn.Linear(2, 2).half(), f"preprocess {name} {device} {jit}"

    clip_module = SimpleNamespace(load=load)
    with fp32_clip_load(clip_module):
        model, preprocess = clip_module.load("w.pt", device="cuda:0", jit=False)
    assert model.weight.dtype == torch.float32 and preprocess == "preprocess w.pt cuda:0 False"
    assert clip_module.load is load
