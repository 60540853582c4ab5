"""Tests never touch the network: offline hubs, no albumentations version check, no wandb uploads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def synthetic_root(tmp_path):
    """A data root with small synthetic VOC and ADE datasets in their real layouts."""
    from ovseg.data.synthetic import write_synthetic

    write_synthetic("voc21", tmp_path, num_images=3, seed=1)
    write_synthetic("ade150", tmp_path, num_images=2, seed=2)
    return tmp_path


@pytest.fixture
def interpolate_shapes(monkeypatch) -> list:
    """The output shapes of every ``F.interpolate`` call inside ``ovseg.eval.inference`` during the test (to bound
    how many class channels one upsampling call holds)."""
    from ovseg.eval import inference

    shapes = []
    real = inference.F.interpolate

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(inference.F, "interpolate", spy)
    return shapes
