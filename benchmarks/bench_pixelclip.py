"""PixelCLIP's SA-1B loader speed per core, and the training step time and where it goes (loading/decoding,
teacher, clustering, student, decoder, backward).

    python benchmarks/bench_pixelclip.py loader               # samples/s per core at SA-1B's real size
    python benchmarks/bench_pixelclip.py step                 # tiny random model, CPU, generated SA-1B folder
    python benchmarks/bench_pixelclip.py step --model vitb16 --device cuda --batch 12 --crop 640

``loader``: one process, one torch thread, generated SA-1B data at the authors' halved size (750×1125 JPEGs, 100
COCO-RLE masks each, sized like SA-1B's: many small, few large) through ``SA1B(resize_short=1024, crop_size=640,
mask_resolution=256)``; the full-decode path (every mask decoded at full size first), the crop-decoding path from
the extracted folder and from the tar files, and the raw 1500×2250 download halved at read time.

Random weights (same speed as real ones). Data: a generated SA-1B-layout folder (``--images N``, ``--size HxW``,
``--masks`` per image) decoded by the real loader. "GPU waits for data" is the share of a step spent in loading
when the loader runs in the main process (``--workers 0``); with workers it overlaps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from ovseg.data.sa1b import write_synthetic_sa1b  # noqa: E402
from ovseg.methods.pixelclip.data import SA1B  # noqa: E402
from ovseg.methods.pixelclip import PixelCLIP, cluster_targets  # noqa: E402
from ovseg.models.clip import CLIPConfig  # noqa: E402

MODELS = {
    "tiny": dict(clip=CLIPConfig(name="tiny-vit", pretrained=None, last_block="value", residual="cls"),
                 clip_resolution=64, mask_resolution=64, num_clusters=64),
    "vitb16": dict(clip=CLIPConfig(name="ViT-B-16", pretrained=None, last_block="value", residual="cls",
                                   quick_gelu=True), clip_resolution=320, mask_resolution=256, num_clusters=64),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_speed(args) -> None:
    from ovseg.data.sa1b import write_sa1b_tars

    torch.set_num_threads(1)
    height, width = (int(v) for v in args.size.split("x"))
    settings = dict(resize_short=1024, crop_size=640, mask_resolution=256)
    print(f"SA-1B loader, one process, 1 torch thread: {args.images} images of {height}x{width}, {args.masks} masks "
          f"each, crop 640, masks at 256")
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_sa1b(f"{tmp}/half", args.images, (height, width), (args.masks, args.masks),
                             images_per_tar=args.images // 2, mask_extent=(0.01, 0.35))
        write_sa1b_tars(f"{tmp}/half", f"{tmp}/tars")
        write_synthetic_sa1b(f"{tmp}/raw", args.images, (2 * height, 2 * width), (args.masks, args.masks),
                             mask_extent=(0.01, 0.35))
        cases = {
            "full decode, then crop (before)": dict(folder=f"{tmp}/half", mask_decoding="full"),
            "crop decoding, extracted folder": dict(folder=f"{tmp}/half"),
            "crop decoding, tar files": dict(folder=f"{tmp}/tars"),
            f"crop decoding, raw {2 * height}x{2 * width} halved at read": dict(folder=f"{tmp}/raw", downscale=0.5),
        }
        rates = {}
        for name, source in cases.items():
            dataset = SA1B(**source, **settings).build(tmp)
            dataset[0]  # warm-up (imports, page cache)
            times = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                for index in range(len(dataset)):
                    np.random.seed(repeat * 1000 + index)
                    dataset[index]
                times.append(time.perf_counter() - start)
            rates[name] = len(dataset) / min(times)
            print(f"  {name:48s} {rates[name]:6.1f} samples/s")
        before, after = rates["full decode, then crop (before)"], rates["crop decoding, extracted folder"]
        print(f"  speed-up (crop decoding / full decode): {after / before:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", nargs="?", default="step", choices=["loader", "step"])
    ap.add_argument("--repeats", type=int, default=3, help="loader: best of this many passes")
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--size", default=None, help="generated image size HxW (loader: 750x1125, step: 375x500)")
    ap.add_argument("--masks", type=int, default=None, help="masks per generated image (loader: 100, step: 60)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--resize-short", type=int, default=None, help="step: SA1B resize_short (default: image's)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="step: bf16 = the forward under torch.autocast(bfloat16), as Trainer(precision='bf16-mixed')")
    ap.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                    help="step: torch.set_float32_matmul_precision (high: TF32, as PixelCLIP's train_net.py)")
    ap.add_argument("--workers", type=int, default=0,
                    help="step: loader worker processes (0: load in the step); 'load' is then the wait for data")
    args = ap.parse_args()
    if args.part == "loader":
        args.size, args.masks = args.size or "750x1125", args.masks or 100
        return loader_speed(args)
    args.size, args.masks = args.size or "375x500", args.masks or 60
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    torch.manual_seed(0)
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_sa1b(tmp, args.images, (height, width), (args.masks, args.masks))
        cfg = MODELS[args.model]
        source = SA1B(folder=tmp, resize_short=args.resize_short or min(height, width), crop_size=args.crop,
                      mask_resolution=cfg["mask_resolution"])
        dataset = source.build(tmp)
        loader = DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, collate_fn=source.collate,
                            persistent_workers=args.workers > 0, pin_memory=device.type == "cuda",
                            sampler=RandomSampler(dataset, replacement=True, num_samples=10**9))
        batches = iter(loader)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
        model = PixelCLIP(**cfg).to(device).train()
        optimizer = torch.optim.AdamW(model.parameter_groups())
        times: dict[str, list[float]] = {k: [] for k in ("load", "teacher", "cluster", "student", "decoder",
                                                         "backward", "step")}
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            batch = next(batches)
            weak = batch["image"].to(device, non_blocking=True).float() / 255
            strong = batch["image_strong"].to(device, non_blocking=True).float() / 255
            masks = [m.to(device, non_blocking=True) for m in batch["masks"]]
            sync(device)
            t1 = time.perf_counter()
            with autocast:
                model.update_teacher()
                with torch.no_grad():
                    tfeat = model.teacher.encode_dense(model.teacher.normalize(model._resize(weak)))
                sync(device)
                t2 = time.perf_counter()
                protos = model.prototypes()
                targets, _ = cluster_targets(tfeat, masks, protos, model.eps, model.mask_resolution)
                sync(device)
                t3 = time.perf_counter()
                sfeat = model.encoder.encode_dense(model.encoder.normalize(model._resize(strong)))
                sync(device)
                t4 = time.perf_counter()
                cost = torch.einsum("bdhw,kd->bkhw", F.normalize(sfeat, dim=1), F.normalize(protos, dim=-1))
                b, k, h, w = cost.shape
                logits = F.interpolate(model.head(cost.reshape(b * k, 1, h, w)), size=targets.shape[-2:],
                                       mode="bilinear", align_corners=False).reshape(b, k, *targets.shape[-2:])
                valid = targets.sum(1) > 0
                loss = F.binary_cross_entropy_with_logits(logits.permute(0, 2, 3, 1)[valid],
                                                          targets.permute(0, 2, 3, 1)[valid])
            sync(device)
            t5 = time.perf_counter()
            optimizer.zero_grad()
            loss.backward()
            sync(device)
            t6 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            optimizer.step()
            sync(device)
            t7 = time.perf_counter()
            if step:  # first step is warm-up
                for key, (a, b_) in zip(times, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6),
                                                (t6, t7))):
                    times[key].append(b_ - a)
        total = sum(statistics.median(v) for v in times.values())
        print(f"model={args.model} device={args.device} precision={args.precision} workers={args.workers} "
              f"batch={args.batch} crop={args.crop} image={args.size} "
              f"masks/image={args.masks} threads={torch.get_num_threads()}")
        print(f"step (median parts sum): {total * 1000:.1f} ms  ({args.batch / total:.1f} img/s)")
        for key, values in times.items():
            med = statistics.median(values)
            print(f"  {key:9s} {med * 1000:8.1f} ms  {100 * med / total:5.1f}%")


if __name__ == "__main__":
    main()
