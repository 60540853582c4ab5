"""bf16-mixed training of the tiny PixelCLIP and CLIP-S4 configs on the CPU: it runs, and its losses stay close to
float32's (the parts that must stay float32 do: PixelCLIP's Sinkhorn logits, CLIP-S4's low-temperature losses)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from ovseg.data.sa1b import write_synthetic_sa1b
from ovseg.data.synthetic import write_synthetic
from ovseg.runner import OVSegCLI

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
#: measured on this machine, largest relative loss gap over 4 steps: PixelCLIP 0.97%, CLIP-S4 0.32%; with the
#: losses left to autocast (no float32 blocks) 1.5% and 4.6%. bf16 rounds at 2^-8 = 0.4% relative.
TOLERANCE = 0.02


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def _losses(config: str, root: Path, out: Path, precision: str) -> list[float]:
    recorder = LossRecorder()
    cli = OVSegCLI(args=["--config", str(REPO / config), "--data.root", str(root), "--seed_everything", "3",
                         "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
                         "--trainer.precision", precision, "--trainer.max_steps", str(STEPS),
                         "--trainer.limit_val_batches", "0"], run=False)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder.losses


@pytest.mark.parametrize("method", ["pixelclip", "clips4"])
def test_bf16_mixed_losses_stay_close_to_float32(tmp_path, method):
    root = tmp_path / "data"
    if method == "pixelclip":
        write_synthetic_sa1b(root / "sa1b", num_images=8, seed=0)
        write_synthetic("voc20", root, num_images=2, seed=1)
    else:
        write_synthetic("voc_aug", root, split="trainaug", num_images=8, seed=1)
        write_synthetic("voc21", root, split="val", num_images=2, seed=2)
    config = f"configs/tiny/{method}.yaml"
    fp32 = _losses(config, root, tmp_path / "fp32", "32-true")
    bf16 = _losses(config, root, tmp_path / "bf16", "bf16-mixed")
    assert len(fp32) == len(bf16) == STEPS
    gaps = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    assert max(gaps) < TOLERANCE, (fp32, bf16)
    assert all(torch.isfinite(torch.tensor(bf16)))


def test_pixelclip_cluster_targets_ignore_autocast():
    from ovseg.methods.pixelclip import cluster_targets

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 8, 8, generator=generator)
    # prototypes 1e-3 apart: ε = 100 makes their logits differ by ~0.1, bf16 cosines would be off by ~0.4
    prototypes = torch.randn(1, 16, generator=generator) + 1e-3 * torch.randn(12, 16, generator=generator)
    masks = [torch.rand(5, 32, 32, generator=generator) > 0.6 for _ in range(2)]
    plain, _ = cluster_targets(features, masks, prototypes, eps=100.0, mask_resolution=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, info = cluster_targets(features, masks, prototypes, eps=100.0, mask_resolution=32)
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)
