"""The toy CLIP: pretraining is deterministic and writes open_clip weights; the shipped weights know the words."""

import numpy as np
import pytest
import torch

from ovseg.models.clip import CLIPConfig, DenseCLIP
from ovseg.models.clip_loading import SHIPPED_WEIGHTS
from ovseg.toyworld.generate import CLASSES, generate
from ovseg.toyworld.pretrain import PretrainConfig, pretrain
from ovseg.toyworld.zeroshot import evaluate_recognition

# Measured with the shipped weights on val images 0-119 of the default world (seed 0), see
# ovseg/toyworld/README.md: recall@k 73.0 (chance 24.3), mAP 76.3 (chance 24.3). Asserted with headroom
# (the images and weights are fixed, so the numbers only move with library or platform versions).
MIN_RECALL_AT_K = 60.0
MIN_MAP = 62.0


def test_pretrain_is_deterministic_and_writes_open_clip_weights(tmp_path):
    from safetensors.torch import load_file

    generate(tmp_path / "world", num_train=16, num_val=0, seed=0, size=64, masks=False)
    cfg = PretrainConfig(steps=2, batch_size=8, warmup=1, log_every=1)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    summary = pretrain(tmp_path / "world", first, cfg, log=None)
    pretrain(tmp_path / "world", second, cfg, log=None)
    assert first.read_bytes() == second.read_bytes()
    assert summary["num_train"] == 16 and np.isfinite(summary["final_loss"])

    state = load_file(first)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    used = state["token_embedding.weight"].abs().sum(1) > 0
    # only the tokens of the training captions keep their rows (a few dozen of 49408)
    assert 10 < int(used.sum()) < 200

    clip = DenseCLIP(CLIPConfig(name="toyworld-vit", pretrained=str(first)))
    assert clip.weights_id.startswith("toyworld-vit/file:") and clip.input_size == 64
    tokens = clip._get_tokenizer()(["ball"])[0]
    assert used[tokens[1]]  # the word after the start token
    other = pretrain(tmp_path / "world", tmp_path / "c.safetensors", PretrainConfig(steps=2, batch_size=8, seed=1),
                     log=None)
    assert other["final_loss"] != summary["final_loss"]


def test_shipped_weights_are_registered():
    path = SHIPPED_WEIGHTS[("toyworld-vit", "toyworld")]
    assert path.is_file() and path.stat().st_size < 12e6


def test_shipped_toy_clip_recognises_the_toy_classes(tmp_path):
    torch.set_num_threads(1)
    generate(tmp_path, num_train=0, num_val=120, seed=0, size=96)
    clip = DenseCLIP(CLIPConfig(name="toyworld-vit", pretrained="toyworld"))
    assert clip.weights_id.startswith("toyworld-vit/toyworld#sha256:")
    result = evaluate_recognition(tmp_path, "val", clip)
    assert result.num_images == 120 and len(result.per_class_AP) == len(CLASSES)
    assert result.recall_at_k_chance < 30 and result.mAP_chance < 30
    assert result.recall_at_k >= MIN_RECALL_AT_K, result.line()
    assert result.mAP >= MIN_MAP, result.line()


def test_unknown_shipped_file_is_named(monkeypatch, tmp_path):
    import ovseg.models.clip_loading as clip_module

    monkeypatch.setitem(clip_module.SHIPPED_WEIGHTS, ("toyworld-vit", "missing"), tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="should ship with ovseg"):
        DenseCLIP(CLIPConfig(name="toyworld-vit", pretrained="missing"))
