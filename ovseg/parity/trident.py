"""Trident (github.com/YuHengsss/Trident) beside :class:`ovseg.methods.trident.Trident`: ``ovseg parity --ref
Trident=DIR``.

Reference side: the checkout's **unmodified** ``trident.py`` segmentor with its own ``open_clip`` (the modified
``VisionTransformer``), ``segment_anything`` (the modified SAM storing ``last_attn`` / ``last_v``), ``seg_utils`` and
``configs/cfg_*.py`` / ``cls_*.txt``, imported with the mmseg stand-ins of :mod:`ovseg.parity.mmseg_clip` (and a stub
``openpyxl``, which only its results spreadsheet needs); pip's ``open_clip`` / ``segment_anything`` are hidden while
it is imported and run. Stood in for: ``create_model(model_type, pretrained='openai', precision='fp16')`` (their
``open_clip.model.CLIP`` built from the random weights' config, the weights loaded), ``torch.hub.load('facebookresearch/
dino:main', 'dino_vitb16')`` (``vit_base(patch_size=16)`` of a facebookresearch/dino checkout: ``$OVSEG_PARITY_DINO``,
else ``dino`` beside ``DIR``, every parameter randomised), SAM's checkpoint (their ``sam_model_registry['vit_b']`` on
a seed, relative-position tables randomised, saved and passed as ``sam_ckpt``).

Precision: the reference runs CLIP, DINO and SAM in fp16 on a GPU; here both sides run in fp32 on the CPU — the CLIP
weights are fp16-exact (:func:`~ovseg.parity.mmseg_clip.fp16_exact_clip`, the small text tower) and ``Tensor.half`` /
``Module.half`` are the identity while the reference is built and run. DINO reads the windows with the reference's
arithmetic on both sides (mmseg's preprocessor constants, then CLIP's ``UnNormalize``: ``Trident.dino_images``); read
as plain [0, 1] images instead, the spliced tokens differ by 3e-4 on these random weights (the proxy mask amplifies the
constants' 5e-6 difference) while logits and labels still agree.

ovseg side: ``Trident`` on the same files (the CLIP folder, DINO's checkpoint through timm's loader, SAM's through
:mod:`ovseg.models.vfm`), scored by the shared evaluator under the ``trident`` protocol; SAM reads the original image
(the evaluator's ``reading_originals`` hook), as the reference reads the PNG file again.

Compared: SAM's affinity (``get_sam_sim`` as ``guidance_attn`` feeds it), the spliced windows' tokens on SAM's grid
(the other ``torch.matmul`` operand in ``guidance_attn``) and the logits at the original size for a VOC-shaped and a
Cityscapes-shaped image (the two SAM halves), then label maps on generated images of five sizes. SAM refinement
(``--sam_refine``): their ``seg_utils/utils.py`` ``sam_refinement`` vs :mod:`ovseg.methods.sam_refinement` on
hand-made probabilities with several regions per class (:func:`refinement_rows`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import copy
import gc
import importlib
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.parity.common import (
    IMAGE_SIZES,
    OVSegScorer,
    ParityRecord,
    RecordLog,
    generated_image,
    git_commit,
    label_record,
    reference_imports,
    stub_module,
    tensor_record,
)
from ovseg.parity.mmseg_clip import CONFIG_STEMS, Harness, Reference, fp16_exact_clip, stand_ins

REFERENCE = "Trident"
PROTOCOLS = ("trident",)
#: label maps: (image size, dataset) — the Cityscapes-shaped image under cityscapes (SAM in two halves)
LABEL_CASES: dict[str, tuple[tuple[int, int], str]] = {
    "voc 375x500": (IMAGE_SIZES["voc 375x500"], "voc21"),
    "context 333x500": (IMAGE_SIZES["context 333x500"], "context60"),
    "coco 480x640": (IMAGE_SIZES["coco 480x640"], "coco_object"),
    "odd 397x541": (IMAGE_SIZES["odd 397x541"], "voc20"),
    "cityscapes 1024x2048": (IMAGE_SIZES["cityscapes 1024x2048"], "cityscapes"),
}
#: the cases whose intermediate tensors are compared too
DENSE_CASES = ("voc 375x500", "cityscapes 1024x2048")
HIDDEN_PACKAGES = ("open_clip", "segment_anything")


def image_seed(label: str) -> int:
    """The generated image's seed, fixed per case name (a subset of the cases draws the same images)."""
    return zlib.crc32(label.encode()) % 10_000


@contextlib.contextmanager
def hidden_modules(prefixes: tuple[str, ...]) -> Iterator[None]:
    """pip's packages of the same names as the checkout's are out of ``sys.modules`` in the block, then back."""
    saved = {name: module for name, module in sys.modules.items()
             if any(name == p or name.startswith(p + ".") for p in prefixes)}
    for name in saved:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in [n for n in sys.modules if any(n == p or n.startswith(p + ".") for p in prefixes)]:
            del sys.modules[name]
        sys.modules.update(saved)


@contextlib.contextmanager
def fp32_half() -> Iterator[None]:
    """``Tensor.half()`` and ``Module.half()`` leave their argument as it is (the reference in fp32 on the CPU)."""
    tensor_half, module_half = torch.Tensor.half, torch.nn.Module.half
    torch.Tensor.half = lambda self, *args, **kwargs: self
    torch.nn.Module.half = lambda self: self
    try:
        yield
    finally:
        torch.Tensor.half, torch.nn.Module.half = tensor_half, module_half


def random_dino(dino_dir: Path, path: Path, seed: int = 0) -> torch.nn.Module:
    """DINO's hub ``dino_vitb16`` architecture (``vision_transformer.vit_base(patch_size=16, num_classes=0)``) with
    every parameter random, saved to ``path`` (the layout of ``dino_vitbase16_pretrain.pth``)."""
    with reference_imports(dino_dir):
        vision_transformer = importlib.import_module("vision_transformer")
        torch.manual_seed(seed)
        model = vision_transformer.vit_base(patch_size=16, num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(model.state_dict(), path)
    return model.eval()


def random_sam(build_sam, path: Path, seed: int = 0) -> None:
    """Their ``sam_model_registry['vit_b']()`` on a seed, the relative-position tables (zero at init) drawn too,
    saved as a SAM checkpoint."""
    torch.manual_seed(seed)
    sam = build_sam(checkpoint=None)
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn_like(p) * 0.02)
    torch.save(sam.state_dict(), path)


class _MatmulRecorder:
    """``torch`` for the checkout's ``open_clip/transformer.py``: every ``torch.matmul`` call's operands recorded
    (``guidance_attn``'s only one: the SAM affinity and the spliced tokens on SAM's grid)."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def matmul(self, a, b):
        self.calls.append((a[0, 0].detach().clone().cpu(), b[0].detach().clone().cpu()))
        return torch.matmul(a, b)


class TridentReference(Reference):
    """The checkout's ``Trident`` segmentor (built with the stand-ins above) and its configs."""

    def __init__(self, harness: Harness, ref_dir: Path, device: str, clip_folder: Path, dino: torch.nn.Module,
                 sam_path: Path):
        self.harness, self.ref_dir, self.device = harness, Path(ref_dir).resolve(), device
        path_before = list(sys.path)
        self.module = importlib.import_module("trident")
        sys.path[:] = [p for p in sys.path if p in path_before]  # trident.py appends ".."
        self.transformer = importlib.import_module("open_clip.transformer")
        open_clip_model = importlib.import_module("open_clip.model")
        model_cfg = json.loads((clip_folder / "open_clip_config.json").read_text())["model_cfg"]
        state = torch.load(clip_folder / "open_clip_pytorch_model.bin", map_location="cpu")

        def create_model(model_type, pretrained=None, precision="fp32", **unused):
            model = open_clip_model.CLIP(**model_cfg)
            model.load_state_dict(state)
            return model.to(device)

        self.module.create_model = create_model
        self.dino = dino
        self.sam_path = sam_path

    def segmentor(self, dataset: str, weights: Path = None, **extra):
        model = dict(self.config(dataset).model)
        model.pop("type")
        model["name_path"] = str(self.ref_dir / model["name_path"])
        model["sam_ckpt"] = str(self.sam_path)
        model.pop("checkpoint", None)
        hub_load = torch.hub.load
        torch.hub.load = lambda *args, **kwargs: copy.deepcopy(self.dino)
        try:
            seg = self.module.Trident(device=torch.device(self.device), **model, **extra)
        finally:
            torch.hub.load = hub_load
        seg.debug = True  # predict() then takes the metas as dicts and returns (labels, scores)
        return seg.eval()

    def run(self, seg, dataset: str, image: np.ndarray, scratch: Path, record: bool) -> dict:
        """Their label map (and, with ``record``, the affinity, spliced tokens and logits) for an RGB image:
        ``get_trident_seg`` then ``postprocess_result``, as ``predict`` runs them (PAMR is off)."""
        data = self.prepare(seg, self.pipeline(dataset), image, scratch)
        metas = [dict(sample.metainfo) for sample in data["data_samples"]]
        path = metas[0]["img_path"]
        recorder = _MatmulRecorder()
        real_torch = self.transformer.torch
        self.transformer.torch = recorder
        try:
            with torch.no_grad():
                logits = seg.get_trident_seg(data["inputs"], path, metas)
                labels, _ = seg.postprocess_result(logits, metas, debug_img_path=path)
        finally:
            self.transformer.torch = real_torch
        out = {"labels": labels[0].cpu()}
        if record:
            out["logits"] = logits[0].cpu()
            out["affinity"] = [a for a, _ in recorder.calls]
            out["spliced"] = [b.permute(1, 0, 2).flatten(1) for _, b in recorder.calls]
        return out


def ovseg_trident(clip_folder: Path, dino_path: Path, sam_path: Path):
    from ovseg.methods.trident import Trident
    from ovseg.models.clip import CLIPConfig
    from ovseg.models.vfm import VFMConfig

    return Trident(clip=CLIPConfig(name=f"local-dir:{clip_folder}", pretrained=None, quick_gelu=True),
                   vfm=VFMConfig(kind="dino", name="vit_base_patch16_224.dino", weights=str(dino_path)),
                   sam=VFMConfig(kind="sam", name="vit_b", weights=str(sam_path))).eval()


def ovseg_run(scorer: OVSegScorer, dataset: str, image: np.ndarray, record: bool) -> dict:
    """ovseg's label map as ``ovseg test`` makes it, and with ``record`` the affinity, the spliced tokens on SAM's
    grid and the logits at the original size, read off that same pass (wrappers around the method's pieces)."""
    import ovseg.methods.trident as module

    method = scorer.method
    out: dict = {"affinity": [], "grids": []}
    real_affinity, real_splice, real_dense = module.sam_affinity, method.spliced_tokens, method.dense_logits

    def affinity(values, *args, **kwargs):
        weights = real_affinity(values, *args, **kwargs)
        out["affinity"].append(weights[0].cpu())
        out["grids"].append(tuple(values.shape[2:4]))
        return weights

    def splice(images):
        out["spliced_map"] = real_splice(images)
        return out["spliced_map"]

    def dense(images, text):
        out["logits"] = real_dense(images, text)
        return out["logits"]

    if record:
        module.sam_affinity, method.spliced_tokens, method.dense_logits = affinity, splice, dense
    try:
        out["labels"] = scorer.labels(dataset, image)
    finally:
        module.sam_affinity = real_affinity
        for name in ("spliced_tokens", "dense_logits"):
            method.__dict__.pop(name, None)
    if record:
        spliced = out["spliced_map"]
        columns = spliced.shape[-1] // 2
        pieces = [spliced[..., :columns], spliced[..., columns:]] if len(out["grids"]) == 2 else [spliced]
        out["spliced"] = [F.interpolate(piece, size=grid, mode="bilinear", align_corners=False)[0].flatten(1).T
                          for piece, grid in zip(pieces, out["grids"])]
        out["logits"] = F.interpolate(out["logits"], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    return out


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), *,
        cases: dict[str, tuple[tuple[int, int], str]] | None = None,
        dense_cases: tuple[str, ...] = DENSE_CASES, refinement: bool = True) -> list[ParityRecord]:
    """Compare the checkout's Trident with ovseg's (see the module docstring). ``cases`` allows a small variant;
    ``refinement``: the SAM refinement rows too (:func:`refinement_rows`)."""
    started = time.time()
    ref_dir = Path(ref_dir).resolve()
    dino_dir = Path(os.environ.get("OVSEG_PARITY_DINO") or ref_dir.parent / "dino")
    if not (dino_dir / "vision_transformer.py").is_file():
        raise FileNotFoundError(f"Trident parity needs a facebookresearch/dino checkout (its hub's dino_vitb16): "
                                f"{dino_dir} has no vision_transformer.py; set OVSEG_PARITY_DINO or put it beside "
                                "the Trident one")
    work_dir = Path(work_dir).resolve() / "trident"
    work_dir.mkdir(parents=True, exist_ok=True)
    cases = cases or LABEL_CASES
    commit = git_commit(ref_dir)[:12]
    records = rec = RecordLog(started)


    clip_folder = fp16_exact_clip(work_dir, small_text=True)
    dino_path, sam_path = work_dir / "dino_vitb16_random.pth", work_dir / "sam_vit_b_random.pth"
    dino = random_dino(dino_dir, dino_path)
    harness = Harness(reference=REFERENCE, protocol="trident", segmentor=("trident", "Trident"),
                      configs=CONFIG_STEMS, variants=(), label_variant="", label_datasets=(),
                      full_text_dataset="voc21")
    stubs = {**stand_ins(), "openpyxl": stub_module("openpyxl")}
    theirs: dict[str, dict] = {}
    with hidden_modules(HIDDEN_PACKAGES), reference_imports(ref_dir, stubs), fp32_half(), \
            tempfile.TemporaryDirectory() as scratch:
        reference = TridentReference(harness, ref_dir, device, clip_folder, dino, sam_path)
        random_sam(importlib.import_module("segment_anything").sam_model_registry["vit_b"], sam_path)
        for label, ((height, width), dataset) in cases.items():
            seed = image_seed(label)
            # one segmentor at a time: each holds its CLIP, DINO, SAM and SAM's last attention (0.8 GB at 64x64)
            seg = reference.segmentor(dataset)
            theirs[label] = reference.run(seg, dataset, generated_image(height, width, seed), Path(scratch),
                                          record=label in dense_cases)
            del seg
            gc.collect()
            print(f"  [{time.time() - started:6.1f}s] reference {label} ({dataset})", flush=True)
    scorer = OVSegScorer(ovseg_trident(clip_folder, dino_path, sam_path), "trident", device=device)
    for label, ((height, width), dataset) in cases.items():
        image = generated_image(height, width, image_seed(label))
        ref = theirs[label]
        where = f"{dataset}, {height}x{width}; Trident {commit}"
        ours = ovseg_run(scorer, dataset, image, record=label in dense_cases)
        if label in dense_cases:
            halves = len(ours["affinity"])
            rec(tensor_record(REFERENCE, f"SAM affinity {label}", torch.stack(ours["affinity"]),
                              torch.stack(ref["affinity"]), protocol="trident",
                              detail=f"get_sam_sim on SAM ViT-B's last block ({halves} SAM pass(es)), "
                                     f"{tuple(ours['affinity'][0].shape)}; {where}"))
            rec(tensor_record(REFERENCE, f"spliced window tokens {label}", torch.cat(ours["spliced"]),
                              torch.cat(ref["spliced"]), protocol="trident",
                              detail=f"proxy attention per 336 window (DINO ViT-B/16), spliced, bilinear to SAM's "
                                     f"grid; {where}"))
            rec(tensor_record(REFERENCE, f"logits {label}", ours["logits"], ref["logits"], protocol="trident",
                              detail=f"cosines at the original size (get_trident_seg); {where}"))
        rec(label_record(REFERENCE, f"label map {label}", ours["labels"], ref["labels"], protocol="trident",
                         detail=f"ovseg test's evaluator vs get_trident_seg + postprocess_result; {where}"))
    if refinement:
        refinement_rows(ref_dir, rec)
    print(f"[{REFERENCE}] compared in {time.time() - started:.0f} s", flush=True)
    return records


__all__ = ["PROTOCOLS", "REFERENCE", "run"]


# -- SAM refinement ----------------------------------------------------------------------------------------------
#: refinement rows: (label size, classes, coarse_thresh, seed) — hand-made probabilities with several blobs per class
REFINEMENT_CASES: dict[str, tuple[tuple[int, int], int, float, int]] = {
    "refine 96x128": ((96, 128), 4, 0.2, 1),
    "refine 150x110": ((150, 110), 5, 0.15, 2),
    "refine 127x181": ((127, 181), 3, 0.0, 3),
}


def blob_probabilities(height: int, width: int, classes: int, seed: int) -> torch.Tensor:
    """Class probabilities ``[C,H,W]`` whose argmax has several connected regions per class: a softmax over
    Gaussian blobs (three per foreground class at random centres) with a weak flat background channel."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    scores = torch.full((classes, height, width), 0.0)
    scores[0] = 1.0
    for c in range(1, classes):
        for _ in range(3):
            cy, cx = torch.rand(2, generator=gen) * torch.tensor([height, width])
            sigma = 4 + 8 * float(torch.rand(1, generator=gen))
            scores[c] += 4 * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma ** 2))
    return (scores * 1.5).softmax(0)


def tiny_sam_state(build, seed: int = 0) -> dict:
    """A SAM with a one-block 64-wide image encoder (unused: the embedding is drawn) and the released prompt encoder
    and mask decoder shapes, every parameter random (the decoder's zero-initialised ones too)."""
    torch.manual_seed(seed)
    sam = build(encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=2, encoder_global_attn_indexes=[0])
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return sam.state_dict()


def refinement_inputs(label: str) -> dict:
    """One refinement case: probabilities, labels (argmax, 0 below the case's threshold), a random image embedding and
    the sizes ``SamPredictor.set_image`` would have given (the image rounded up to CLIP's patch, then SAM's input)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    (height, width), classes, coarse, seed = REFINEMENT_CASES[label]
    probs = blob_probabilities(height, width, classes, seed)
    labels = probs.argmax(0)
    labels[probs.max(0).values < 0.3] = 0
    original_size = (-(-height // 16) * 16, -(-width // 16) * 16)
    gen = torch.Generator().manual_seed(100 + seed)
    return dict(probs=probs, labels=labels, coarse=coarse, original_size=original_size,
                input_size=ResizeLongestSide.get_preprocess_shape(*original_size, 1024),
                embedding=torch.randn(1, 256, 64, 64, generator=gen))


def refinement_rows(ref_dir: Path, rec) -> None:
    """``sam_refinement`` (their ``seg_utils/utils.py`` with their ``SamPredictor``) vs
    :func:`ovseg.methods.sam_refinement.sam_refine_labels` on hand-made probabilities, the same random SAM prompt
    encoder / mask decoder and image embedding. The IoU threshold is the median of the case's predicted IoUs, so
    some regions are accepted and some fail."""
    from segment_anything.build_sam import _build_sam as our_build

    from ovseg.methods.sam_refinement import (SamRefinementSettings, predict_masks, region_prompts,
                                             sam_refine_labels)

    commit = git_commit(ref_dir)[:12]
    ours_sam = our_build(64, 1, 2, [0]).eval()
    with hidden_modules(HIDDEN_PACKAGES), reference_imports(ref_dir, {"openpyxl": stub_module("openpyxl")}):
        build = importlib.import_module("segment_anything.build_sam")._build_sam
        predictor_cls = importlib.import_module("segment_anything").SamPredictor
        their_refinement = importlib.import_module("seg_utils.utils").sam_refinement
        state = tiny_sam_state(lambda **kw: build(kw["encoder_embed_dim"], kw["encoder_depth"],
                                                  kw["encoder_num_heads"], kw["encoder_global_attn_indexes"]))
        their_sam = build(64, 1, 2, [0]).eval()
        their_sam.load_state_dict(state)
        ours_sam.load_state_dict(state)
        for label in REFINEMENT_CASES:
            case = refinement_inputs(label)
            probs, labels = case["probs"], case["labels"]
            settings = SamRefinementSettings(coarse_thresh=case["coarse"], minimal_area=8)
            half = (labels.shape[0] // 2, labels.shape[1] // 2)
            ious = torch.cat([predict_masks(ours_sam, case["embedding"], regions, prompt, half)[1]
                              for _, regions, prompt in region_prompts(labels, probs, settings)])
            settings = dataclasses.replace(settings, sam_iou_thresh=float(ious.median()))
            ours_labels, ours_scores = sam_refine_labels(labels, probs, ours_sam, case["embedding"],
                                                         case["input_size"], case["original_size"], settings)
            predictor = predictor_cls(their_sam)
            predictor.features = case["embedding"].clone()
            predictor.original_size, predictor.input_size = case["original_size"], case["input_size"]
            predictor.is_image_set = True
            image = np.zeros((*labels.shape, 3), np.uint8)
            their_labels, _, their_scores, _ = their_refinement(
                image, labels[None].clone(), probs.clone(), probs.shape[0], predictor, settings.coarse_thresh,
                settings.minimal_area, settings.sam_mask_coff, settings.sam_iou_thresh)
            changed = float((ours_labels != labels).float().mean())
            where = (f"{probs.shape[0]} classes, {tuple(labels.shape)}, coarse_thresh {settings.coarse_thresh}, "
                     f"{int((ious > settings.sam_iou_thresh).sum())}/{len(ious)} regions accepted, "
                     f"{changed:.1%} of labels changed; Trident {commit}")
            rec(label_record(REFERENCE, f"SAM refinement labels {label}", ours_labels, their_labels[0],
                             protocol="trident", detail=f"sam_refinement (seg_utils/utils.py), random SAM prompt "
                                                        f"encoder/mask decoder and embedding; {where}"))
            rec(tensor_record(REFERENCE, f"SAM refinement scores {label}", ours_scores, their_scores,
                              protocol="trident", detail=f"refined_logits incl. map_failed_regions; {where}"))
