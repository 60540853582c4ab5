"""``ovseg demo`` without a browser: its predictions are ``ovseg predict``'s (same config, image, words, checkpoint),
a second vocabulary on an image reuses the image features and changes nothing, and a bad image, empty words or a
path the page did not receive get one line, never a file read."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.cli import main
from ovseg.demo.commands import trainer_args
from ovseg.demo.engine import DemoEngine, DemoError, LoadedMethod, ProtocolChoice
from ovseg.toyworld.generate import make_image

REPO = Path(__file__).resolve().parents[2]
MASKCLIP = "configs/toyworld/maskclip.yaml"
KSPD = "configs/toyworld/maskclip_kspd.yaml"  # features and keys: a tuple kept across vocabularies
WORDS_A = "sky, grass;lawn, water, ball"
WORDS_B = "sky;heaven, tree, box, sand, road"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two toy-world val images; one stored on its side with an EXIF tag turning it upright (as phones do)."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "val_000003.jpg").write_bytes(make_image(0, "val", 3).jpeg)
    turned = np.asarray(Image.open(io.BytesIO(make_image(0, "val", 7).jpeg)))[:, :80]  # 96x80: not square
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(turned))).save(folder / "phone.jpg", exif=exif, quality=95)
    return folder


def predict_labels(config: str, images: Path, words: str, out: Path, *extra: str) -> dict[str, np.ndarray]:
    main(["predict", "--config", str(REPO / config), "--images", str(images), "--classes", words,
          "--model.init_args.predict_dir", str(out), "--trainer.default_root_dir", str(out),
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra])
    return {p.name.removesuffix("_label.png"): np.asarray(Image.open(p)) for p in out.glob("*_label.png")}


@pytest.fixture(scope="module")
def engine(images) -> DemoEngine:
    methods = [LoadedMethod.load(str(REPO / c), None, trainer_args("cpu")) for c in (MASKCLIP, KSPD)]
    return DemoEngine(methods, images=images)


def test_demo_predictions_are_ovseg_predicts(engine, images, tmp_path):
    assert sorted(engine.image_ids) == ["phone", "val_000003"]
    expected = {MASKCLIP: predict_labels(MASKCLIP, images, WORDS_A, tmp_path / "a"),
                KSPD: predict_labels(KSPD, images, WORDS_A, tmp_path / "b")}
    kspd_b = predict_labels(KSPD, images, WORDS_B, tmp_path / "c")
    for image_id in engine.image_ids:
        pixels = engine.listed_image(image_id)
        results = engine.run(pixels, WORDS_A)
        assert [r.method for r in results] == ["MaskCLIP", "MaskCLIP"]
        for result, config in zip(results, (MASKCLIP, KSPD)):
            reference = expected[config][image_id]
            assert result.pred.shape == reference.shape == pixels.shape[:2]
            assert np.array_equal(result.pred, reference), (config, image_id)
            assert np.array_equal(np.asarray(Image.open(result.label_png)), reference)  # the page's download
            assert len(result.shares) == len(np.unique(reference))
        # a second vocabulary on the same image: the image side is reused, the labels are still predict's
        (_, second) = engine.run(pixels, WORDS_B)
        assert second.features_reused
        assert np.array_equal(second.pred, kspd_b[image_id])
        assert second.class_names == ["sky", "tree", "box", "sand", "road"]
    assert engine.listed_image("phone").shape == (96, 80, 3)  # turned upright as predict turns it


def test_features_are_reused_only_for_the_same_image_and_protocol(engine, images):
    pixels = engine.listed_image("val_000003")
    first = engine.run(pixels, "star, flower, fish")
    cache = engine.methods[0].predictor(ProtocolChoice()).evaluator.feature_cache
    misses = cache.misses
    again = engine.run(pixels, "cloud, sun, snow, car")
    assert cache.misses == misses and all(r.features_reused for r in again)
    other = engine.run(np.ascontiguousarray(pixels[::-1]), "cloud, sun, snow, car")
    assert cache.misses == misses + 1 and not other[0].features_reused
    slide = engine.run(pixels, "star, flower, fish", ProtocolChoice(mode="slide", crop=64, stride=32))
    assert not slide[0].features_reused and "slide 64/32" in slide[0].protocol
    assert "whole image" in first[0].protocol and "protocol toyworld" in first[0].protocol
    # without the cache (what `ovseg predict` runs), the same labels
    loaded = engine.methods[0]
    plain = loaded.predictor(ProtocolChoice())
    plain.evaluator.feature_cache = None
    try:
        fresh = loaded.predict(torch.from_numpy(pixels.transpose(2, 0, 1).copy()), [["cloud"], ["sun"], ["snow"],
                                                                                  ["car"]], ProtocolChoice())
    finally:
        plain.evaluator.feature_cache = cache
    assert np.array_equal(fresh.numpy(), again[0].pred)


def test_checkpoint_weights_are_loaded_as_predict_loads_them(images, tmp_path):
    method = LoadedMethod.load(str(REPO / MASKCLIP), None, trainer_args("cpu")).method
    state = {k: v.clone() for k, v in method.state_dict().items()}
    proj = next(k for k in state if k.endswith("visual.proj"))
    state[proj] = state[proj] * -1.0 + 0.01 * torch.randn_like(state[proj])  # weights unlike the shipped ones
    import lightning

    ckpt = tmp_path / "changed.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {}, "pytorch-lightning_version": lightning.__version__},
               ckpt)
    expected = predict_labels(MASKCLIP, images, WORDS_A, tmp_path / "p", "--ckpt_path", str(ckpt))
    untouched = predict_labels(MASKCLIP, images, WORDS_A, tmp_path / "q")
    engine = DemoEngine([LoadedMethod.load(str(REPO / MASKCLIP), str(ckpt), trainer_args("cpu"))], images=images)
    assert engine.methods[0].weights == f"checkpoint:{ckpt}"
    changed = False
    for image_id in engine.image_ids:
        (result,) = engine.run(engine.listed_image(image_id), WORDS_A)
        assert np.array_equal(result.pred, expected[image_id])
        changed |= not np.array_equal(result.pred, untouched[image_id])
    assert changed  # the checkpoint mattered: the test would see weights left unloaded


def test_bad_inputs_are_one_line_and_nothing_outside_the_uploads_is_read(engine, tmp_path):
    pixels = engine.listed_image("val_000003")
    for words in ("", "  ", " , ;, ", None):
        with pytest.raises(DemoError, match="no class names"):
            engine.run(pixels, words)
    with pytest.raises(DemoError, match="given twice"):
        engine.run(pixels, "cat, Cat")
    assert engine.vocabulary("labels.txt") == [["labels.txt"]]  # typed words are words, never a file to open
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DemoError, match="cannot decode") as err:
        engine.uploaded_image(uploads / "broken.png", uploads)
    assert "\n" not in str(err.value)
    secret = tmp_path / "secret.png"
    Image.fromarray(pixels).save(secret)
    for path in (secret, uploads / ".." / "secret.png", "/etc/passwd"):
        with pytest.raises(DemoError, match="not an upload of this page"):
            engine.uploaded_image(path, uploads)
    Image.fromarray(pixels).save(uploads / "fine.png")
    assert np.array_equal(engine.uploaded_image(uploads / "fine.png", uploads), pixels)
    small = DemoEngine(engine.methods, max_upload_mb=0.001)
    with pytest.raises(DemoError, match="larger than"):
        small.uploaded_image(uploads / "fine.png", uploads)
    with pytest.raises(DemoError, match="unknown image"):
        engine.listed_image("../secret")
    with pytest.raises(DemoError, match="crop and a stride"):
        engine.run(pixels, "sky", ProtocolChoice(mode="slide", crop=32, stride=64))


def test_demo_without_gradio_says_which_extra_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["demo", "--config", MASKCLIP]) == 1
    assert "pip install 'ovseg[demo]'" in capsys.readouterr().out


def test_ckpt_path_belongs_to_the_config_before_it():
    from ovseg.cli import build_command_parser

    ns = build_command_parser(only="demo").parse_args(
        ["demo", "--config", "a.yaml", "--config", "b.yaml", "--ckpt_path", "b.ckpt", "--port", "0"])
    assert ns.methods == [{"config": "a.yaml", "ckpt_path": None}, {"config": "b.yaml", "ckpt_path": "b.ckpt"}]
    assert ns.host == "127.0.0.1"
    with pytest.raises(SystemExit):
        build_command_parser(only="demo").parse_args(["demo", "--ckpt_path", "x.ckpt", "--config", "a.yaml"])


TOY_CONFIGS = sorted(p.name for p in (REPO / "configs/toyworld").glob("*.yaml"))


@pytest.mark.parametrize("config", TOY_CONFIGS)
def test_a_method_that_reuses_features_splits_dense_logits_exactly(config):
    # the page reuses dense_features across vocabularies for these methods: the split must be the whole method
    # (a method whose image side reads the words, e.g. ResCLIP's semantic feedback, must say reuses_features False)
    method = LoadedMethod.load(str(REPO / "configs/toyworld" / config), None, trainer_args("cpu")).method.eval()
    if not method.reuses_features:
        pytest.skip(f"{type(method).__name__} does not reuse image features")
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        features = method.dense_features(images)
        first = features
        while isinstance(first, (tuple, list)):  # (features, keys) of MaskCLIP, (views, flips) of ITACLIP
            first = first[0]
        dim = first.shape[1]
        text = torch.nn.functional.normalize(torch.randn(5, dim), dim=-1)
        whole = method.dense_logits(images, text)
        split = method.logits_from_features(features, text)
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
