"""ResCLIP (yvhangyang/ResCLIP) beside :class:`ovseg.methods.ResCLIP` under ovseg's ``naclip`` protocol:
``resclip_segmentor.py`` ``ResCLIPSegmentation`` with its ``configs/cfg_*.py`` (per-dataset ``temp_thd`` and
RCS/SFR weights), its ``clip/model.py`` (RCS, SFR) on the same random weights.

Compared: SFR's pieces on generated label grids (``create_patch_matrix`` vs :func:`~ovseg.methods.resclip.patch_labels`,
``generate_attention_sfr`` + ``custom_attn``'s ``/ max`` vs :func:`~ovseg.methods.resclip.feedback_attention`), the
window logits ``forward_feature`` of every baseline their code supports (``set_params(arch, attn_strategy, 5)``:
``wo_resi``/``resclip`` = the released method, ``w_resi``/``sclip``, ``wo_resi``/``clearclip``,
``w_resi``/``vanilla``), text embeddings, and label maps of ``predict`` on generated images of six sizes (VOC21,
whole image), slide-window label maps (:data:`SLIDE_LABELS`: Context60), and ViT-L/14
(:data:`LARGE_MODEL`: the released method's window logits, text embeddings and VOC21 label maps).

Their code is written for a GPU: ``create_patch_matrix`` / ``generate_attention_sfr`` call ``.cuda()`` and
``create_logit_temp`` moves its PAMR to ``torch.device('cuda')``. On a CPU run (``--device cpu``) those two are
stood in for while their code runs (:func:`cpu_stand_ins`: ``Tensor.cuda`` returns the tensor, ``clip.model``'s
``torch.device('cuda')`` is the CPU); nothing else of theirs is touched. Everything else is
:mod:`ovseg.parity.mmseg_clip`'s harness (stand-ins for ``mmseg``, fp16-exact random ViT-B/16 weights, mmcv's own
test pipeline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.parity.common import (
    IMAGE_SIZES,
    ParityRecord,
    generated_image,
    image_tensor,
    label_record,
    reference_imports,
    tensor_record,
)
from ovseg.parity.mmseg_clip import (
    CONFIG_STEMS,
    DENSE_SIZES,
    SMALL_TEXT,
    Harness,
    Reference,
    fp16_exact_clip,
    stand_ins,
)

PROTOCOLS = ("naclip",)

#: (reference ``set_params`` arch, attn_strategy) -> ovseg ``CLIPConfig`` fields of the baseline
BASELINES = {
    ("wo_resi", "resclip"): {"last_block": "naclip", "residual": "none", "ffn": False},
    ("w_resi", "sclip"): {"last_block": "qq_kk", "residual": "token", "ffn": True},
    ("wo_resi", "clearclip"): {"last_block": "qq", "residual": "none", "ffn": False},
    ("w_resi", "vanilla"): {"last_block": "vanilla", "residual": "token", "ffn": True},
}
METHOD = ("wo_resi", "resclip")
#: label maps of the committed run: whole-image VOC21 (background synonyms, probability threshold, its own temp_thd
#: and weights; the whole 2048x1024 image is SFR's largest grid, 42x21 patches). Their code on this 2-core CPU takes
#: about 25 min per 12 window-logit rows, so the committed run keeps the six sizes to one dataset and adds a few
#: sliding-window maps (:data:`SLIDE_LABELS`); ``datasets=`` (the parity test) names others (every dataset has its
#: own released settings)
LABEL_DATASETS = ("voc21",)
#: slide-window label maps of the committed run (the released configs other than VOC's: Resize to short side 336,
#: then 224 windows at stride 112; Context60's own settings). One map: a 336x504 input (8 windows) took 440 s of
#: their code here; the parity test adds Context60 at 397x541
SLIDE_LABELS = {"context60": ("context 333x500",)}
#: ViT-L/14 (base_config.py's other `clip_path`, the same configs/cfg_*.py): the released method's window logits and
#: VOC21 label maps on the fewest sizes that show them (a random ViT-L/14 is slow on a CPU)
LARGE_MODEL = "ViT-L-14"
LARGE_DATASET = "voc21"
LARGE_WINDOWS = {"224x224": (224, 224), "333x500": (333, 500)}
LARGE_LABEL_SIZES = ("voc 375x500", "odd 397x541")
#: window logits: the released method at every :data:`DENSE_SIZES` size, the other baselines on a 224x224 window
#: (the protocol's window)
OTHER_BASELINE_SIZES = {"224x224": (224, 224)}
#: patch-label grids for the SFR pieces: a window's, a whole VOC image's, a whole 2048x1024 image's
SFR_GRIDS = {"14x14": (14, 14), "21x31": (21, 31), "21x42": (21, 42)}

HARNESS = Harness(reference="ResCLIP", protocol="naclip", segmentor=("resclip_segmentor", "ResCLIPSegmentation"),
                  configs=CONFIG_STEMS, variants=(), label_variant="", label_datasets=LABEL_DATASETS,
                  full_text_dataset="cityscapes")


@contextlib.contextmanager
def cpu_stand_ins(device: str) -> Iterator[None]:
    """On a CPU: their ``.cuda()`` calls keep the tensor where it is and ``clip.model``'s ``torch.device('cuda')``
    is ``device``; on a GPU nothing changes."""
    if device.startswith("cuda"):
        yield
        return
    model = sys.modules["clip.model"]
    real_torch, real_cuda = model.torch, torch.Tensor.cuda

    def device_of(*args, **kwargs):
        if args and str(args[0]).startswith("cuda"):
            return torch.device(device)
        return torch.device(*args, **kwargs)

    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(real_torch, name)  # module-level __getattr__ (PEP 562)
    proxy.device = device_of
    model.torch = proxy
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        model.torch = real_torch
        torch.Tensor.cuda = real_cuda


def ovseg_resclip(folder: Path, baseline: dict):
    from ovseg.methods.resclip import ResCLIP
    from ovseg.models.clip import CLIPConfig

    return ResCLIP(CLIPConfig(name=f"local-dir:{folder}", pretrained=None, quick_gelu=True, **baseline))


def label_grid(rows: int, cols: int, seed: int, labels: int = 5) -> torch.Tensor:
    """A patch-label grid of blobs (so that paths between patches of one label do leave it) with scattered
    patches."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    grid = np.zeros((rows, cols), np.int64)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, rows), rng.uniform(0, cols), rng.uniform(2, max(rows, cols) / 3)
        grid[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.integers(0, labels)
    scatter = rng.random((rows, cols)) < 0.05
    grid[scatter] = rng.integers(0, labels, scatter.sum())
    return torch.from_numpy(grid)


def sfr_records(visual, device: str) -> list[ParityRecord]:
    """Their ``create_patch_matrix`` and ``generate_attention_sfr`` (+ ``/ max``) against ovseg's on generated
    inputs."""
    from ovseg.methods.resclip import feedback_attention, patch_labels

    records = []
    for name, (rows, cols) in SFR_GRIDS.items():
        grid = label_grid(rows, cols, seed=rows * cols).to(device)
        theirs = visual.generate_attention_sfr(grid, (rows, cols), gaussian_std=5.0, delete_same_entity=True)
        theirs = theirs / theirs.max()
        ours = feedback_attention(grid, 5.0, delete_same_entity=True)
        records.append(tensor_record("ResCLIP", f"SFR attention {name}", ours, theirs[0], protocol="naclip",
                                     detail="generate_attention_sfr(delete_same_entity=True, gaussian_std=5) / max "
                                            "vs ovseg feedback_attention on a generated blob label grid"))
        torch.manual_seed(rows + cols)
        logits = F.interpolate(torch.randn(1, 6, rows, cols), size=(rows * 16 + 7, cols * 16 + 5), mode="bilinear")
        probs = torch.softmax(logits * 4, dim=1).to(device)
        theirs = visual.create_patch_matrix(probs, (rows, cols), temp_thd=0.3)
        ours = patch_labels(probs, 16, 0.3)[0]
        records.append(label_record("ResCLIP", f"SFR patch labels {name}", ours, theirs, protocol="naclip",
                                    detail="create_patch_matrix(temp_thd=0.3) vs ovseg patch_labels on upsampled "
                                           "random probabilities (7 and 5 remainder pixels)"))
    return records


def window_logits_record(seg, method, entry, dataset: str, size_name: str, size: tuple[int, int], device: str,
                         quantity: str, detail: str) -> ParityRecord:
    """Their ``forward_feature`` on one generated window (upsampled to it) vs ovseg's ``dense_logits``, same
    upsampling."""
    from ovseg.eval.evaluator import dense_options

    h, w = size
    image = image_tensor(generated_image(h, w, seed=h + w))[None].to(device)
    with torch.no_grad(), dense_options(method, entry.settings), method.scoring(dataset):
        ours = method.dense_logits(image, entry.text)
        ours = F.interpolate(ours, size=(h, w), mode="bilinear", align_corners=False)
        theirs = seg.forward_feature(method.encoder.normalize(image))
    return tensor_record("ResCLIP", quantity, ours, theirs, protocol="naclip", detail=detail)


def labels_record(ref: Reference, seg, scorer, dataset: str, size_name: str, size: tuple[int, int], scratch: Path,
                  quantity: str, model_note: str) -> ParityRecord:
    """Their ``predict`` (mmcv's test pipeline of the dataset's config) vs ovseg's evaluator on one generated
    image."""
    h, w = size
    image = generated_image(h, w, seed=7 * h + w)
    theirs = ref.labels(seg, ref.pipeline(dataset), image, scratch)
    ours = scorer.labels(dataset, image)
    s = scorer.entry(dataset).settings
    tuned = scorer.method.settings[dataset]
    return label_record(
        "ResCLIP", quantity, ours, theirs, protocol="naclip",
        detail=f"{model_note} wo_resi/resclip, temp_thd {tuned.temp_thd}, rcs {tuned.rcs_weights}, sfr "
               f"{tuned.sfr_weights}; {s.mode}{f' {s.crop}/{s.stride}' if s.mode == 'slide' else ''}, short side "
               f"{s.short_side}, logit scale {s.logit_scale}, prob thd {s.prob_threshold}; "
               f"{torch.unique(theirs).numel()} classes in the reference map; fp32 CPU")


def large_model_records(ref: Reference, work_dir: Path, device: str, scratch: Path, report) -> None:
    """ViT-L/14 (:data:`LARGE_MODEL`): the released method's window logits and VOC21 label maps."""
    from ovseg.parity.common import OVSegScorer

    folder = fp16_exact_clip(work_dir, small_text=True, model_name=LARGE_MODEL)
    method = ovseg_resclip(folder, BASELINES[METHOD]).to(device).eval()
    scorer = OVSegScorer(method, "naclip", device=device)
    seg = ref.segmentor(LARGE_DATASET, folder / "open_clip_pytorch_model.bin")
    entry = scorer.entry(LARGE_DATASET)
    report(tensor_record("ResCLIP", f"text embeddings {LARGE_DATASET} ViT-L/14", entry.text, seg.query_features,
                         protocol="naclip", detail=f"{len(entry.vocabulary.queries)} names x 80 ImageNet templates, "
                                                   f"small random text tower {SMALL_TEXT}"))
    for size_name, size in LARGE_WINDOWS.items():
        report(window_logits_record(
            seg, method, entry, LARGE_DATASET, size_name, size, device, f"window logits ViT-L/14 {size_name}",
            detail=f"forward_feature (RCS + SFR, {LARGE_DATASET} settings), random fp16-exact ViT-L/14 (patch 14) vs "
                   "ovseg ResCLIP; fp32 CPU"))
    for size_name in LARGE_LABEL_SIZES:
        report(labels_record(ref, seg, scorer, LARGE_DATASET, size_name, IMAGE_SIZES[size_name], scratch,
                             f"labels {LARGE_DATASET} ViT-L/14 {size_name}", "ViT-L/14"))


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"),
        datasets: tuple[str, ...] | None = None, image_sizes: dict[str, tuple[int, int]] | None = None,
        dense: bool = True, slide_labels: dict[str, tuple[str, ...]] | None = None, large: bool = True,
        **unused) -> list[ParityRecord]:
    """The committed run by default; ``datasets`` / ``image_sizes`` (every size for every dataset),
    ``slide_labels`` (dataset -> :data:`~ovseg.parity.common.IMAGE_SIZES` names; default :data:`SLIDE_LABELS`),
    ``dense`` (window logits) and ``large`` (the ViT-L/14 rows) make smaller checks (the parity test)."""
    from ovseg.eval.inference import protocol_resize
    from ovseg.parity.common import OVSegScorer

    started = time.time()
    work_dir = Path(work_dir)
    datasets = tuple(datasets or LABEL_DATASETS)
    image_sizes = image_sizes or IMAGE_SIZES
    slide_labels = SLIDE_LABELS if slide_labels is None else slide_labels
    folder = fp16_exact_clip(work_dir, small_text=True)
    weights = folder / "open_clip_pytorch_model.bin"
    records: list[ParityRecord] = []

    def report(record: ParityRecord) -> None:
        records.append(record)
        value = (f"{record.max_rel_diff:.2e}" if record.max_rel_diff is not None
                 else f"{100 * record.identical_share:.4f} %")
        print(f"[ResCLIP] {record.quantity}: {value} {'ok' if record.passed else 'FAIL'} "
              f"({time.time() - started:.0f} s)", flush=True)

    with reference_imports(ref_dir, stand_ins()):
        ref = Reference(HARNESS, ref_dir, device)
        with cpu_stand_ins(device), tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            method = ovseg_resclip(folder, BASELINES[METHOD]).to(device).eval()
            scorer = OVSegScorer(method, "naclip", device=device)

            first = datasets[0]
            seg = ref.segmentor(first, weights)
            for record in sfr_records(seg.net.visual, device):
                report(record)

            # window logits of every baseline: forward_feature (upsampled to the window) vs ovseg's dense_logits
            entry = scorer.entry(first)
            for (arch, attn), baseline in (BASELINES.items() if dense else ()):
                seg.net.visual.set_params(arch, attn, 5.0)
                method.encoder.config = dataclasses.replace(method.encoder.config, **baseline)
                for size_name, size in (DENSE_SIZES if (arch, attn) == METHOD else OTHER_BASELINE_SIZES).items():
                    report(window_logits_record(
                        seg, method, entry, first, size_name, size, device,
                        f"window logits {arch}/{attn} {size_name}",
                        detail=f"forward_feature (RCS + SFR, {first} settings) vs ovseg ResCLIP CLIPConfig("
                               f"{', '.join(f'{k}={v}' for k, v in baseline.items())}); fp32 CPU"))
            seg.net.visual.set_params(*METHOD, 5.0)
            method.encoder.config = dataclasses.replace(method.encoder.config, **BASELINES[METHOD])
            del seg

            plan = [(dataset, dict(image_sizes)) for dataset in datasets]
            plan += [(dataset, {name: IMAGE_SIZES[name] for name in names}) for dataset, names in slide_labels.items()]
            for dataset, sizes in plan:
                seg = ref.segmentor(dataset, weights)
                entry = scorer.entry(dataset)
                s = entry.settings
                report(tensor_record(
                    "ResCLIP", f"text embeddings {dataset}", entry.text, seg.query_features, protocol="naclip",
                    detail=f"{len(entry.vocabulary.queries)} names x 80 ImageNet templates, small random text "
                           f"tower {SMALL_TEXT}"))
                pipeline = ref.pipeline(dataset)
                for size_name, (h, w) in sizes.items():
                    if dataset == first:
                        image = generated_image(h, w, seed=7 * h + w)
                        theirs = ref.model_input(seg, pipeline, image, scratch)
                        ours = method.encoder.normalize(protocol_resize(
                            image_tensor(image)[None].to(device), s.short_side, s.long_side_max, None,
                            s.resize_library, s.resize_rule))
                        report(tensor_record("ResCLIP", f"model input {size_name}", ours, theirs,
                                             protocol="naclip", detail=f"{tuple(theirs.shape[-2:])}"))
                    report(labels_record(ref, seg, scorer, dataset, size_name, (h, w), scratch,
                                         f"labels {dataset} {size_name}", "ViT-B/16"))
                del seg
            del method, scorer
            if large:
                large_model_records(ref, work_dir, device, scratch, report)
    print(f"[ResCLIP] compared in {time.time() - started:.0f} s", flush=True)
    return records
