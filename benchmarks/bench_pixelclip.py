"""PixelCLIP's SA-1B loader speed per core, and the training step time and where it goes (loading/decoding,
teacher, clustering, student, decoder, backward), and how long the GPU waits for data with N loader workers.

    python benchmarks/bench_pixelclip.py loader               # samples/s per core at SA-1B's real size
    python benchmarks/bench_pixelclip.py step                 # tiny random model, CPU, generated SA-1B folder
    python benchmarks/bench_pixelclip.py step --model vitb16 --device cuda --batch 12 --crop 640
    python benchmarks/bench_pixelclip.py data --data DIR --images 32 --size 750x1125 --masks 100   # generate once
    python benchmarks/bench_pixelclip.py step --data DIR --workers 2,4,8 --json out.json           # data wait

``loader``: one process, one torch thread, generated SA-1B data at the authors' halved size (750×1125 JPEGs, 100
COCO-RLE masks each, sized like SA-1B's: many small, few large) through ``SA1B(resize_short=1024, crop_size=640,
mask_resolution=256)``; the full-decode path (every mask decoded at full size first), the crop-decoding path from
the extracted folder and from the tar files, and the raw 1500×2250 download halved at read time.

``step``: random weights (same speed as real ones); data: ``--data DIR`` (written by ``data``, or generated into a
temporary folder: ``--images N``, ``--size HxW``, ``--masks`` per image), decoded by the real loader
(``--downscale 0.5``: halved at read time, as ``configs/pixelclip_vitb16_sa1b.yaml``). ``--precision fp32,bf16``
measures each in one process. ``--workers 0``: loading runs in the step and is timed as its first part. ``--workers
N[,M…]``: for each N, (1) the compute alone (the step on one batch already on the device), (2) the loader alone
(batches/s of N workers once the prefetch buffer is used up), (3) the two together, starting with the buffer empty
(so prefetching cannot hide a slow loader: a loader slower than the GPU keeps the buffer empty, a faster one fills
it and the wait is zero); the wait for data is the share of (3)'s wall time spent in ``next(loader)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

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


def generate(folder: str | Path, images: int, size: tuple[int, int], masks: int, procs: int | None = None) -> dict:
    """A generated SA-1B folder (log-uniform mask sizes, as SA-1B's), written once: parts ``part_K`` written in
    parallel processes; ``generated.json`` (written last) records the settings, and a folder that has it with the
    same settings is kept as it is. Returns the settings with the seconds spent."""
    import json
    from concurrent.futures import ProcessPoolExecutor

    folder = Path(folder)
    settings = {"images": images, "size": list(size), "masks": masks}
    marker = folder / "generated.json"
    if marker.is_file() and {k: v for k, v in json.loads(marker.read_text()).items() if k in settings} == settings:
        return {**settings, "seconds": 0.0, "reused": True}
    start = time.perf_counter()
    procs = max(1, min(procs or os.cpu_count() or 1, images))
    parts = [dict(folder=folder / f"part_{k}", num_images=images // procs + (k < images % procs), size=size,
                  masks_per_image=(masks, masks), seed=k, images_per_tar=images, mask_extent=(0.01, 0.35))
             for k in range(procs)]
    if procs == 1:
        write_synthetic_sa1b(**parts[0])
    else:
        with ProcessPoolExecutor(procs) as pool:
            for job in [pool.submit(write_synthetic_sa1b, **part) for part in parts]:
                job.result()
    out = {**settings, "seconds": round(time.perf_counter() - start, 1), "reused": False}
    marker.write_text(json.dumps(out))
    return out


class StepTimer:
    """One PixelCLIP training step, its parts timed with synchronisation."""

    PARTS = ("load", "teacher", "cluster", "student", "decoder", "backward", "optimizer")

    def __init__(self, cfg: dict, device: torch.device, precision: str):
        self.device = device
        self.model = PixelCLIP(**cfg).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameter_groups())
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def to_device(self, batch: dict) -> tuple:
        weak = batch["image"].to(self.device, non_blocking=True).float() / 255
        strong = batch["image_strong"].to(self.device, non_blocking=True).float() / 255
        return weak, strong, [m.to(self.device, non_blocking=True) for m in batch["masks"]]

    def __call__(self, next_batch) -> list[float]:
        """Seconds of each part of :attr:`PARTS` for one step; ``next_batch()`` gives (weak, strong, masks)."""
        model, device = self.model, self.device
        t0 = time.perf_counter()
        weak, strong, masks = next_batch()
        sync(device)
        t1 = time.perf_counter()
        with self.autocast:
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
        self.optimizer.zero_grad()
        loss.backward()
        sync(device)
        t6 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        self.optimizer.step()
        sync(device)
        t7 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6]


def make_loader(source: SA1B, dataset, batch: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=source.collate,
                      persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                      sampler=RandomSampler(dataset, replacement=True, num_samples=10**9))


def parts_run(timer: StepTimer, loader: DataLoader, steps: int) -> dict:
    """Median of each part over ``steps`` steps after one warm-up step, loading in the step (``--workers 0``)."""
    batches = iter(loader)
    times = [timer(lambda: timer.to_device(next(batches))) for _ in range(steps + 1)][1:]
    medians = {key: statistics.median(t[i] for t in times) for i, key in enumerate(StepTimer.PARTS)}
    total = sum(medians.values())
    return {"step_ms": round(1000 * total, 1), "images_per_s": round(loader.batch_size / total, 2),
            "parts_ms": {k: round(1000 * v, 1) for k, v in medians.items()}}


def wait_run(timer: StepTimer, loader: DataLoader, workers: int, steps: int) -> dict:
    """Compute alone, loader alone, then both with the prefetch buffer empty (see the module docstring)."""
    batch = loader.batch_size
    batches = iter(loader)
    resident = timer.to_device(next(batches))
    compute = [sum(timer(lambda: resident)) for _ in range(max(1, steps // 3) + 1)][1:]  # after a warm-up
    compute_s = statistics.median(compute)
    prefetched = workers * (loader.prefetch_factor or 2)
    for _ in range(prefetched):  # what filled while the model was built and the compute was timed
        next(batches)
    count = max(steps, 2 * prefetched)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    loader_s = (time.perf_counter() - start) / count
    # the buffer is empty now: a loader slower than the step keeps it empty, a faster one fills it
    waits, start = [], time.perf_counter()
    for _ in range(steps):
        waits.append(timer(lambda: timer.to_device(next(batches)))[0])
    wall = time.perf_counter() - start
    return {"workers": workers, "compute_step_ms": round(1000 * compute_s, 1),
            "compute_samples_per_s": round(batch / compute_s, 1),
            "loader_samples_per_s": round(batch / loader_s, 1),
            "loader_samples_per_s_per_worker": round(batch / loader_s / workers, 2),
            "step_ms": round(1000 * wall / steps, 1), "samples_per_s": round(batch * steps / wall, 1),
            "data_wait_share": round(sum(waits) / wall, 4), "timed_steps": steps, "prefetch_buffer": prefetched}


def main() -> None:
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("part", nargs="?", default="step", choices=["loader", "step", "data"])
    ap.add_argument("--repeats", type=int, default=3, help="loader: best of this many passes")
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--size", default=None, help="generated image size HxW (loader: 750x1125, step: 375x500)")
    ap.add_argument("--masks", type=int, default=None, help="masks per generated image (loader: 100, step: 60)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--data", default=None, help="data/step: the generated SA-1B folder (step: default a temporary "
                                                 "one)")
    ap.add_argument("--procs", type=int, default=None, help="data: generating processes (default: every core)")
    ap.add_argument("--downscale", type=float, default=None, help="step: SA1B downscale (0.5: halved at read time)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--resize-short", type=int, default=None, help="step: SA1B resize_short (default: image's)")
    ap.add_argument("--precision", default="fp32",
                    help="step: fp32, bf16 (the forward under torch.autocast(bfloat16), as Trainer(precision="
                         "'bf16-mixed')) or both, comma-separated")
    ap.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                    help="step: torch.set_float32_matmul_precision (high: TF32, as PixelCLIP's train_net.py)")
    ap.add_argument("--workers", default="0",
                    help="step: loader worker processes, comma-separated (0: load in the step, timed as a part)")
    ap.add_argument("--json", default=None, help="step/data: also write the results to this JSON file")
    args = ap.parse_args()
    if args.part == "loader":
        args.size, args.masks = args.size or "750x1125", args.masks or 100
        return loader_speed(args)
    args.size, args.masks = args.size or "375x500", args.masks or 60
    height, width = (int(v) for v in args.size.split("x"))
    if args.part == "data":
        if not args.data:
            ap.error("data needs --data DIR")
        result = {"data": generate(args.data, args.images, (height, width), args.masks, args.procs)}
        print(json.dumps(result))
    else:
        result = step_results(args, height, width)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


def step_results(args, height: int, width: int) -> dict:
    precisions = args.precision.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    if any(p not in ("fp32", "bf16") for p in precisions):
        raise SystemExit(f"--precision: fp32 and/or bf16, got {args.precision!r}")
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or tmp
        if not args.data:
            generate(folder, args.images, (height, width), args.masks, procs=1)
        cfg = MODELS[args.model]
        source = SA1B(folder=folder, resize_short=args.resize_short or min(height, width), crop_size=args.crop,
                      mask_resolution=cfg["mask_resolution"], downscale=args.downscale)
        dataset = source.build(folder)
        out: dict = {"model": args.model, "device": args.device, "batch": args.batch, "crop": args.crop,
                     "image": args.size, "masks_per_image": args.masks, "downscale": args.downscale,
                     "matmul_precision": args.matmul_precision, "torch_threads": torch.get_num_threads(),
                     "runs": []}
        if device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(device)
        for precision in precisions:
            for count in workers:
                torch.manual_seed(0)
                timer = StepTimer(cfg, device, precision)
                loader = make_loader(source, dataset, args.batch, count, device)
                run = {"precision": precision, "workers": count}
                if count == 0:
                    run.update(parts_run(timer, loader, args.steps))
                    print(f"{args.model} {args.device} {precision} batch {args.batch} crop {args.crop} image "
                          f"{args.size} masks {args.masks}: step {run['step_ms']} ms ({run['images_per_s']} img/s)")
                    for key, ms in run["parts_ms"].items():
                        print(f"  {key:9s} {ms:8.1f} ms  {100 * ms / run['step_ms']:5.1f}%")
                else:
                    run.update(wait_run(timer, loader, count, args.steps))
                    print(f"{args.model} {args.device} {precision} {count} workers: compute alone "
                          f"{run['compute_samples_per_s']} samples/s, loader alone {run['loader_samples_per_s']} "
                          f"samples/s, together {run['samples_per_s']} samples/s, waiting for data "
                          f"{100 * run['data_wait_share']:.1f}% of {run['timed_steps']} steps")
                out["runs"].append(run)
                del loader, timer
                if device.type == "cuda":
                    out.setdefault("max_memory_GiB", {})[precision] = round(
                        torch.cuda.max_memory_allocated(device) / 2**30, 2)
        return out


if __name__ == "__main__":
    main()
