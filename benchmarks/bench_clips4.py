"""CLIP-S4 training-step time, split by stage, and the cost of gathering segment negatives across processes.

    python benchmarks/bench_clips4.py step   [--clip tiny-vit --crop 64 --batch 4 --segments 36 --steps 5]
    python benchmarks/bench_clips4.py step   --clip ViT-B-16 --pretrained /path/weights.bin --crop 336 --batch 16
    python benchmarks/bench_clips4.py gather [--procs 1 2 4 --batch 16 --segments 36 --dim 512 --pixels 1764]

``step``: two-view sampling (data transform, per image), backbone forward on both views, k-means
segmentation, CLIP teacher (forward + warp + pooling), the three losses, backward + SGD step. Stages are timed
by wrapping the functions the training step calls (synchronising CUDA around each).
``gather``: P CPU processes (gloo) each all-gather their 2·B·K segment prototypes (gradient kept for the local
part) and run the pixel-segment InfoNCE forward + backward against the gathered set; reports per-iteration
time of the gather and of the loss, so the growth with P (the number of GPUs being simulated) is visible.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(list)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timed(name, device):
    _sync(device)
    start = time.perf_counter()
    yield
    _sync(device)
    TIMES[name].append(time.perf_counter() - start)


def _wrap(module, attr, name, device):
    original = getattr(module, attr)

    def wrapper(*args, **kwargs):
        with timed(name, device):
            return original(*args, **kwargs)

    setattr(module, attr, wrapper)


def bench_step(args) -> None:
    import ovseg.methods.clips4.method as m
    from ovseg.methods.clips4.views import TwoViews
    from ovseg.methods.clips4 import CLIPS4, CLIPDenseEncoder
    from ovseg.models.clip import CLIPConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CLIPS4(clip=CLIPConfig(name=args.clip, pretrained=args.pretrained, last_block="value"),
                   known_classes="voc20", backbone=CLIPDenseEncoder(trainable_blocks=args.trainable_blocks,
                                                                    head_dim=args.head_dim),
                   train_templates="single", num_segments=args.segments).to(device)
    model.train()
    for attr, name in (("spherical_kmeans", "kmeans"), ("pixel_segment_infonce", "loss: pixel InfoNCE"),
                       ("embedding_consistency", "loss: embedding"), ("semantic_consistency", "loss: semantic")):
        _wrap(m, attr, name, device)
    _wrap(model, "teacher_features", "teacher forward", device)
    _wrap(model.backbone, "forward", "backbone forward (2 views)", device)
    params = [p for g in model.backbone.param_groups().values() for p in g]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-3)
    views = TwoViews(crop_size=args.crop, teacher_short_side=args.crop)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (int(args.crop * 1.3), int(args.crop * 1.7), 3), dtype=np.uint8)
              for _ in range(args.batch)]
    for step in range(args.steps + 1):
        if step == 1:
            TIMES.clear()  # first step is warm-up
        with timed("two views (data, whole batch)", device):
            samples = [views({"image": im}) for im in images]
        batch_views = torch.stack([s["image"] for s in samples]).to(device).float() / 255
        geometry = torch.stack([s["geometry"] for s in samples]).to(device)
        teacher = [s["teacher_image"] for s in samples]
        with timed("total step (excl. data)", device):
            out = model.compute_losses(batch_views, geometry, teacher)
            with timed("backward + SGD", device):
                optimizer.zero_grad()
                out["loss"].backward()
                optimizer.step()
            with timed("unknown prototypes", device):
                model.unknown.update(out["all_clip"], model.known_text)
    print(f"CLIP-S4 step, {args.clip}, crop {args.crop}, batch {args.batch}, {args.segments} segments, "
          f"device {device}, {args.steps} steps (after 1 warm-up), torch threads {torch.get_num_threads()}")
    print("| stage | ms / step |\n|---|---|")
    for name, values in TIMES.items():
        per_step = sum(values) / args.steps
        print(f"| {name} | {per_step * 1000:.1f} |")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def _gather_worker(rank, world, args, port, queue):
    import torch.distributed as dist

    from ovseg.methods.clips4.dist import gather_detached, gather_with_grad
    from ovseg.methods.clips4.losses import pixel_segment_infonce

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    s_local = 2 * args.batch * args.segments
    gather_t, loss_t = [], []
    for it in range(args.iters + 2):
        protos = torch.nn.functional.normalize(torch.randn(s_local, args.dim, generator=g), dim=-1).requires_grad_()
        pixels = torch.nn.functional.normalize(torch.randn(args.pixels, args.dim, generator=g), dim=-1)
        dist.barrier()
        t0 = time.perf_counter()
        all_protos, offset = gather_with_grad(protos)
        valid = gather_detached(torch.ones(s_local, dtype=torch.bool))
        t1 = time.perf_counter()
        positive = offset + torch.randint(0, s_local, (args.pixels,), generator=g)
        loss = pixel_segment_infonce(pixels, all_protos, positive, valid)
        loss.backward()
        t2 = time.perf_counter()
        if it >= 2:
            gather_t.append(t1 - t0)
            loss_t.append(t2 - t1)
    if rank == 0:
        queue.put((statistics.median(gather_t), statistics.median(loss_t)))
    dist.destroy_process_group()


def bench_gather(args) -> None:
    import torch.multiprocessing as mp

    print(f"segment gather, CPU gloo processes: B={args.batch} images/process, K={args.segments} segments, "
          f"D={args.dim}, {args.pixels} pixels/process in the InfoNCE (median of {args.iters} iterations)")
    print("| processes | segments gathered | gather ms | InfoNCE fwd+bwd ms |\n|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for i, procs in enumerate(args.procs):
        queue = ctx.SimpleQueue()
        mp.start_processes(_gather_worker, args=(procs, args, 29500 + (os.getpid() % 1000) + i, queue),
                           nprocs=procs, start_method="spawn")
        gather_s, loss_s = queue.get()
        total = procs * 2 * args.batch * args.segments
        print(f"| {procs} | {total} | {gather_s * 1000:.2f} | {loss_s * 1000:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    step = sub.add_parser("step")
    step.add_argument("--clip", default="tiny-vit")
    step.add_argument("--pretrained", default=None)
    step.add_argument("--crop", type=int, default=64)
    step.add_argument("--batch", type=int, default=4)
    step.add_argument("--segments", type=int, default=36)
    step.add_argument("--trainable-blocks", type=int, default=4)
    step.add_argument("--head-dim", type=int, default=256)
    step.add_argument("--steps", type=int, default=5)
    step.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gather = sub.add_parser("gather")
    gather.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    gather.add_argument("--batch", type=int, default=16)
    gather.add_argument("--segments", type=int, default=36)
    gather.add_argument("--dim", type=int, default=512)
    gather.add_argument("--pixels", type=int, default=1764)
    gather.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    bench_step(args) if args.what == "step" else bench_gather(args)


if __name__ == "__main__":
    main()
