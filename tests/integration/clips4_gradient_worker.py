"""One CLIP-S4 loss and backward on this process's slice of a fixed global batch; rank 0 saves the gradients averaged
over processes (what DDP applies). Run by tests/integration/test_clips4_ddp_gradient.py as 1 and as 2 processes:

    python tests/integration/clips4_gradient_worker.py OUT.pt [PIXEL_LOSS]   # with RANK / WORLD_SIZE / MASTER_* set
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist

GLOBAL_BATCH = 4


def global_batch() -> list[dict]:
    from ovseg.methods.clips4.views import TwoViews

    np.random.seed(0)
    views = TwoViews(crop_size=32, teacher_short_side=32, color_jitter=0.0, grayscale=0.0)
    rng = np.random.default_rng(0)
    return [views({"image": rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)}) for _ in range(GLOBAL_BATCH)]


def build_model(pixel_loss: str):
    from ovseg.methods.clips4 import CLIPDenseEncoder
    from ovseg.methods.clips4.method import CLIPS4
    from ovseg.models.clip import CLIPConfig

    torch.manual_seed(0)
    model = CLIPS4(clip=CLIPConfig(name="tiny-vit", pretrained=None, last_block="value", residual="token"),
                   known_classes=["cat", "dog", "car", "sky"], train_templates="single", num_segments=6,
                   kmeans_iterations=5, num_unknown=3, pixel_loss=pixel_loss, region_cut=pixel_loss == "segsort_plus",
                   backbone=CLIPDenseEncoder(trainable_blocks=1, output_stride=8, head_dim=16))
    # the unknown bank active and calibrated (as after its initialisation), so the semantic loss has unknown targets
    generator = torch.Generator().manual_seed(1)
    model.unknown.prototypes.copy_(torch.nn.functional.normalize(torch.randn(3, model.encoder.embed_dim,
                                                                             generator=generator), dim=-1))
    model.unknown.initialized.fill_(True)
    model.unknown.gap.fill_(-0.05)
    model.unknown.calibrated.fill_(True)
    # a non-zero last head conv, so every trainable tensor has a gradient to compare
    for parameter in model.backbone.parameters():
        if parameter.requires_grad and not parameter.abs().sum():
            torch.nn.init.normal_(parameter, std=0.02)
    return model.train()


def main(out: str, pixel_loss: str = "segsort_plus") -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build_model(pixel_loss)
    per_rank = GLOBAL_BATCH // world
    mine = global_batch()[rank * per_rank:(rank + 1) * per_rank]
    views = torch.stack([s["image"] for s in mine]).float() / 255
    geometry = torch.stack([s["geometry"] for s in mine])
    losses = model.compute_losses(views, geometry, [s["teacher_image"] for s in mine], [s["regions"] for s in mine])
    assert float(losses["unknown_target"]) > 0, "the unknown prototypes must be some segments' targets"
    losses["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    if world > 1:
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
        dist.destroy_process_group()
    if rank == 0:
        torch.save(grads, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
