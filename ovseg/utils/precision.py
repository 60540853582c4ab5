"""Numerics that must stay in float32 under mixed precision (``Trainer(precision="bf16-mixed")``).

Lightning's bf16-mixed keeps float32 master weights and runs the forward under ``torch.autocast``, which casts every
matmul to bfloat16 (8 bits of mantissa). Where similarities are divided by a small temperature or multiplied by a
large one (PixelCLIP's Sinkhorn logits: ε = 100 × cosine; CLIP-S4's softmaxes at τ = 0.01–0.1) a bfloat16 rounding
of 2⁻⁸ becomes an error of ~0.4 in a logit, and ``exp`` of ε-scaled logits overflows half precision outright, so
those parts run in :func:`float32` blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import lightning as L
import torch


@contextmanager
def float32(device: torch.device | str) -> Iterator[None]:
    """Autocast off on ``device``'s type for the block: matmuls run in the inputs' dtype (cast them with
    ``.float()``)."""
    device_type = torch.device(device).type
    with torch.autocast(device_type=device_type, enabled=False):
        yield


class Float32MatmulPrecision(L.Callback):
    """``torch.set_float32_matmul_precision`` for the run: ``high`` lets float32 matmuls use TF32 tensor cores on
    Ampere and later GPUs (PixelCLIP's train_net.py ``main`` sets it), ``highest`` is torch's default. Set where a
    Trainer runs (each DDP process), so it is part of the config rather than a global side effect of importing."""

    PRECISIONS = ("highest", "high", "medium")

    def __init__(self, precision: str = "high"):
        if precision not in self.PRECISIONS:
            raise ValueError(f"float32 matmul precision must be one of {self.PRECISIONS}, got {precision!r}")
        self.precision = precision

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_float32_matmul_precision(self.precision)
