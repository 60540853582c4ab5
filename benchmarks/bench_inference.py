"""Inference benchmark: throughput, dense-path overhead, evaluator share, peak memory.

    python benchmarks/bench_inference.py                 # tiny model + ViT-B/16 (random weights), CPU
    python benchmarks/bench_inference.py --models tiny   # quick
    python benchmarks/bench_inference.py --device cuda   # on a GPU
    python benchmarks/bench_inference.py --models vitb16 --protocols --device cuda   # + each protocol's images/s
    python benchmarks/bench_inference.py --models tiny --batching    # + batched vs one-at-a-time evaluation

Numbers go into benchmarks/README.md by hand, with the machine they were measured on. Random weights
are as fast as real ones, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from ovseg.eval.evaluator import Evaluator  # noqa: E402
from ovseg.eval.protocols import available_protocols, load_protocol  # noqa: E402
from ovseg.methods import MaskCLIP  # noqa: E402
from ovseg.models.clip import CLIPConfig  # noqa: E402

MODELS = {"tiny": "tiny-vit", "vitb16": "ViT-B-16"}


def timed(fn, repeats: int, sync) -> float:
    """Best of ``repeats`` runs after a warm-up (other processes on a shared CPU only add noise)."""
    fn()  # warm-up (positional-embedding cache, allocator)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def bench_model(name: str, device: str, repeats: int) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    method = MaskCLIP(CLIPConfig(name=MODELS[name], pretrained=None, last_block="vanilla")).to(device).eval()
    encoder = method.encoder
    out: dict = {"model": MODELS[name], "device": device}
    with torch.no_grad():
        # dense forward vs open_clip's own encode_image at the trained size (the only size it runs)
        x = torch.rand(2, 3, encoder.input_size, encoder.input_size, device=device)
        dense = timed(lambda: encoder.encode_dense(x), repeats, sync)
        out["dense_over_encode_image"] = dense / timed(lambda: encoder.model.encode_image(x), repeats, sync)
        x448 = torch.rand(1, 3, 448, 448, device=device)
        out["dense_448_images_per_s"] = 1 / timed(lambda: encoder.encode_dense(x448), repeats, sync)
        # whole and slide inference through the evaluator on a 375x500 VOC-sized image, 21 classes
        image = torch.rand(3, 375, 500, device=device)
        names = [[f"class {i}"] for i in range(21)]
        for mode, overrides in {
            "whole": {"mode": "whole", "short_side": 448, "templates": "single"},
            "slide": {"mode": "slide", "crop": 224, "stride": 112, "short_side": 336, "templates": "single"},
        }.items():
            per_image, share = bench_evaluator(method, overrides, image, names, repeats, sync, device)
            out[f"{mode}_images_per_s"] = 1 / per_image
            out[f"{mode}_evaluator_share"] = share
    return out


def bench_evaluator(method, overrides, image, names, repeats, sync, device) -> tuple[float, float]:
    """Seconds per image through the evaluator, and the share of it spent outside ``dense_logits``."""
    evaluator = Evaluator(load_protocol("maskclip"), overrides, window_batch_size=8)
    entry = evaluator.add_dataset(method, "bench", names, None, torch.device(device))
    dense_time = [float("inf")]
    real_dense = method.dense_logits

    def counted(images, text):
        sync()
        start = time.perf_counter()
        result = real_dense(images, text)
        sync()
        dense_time[0] = min(dense_time[0], time.perf_counter() - start)
        return result

    method.dense_logits = counted
    try:
        per_image = timed(lambda: evaluator.predict(method, entry, image, tuple(image.shape[-2:])), repeats, sync)
    finally:
        method.dense_logits = real_dense
    # slide mode runs one dense call per window batch
    calls = 1 if entry.settings.mode == "whole" else -(-len(evaluator_windows(entry, image)) // 8)
    return per_image, max(0.0, 1 - calls * dense_time[0] / per_image)


def bench_protocols(name: str, device: str, repeats: int, batch: int = 4) -> dict:
    """MaskCLIP evaluation images/s under each shipped protocol (its own resize, mode, windows; one template), on
    batches of ``batch`` 375x500 images with the protocol's VOC-21 class names (whole-image protocols run a batch
    as one forward pass)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    method = MaskCLIP(CLIPConfig(name=MODELS[name], pretrained=None, last_block="vanilla")).to(device).eval()
    images = [torch.rand(3, 375, 500, device=device) for _ in range(batch)]
    # ground truth of 25x25-pixel class blocks (up to 21 regions an image) for the mask-classification protocols
    labels = [torch.randint(0, 21, (15, 20), device=device).repeat_interleave(25, 0).repeat_interleave(25, 1)
              for _ in range(batch)]
    out = {}
    for protocol in available_protocols():
        if protocol == "toyworld":
            continue
        evaluator = Evaluator(load_protocol(protocol), {"templates": "single"}, window_batch_size=8)
        entry = evaluator.add_dataset(method, "voc21", None, 0, torch.device(device))  # its VOC names
        # mask-classification protocols (masks: ground_truth) classify each class region of a label map
        given = labels if entry.settings.masks == "ground_truth" else None

        def predict(evaluator=evaluator, entry=entry, given=given):
            return evaluator.predict_batch(method, entry, images, [(375, 500)] * batch, given)

        seconds = timed(predict, repeats, sync)
        out[f"{protocol}_{entry.settings.mode}_images_per_s"] = round(batch / seconds, 2)
    return {"model": MODELS[name], "device": device, **out}


def bench_batching(name: str, device: str, repeats: int, batch: int = 8) -> dict:
    """Whole-image evaluation (maskclip protocol, short side 448) of ``batch`` 375x500 images as one batch vs one
    at a time, images/s; and the bilinear upsampling of one image's 21-class scores to 448x597 from the layout the
    batch's einsum gives (channels-last) over the contiguous one."""
    import torch.nn.functional as F

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    method = MaskCLIP(CLIPConfig(name=MODELS[name], pretrained=None, last_block="vanilla")).to(device).eval()
    evaluator = Evaluator(load_protocol("maskclip"), {"templates": "single", "short_side": 448}, window_batch_size=8)
    entry = evaluator.add_dataset(method, "voc21", None, 0, torch.device(device))
    images = [torch.rand(3, 375, 500, device=device) for _ in range(batch)]
    with torch.no_grad():
        batched = timed(lambda: evaluator.predict_batch(method, entry, images, [(375, 500)] * batch), repeats, sync)
        single = timed(lambda: [evaluator.predict_batch(method, entry, [image], [(375, 500)]) for image in images],
                       repeats, sync)
    scores = torch.einsum("bdhw,qd->bqhw", torch.randn(batch, 64, 28, 37, device=device),
                          torch.randn(21, 64, device=device))[0]

    def upsample(x):
        return F.interpolate(x[None], size=(448, 597), mode="bilinear", align_corners=False)

    layout = timed(lambda: upsample(scores), repeats, sync) / timed(lambda: upsample(scores.contiguous()), repeats,
                                                                      sync)
    return {"model": MODELS[name], "device": device, f"whole_batched_{batch}_images_per_s": round(batch / batched, 2),
            "whole_one_at_a_time_images_per_s": round(batch / single, 2),
            "upsample_channels_last_over_contiguous": round(layout, 2)}


def evaluator_windows(entry, image):
    from ovseg.eval.inference import slide_windows
    from ovseg.utils.geometry import keep_ratio_size

    s = entry.settings
    h, w = keep_ratio_size(*image.shape[-2:], s.short_side, s.long_side_max)
    return slide_windows(h, w, s.crop, s.stride)


def peak_memory_171_classes(height: int = 1024, width: int = 2048) -> dict:
    """Peak RSS of a fresh process turning 171-class scores into labels at ``width``x``height`` (2048x1024: a
    Cityscapes-size label): ovseg's chunked path vs materialising all full-resolution logits (what a naive
    evaluator does)."""
    code = (
        "import sys, torch, torch.nn.functional as F\n"
        "from ovseg.eval.inference import labels_from_logits\n"
        "h, w = int(sys.argv[2]), int(sys.argv[3])\n"
        "logits = torch.randn(171, h // 8, w // 8)\n"
        "if sys.argv[1] == 'chunked':\n"
        "    pred = labels_from_logits(logits, (h, w), torch.arange(171), logit_scale=40.0)\n"
        "elif sys.argv[1] == 'naive':\n"
        "    pred = (F.interpolate(logits[None], size=(h, w), mode='bilinear') * 40.0).softmax(1).argmax(1)\n"
        # VmHWM, not ru_maxrss: the latter carries the parent's peak across fork + exec
        "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024)\n"
    )
    peak = {}
    for mode in ("baseline", "chunked", "naive"):  # baseline: imports + the low-resolution scores only
        run = subprocess.run([sys.executable, "-c", code, mode, str(height), str(width)], capture_output=True,
                             text=True, check=True)
        peak[f"peak_rss_MiB_171cls_{width}x{height}_{mode}"] = round(float(run.stdout), 1)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vitb16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--protocols", action="store_true", help="also images/s under each shipped protocol")
    parser.add_argument("--batching", action="store_true", help="also batched vs one-at-a-time evaluation")
    parser.add_argument("--memory-size", default="1024x2048", help="HxW of the 171-class peak-memory measure")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    memory = peak_memory_171_classes(*(int(v) for v in args.memory_size.split("x")))
    results = [bench_model(m, args.device, args.repeats) for m in args.models.split(",")]
    if args.protocols:
        results += [bench_protocols(m, args.device, args.repeats) for m in args.models.split(",")]
    if args.batching:
        results += [bench_batching(m, args.device, args.repeats) for m in args.models.split(",")]
    results.append(memory)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    results.append({"torch_threads": torch.get_num_threads(), "max_rss_MiB": max_rss})
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
