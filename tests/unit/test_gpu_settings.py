"""GPU-ready loader and matmul settings: pinned memory on CUDA runs only (unless set), persistent workers as set,
and the float32 matmul precision callback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ovseg.data.datamodule import OVSegDataModule
from ovseg.utils.precision import Float32MatmulPrecision


def _with_device(datamodule: OVSegDataModule, device: str) -> OVSegDataModule:
    datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    return datamodule


@pytest.mark.parametrize("setting,device,expected", [(None, "cuda", True), (None, "cpu", False),
                                                     (False, "cuda", False), (True, "cpu", True)])
def test_pin_memory_follows_the_device_unless_set(setting, device, expected):
    assert _with_device(OVSegDataModule(pin_memory=setting), device)._pin_memory() is expected


def test_no_trainer_no_pinning():
    assert OVSegDataModule()._pin_memory() is False


def test_matmul_precision_callback_sets_and_validates():
    before = torch.get_float32_matmul_precision()
    try:
        Float32MatmulPrecision("high").setup(None, None, "fit")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(ValueError, match="must be one of"):
        Float32MatmulPrecision("tf32")
