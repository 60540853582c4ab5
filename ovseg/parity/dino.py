"""PixelCLIP's DINO masks (``get_dino_masks`` in cvlab-kaist/PixelCLIP ``pixelclip/pixelclip.py``) beside ovseg's
:class:`~ovseg.methods.pixelclip.dino.DinoMasker`: ``ovseg parity --ref DINO=DIR``.

Reference side: PixelCLIP loads ``torch.hub.load('facebookresearch/dino:main', 'dino_vits16')``; here the same
model comes from a checkout of facebookresearch/dino (``DIR``: ``hubconf.dino_vits16(pretrained=False)``, the hub's
``vision_transformer.vit_small(patch_size=16, num_classes=0)``) on random weights, and ``get_dino_masks`` is the
PixelCLIP checkout's **unmodified** method (the checkout: ``$OVSEG_PARITY_PIXELCLIP``, else ``PixelCLIP`` beside
``DIR``), imported in the detectron2 stand-ins with the real ``fast_pytorch_kmeans`` (the ``[dino]`` extra).

ovseg side: ``DinoMasker(DinoConfig(weights=<the hub model's state dict saved as a .pth>, kmeans=
"fast_pytorch_kmeans"))``: timm's ``vit_small_patch16_224.dino`` loading DINO's checkpoint through timm's own
loader, DINO's positional-embedding resize.

Compared: the weights timm loads against the hub model's (every tensor), the last-layer patch features (≤ 1e-5) at
square, oblong and non-multiple-of-16 sizes, and the masks, given the same k-means start (torch's generator seeded
alike before each side: the library draws its start with ``torch.randint``).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import torch

from ovseg.parity.common import (
    ParityRecord,
    RecordLog,
    generated_image,
    git_commit,
    label_record,
    reference_imports,
    tensor_record,
)

REFERENCE = "DINO"
#: DINO masks are PixelCLIP's training targets without SA-1B masks (configs/pixelclip_*_dino.yaml)
PROTOCOLS = ("pixelclip-train",)
#: image sizes (height, width) of the CLIP view handed to get_dino_masks: PixelCLIP's training crop (640), the
#: trained DINO size, an oblong one and one whose sides are not multiples of 16
SIZES: dict[str, tuple[int, int]] = {"640x640": (640, 640), "224x224": (224, 224), "320x480": (320, 480),
                                     "odd 250x330": (250, 330)}
#: configs/pixelclip_vit_base.yaml MODEL.PIXEL_MEAN / PIXEL_STD (DINO's input) and pixelclip/config.py
#: MODEL.CLIP_PIXEL_MEAN / CLIP_PIXEL_STD (the normalised images get_dino_masks un-normalises)
PIXEL_MEAN, PIXEL_STD = (123.675, 116.280, 103.530), (58.395, 57.120, 57.375)
CLIP_PIXEL_MEAN, CLIP_PIXEL_STD = (122.7709383, 116.7460125, 104.09373615), (68.5005327, 66.6321579, 70.3231630)


class _ImageList:
    """What ``get_dino_masks`` reads of detectron2's ``ImageList``: ``.tensor`` and ``len()``."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __len__(self) -> int:
        return len(self.tensor)


def _hub_model(dino_dir: Path, seed: int = 0) -> torch.nn.Module:
    """``hubconf.dino_vits16(pretrained=False)`` with every parameter drawn at random (DINO's init sets LayerNorm
    weights to 1 and biases to 0, which would hide a swapped or missing one)."""
    with reference_imports(dino_dir):
        hubconf = importlib.import_module("hubconf")
        torch.manual_seed(seed)
        model = hubconf.dino_vits16(pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _reference_get_dino_masks(pixelclip_dir: Path):
    """``PixelCLIP.get_dino_masks`` from the checkout, with the real ``fast_pytorch_kmeans``."""
    from ovseg.parity.detectron2_stubs import detectron2_modules
    from ovseg.parity.pixelclip_train import _package_stub

    stubs = detectron2_modules()
    stubs.pop("fast_pytorch_kmeans", None)  # the authors' k-means itself
    stubs["pixelclip"] = _package_stub(pixelclip_dir)
    with reference_imports(pixelclip_dir, stubs):
        return importlib.import_module("pixelclip.pixelclip").PixelCLIP.get_dino_masks


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), *,
        pixelclip_dir: Path | None = None, sizes: dict[str, tuple[int, int]] | None = None) -> list[ParityRecord]:
    """Compare PixelCLIP's DINO masks with ovseg's (see the module docstring); ``ref_dir``: a facebookresearch/dino
    checkout. ``sizes`` allows a small, fast variant (tests)."""
    from types import SimpleNamespace

    from ovseg.methods.pixelclip.dino import DinoConfig, DinoMasker

    started = time.time()
    ref_dir = Path(ref_dir).resolve()
    pixelclip_dir = Path(pixelclip_dir or os.environ.get("OVSEG_PARITY_PIXELCLIP") or ref_dir.parent / "PixelCLIP")
    if not (pixelclip_dir / "pixelclip" / "pixelclip.py").is_file():
        raise FileNotFoundError(f"DINO parity needs a PixelCLIP checkout (get_dino_masks): {pixelclip_dir} has no "
                                "pixelclip/pixelclip.py; set OVSEG_PARITY_PIXELCLIP or put it beside the DINO one")
    work_dir = Path(work_dir).resolve() / "dino"
    work_dir.mkdir(parents=True, exist_ok=True)
    sizes = sizes or SIZES
    commit = f"PixelCLIP {git_commit(pixelclip_dir)[:12]}"
    records = rec = RecordLog(started)


    hub = _hub_model(ref_dir).to(device)
    checkpoint = work_dir / "dino_vits16_random.pth"  # the layout of dino_deitsmall16_pretrain.pth
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(hub.state_dict(), tmp)
    tmp.replace(checkpoint)
    masker = DinoMasker(DinoConfig(weights=str(checkpoint), kmeans="fast_pytorch_kmeans")).to(device).eval()

    theirs_state, ours_state = hub.state_dict(), masker.model.state_dict()
    unmatched = sorted(set(theirs_state) ^ set(ours_state))
    worst = max((float((ours_state[k].float() - v.float()).abs().max()) for k, v in theirs_state.items()
                 if k in ours_state and ours_state[k].shape == v.shape), default=float("inf"))
    same = not unmatched and worst == 0.0
    rec(ParityRecord(REFERENCE, "weights: hub dino_vits16 checkpoint -> timm vit_small_patch16_224.dino",
                     "pixelclip-train", max_rel_diff=0.0 if same else float("inf"), tolerance=0.0, passed=same,
                     detail=f"{len(theirs_state)} tensors loaded by timm's loader (DinoConfig.weights=<.pth>), "
                            "equal; " + (f"unmatched keys {unmatched[:4]}" if unmatched else "same keys")))

    get_dino_masks = _reference_get_dino_masks(pixelclip_dir)
    as_tensor = lambda values: torch.tensor(values, device=device).view(3, 1, 1)  # noqa: E731
    their_self = SimpleNamespace(dino=hub, patch_size=16, pixel_mean=as_tensor(PIXEL_MEAN),
                                 pixel_std=as_tensor(PIXEL_STD), clip_pixel_mean=as_tensor(CLIP_PIXEL_MEAN),
                                 clip_pixel_std=as_tensor(CLIP_PIXEL_STD))
    for seed, (label, (height, width)) in enumerate(sizes.items()):
        images255 = torch.stack([torch.from_numpy(generated_image(height, width, seed=100 * seed + i))
                                 .permute(2, 0, 1).float() for i in range(2)]).to(device)
        clip_images = _ImageList((images255 - their_self.clip_pixel_mean) / their_self.clip_pixel_std)
        images01 = images255 / 255.0
        with torch.no_grad():
            # features: their get_dino_masks' first three lines on the same images
            dino_images = ((clip_images.tensor * their_self.clip_pixel_std) + their_self.clip_pixel_mean
                           - their_self.pixel_mean) / their_self.pixel_std
            dino_images = torch.nn.functional.interpolate(
                dino_images, size=(height // 16 * 16, width // 16 * 16), mode="bilinear", align_corners=False)
            their_features = hub.get_intermediate_layers(dino_images)[0][:, 1:]
            our_features, grid = masker.features(images01)
            rec(tensor_record(REFERENCE, f"DINO features {label}", our_features, their_features,
                              protocol="pixelclip-train",
                              detail=f"get_intermediate_layers(x)[0][:, 1:] vs timm forward_features; {grid[0]}x"
                                     f"{grid[1]} patches, 2 images; {commit}"))
            torch.manual_seed(1000 + seed)
            theirs = get_dino_masks(their_self, clip_images)
            torch.manual_seed(1000 + seed)
            ours = masker(images01)
        rec(label_record(REFERENCE, f"DINO masks {label}", ours.float().argmax(dim=1).cpu(),
                         theirs.float().argmax(dim=1).cpu(), protocol="pixelclip-train", agreement=1.0,
                         detail=f"16 k-means clusters (fast_pytorch_kmeans, same torch seed: same start), one-hot, "
                                f"nearest to {height}x{width}; masks {tuple(theirs.shape)}, "
                                f"{int(theirs.any(dim=(2, 3)).sum())} non-empty; {commit}"))
        if ours.shape != theirs.shape or not torch.equal(ours.cpu(), theirs.cpu()):
            records[-1].passed = False
            records[-1].detail += "; the boolean masks differ"
    print(f"[{REFERENCE}] compared in {time.time() - started:.0f} s", flush=True)
    return records

