"""ProxyCLIP (mc-lan/ProxyCLIP) beside :class:`ovseg.methods.ProxyCLIP` and the ``proxyclip`` protocol:
``ovseg parity --ref ProxyCLIP=DIR``.

Reference side: the checkout's **unmodified** ``proxyclip_segmentor.py`` ``ProxyCLIPSegmentation`` with its vendored
``open_clip`` (``VisionTransformer.forward(x, ex_feats, beta, gamma)``, ``custom_attn``), ``segment_anything``,
``mae`` and ``configs/cfg_*.py``, imported with the mmseg stand-ins of :mod:`ovseg.parity.mmseg_clip` (and one for
``openpyxl``, which only its result spreadsheet uses); the installed ``open_clip`` and ``segment_anything`` are set
aside meanwhile. Its weights:

- CLIP: the harness's fp16-exact random ViT-B/16 (:func:`~ovseg.parity.mmseg_clip.fp16_exact_clip`), answered to
  their ``create_model('ViT-B/16', pretrained='openai', precision='fp16')`` as their own ``CLIP`` class in fp32;
- DINO: ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb8')`` answered with the hub model built from a
  facebookresearch/dino checkout (``$OVSEG_PARITY_DINO``, else ``dino`` beside ``DIR``: ``hubconf.dino_vitb8
  (pretrained=False)``, its ``vision_transformer.VisionTransformer``), every parameter drawn at random; ovseg reads
  its state dict as a DINO checkpoint through timm (``VFMConfig(kind='dino', weights=<.pth>)``);
- SAM: a random ``sam_model_registry['vit_b']`` state dict saved as a checkpoint, read by their
  ``sam_model_registry['vit_b'](checkpoint=...)`` and by ``VFMConfig(kind='sam', weights=<.pth>)``;
- MAE: a random ``vit_base_patch16_224.mae`` state saved as MAE's ``{'model': ...}`` checkpoint (224 grid), read by
  their ``models_vit.vit_base_patch16(img_size=336)`` + ``interpolate_pos_embed`` and by ``VFMConfig(kind='mae')``.

Precision: their code runs CLIP and the VFM in fp16 (``precision='fp16'``, ``.half()`` on the VFM, its input and
CLIP's input). Both sides run fp32 on the CPU here: while their code runs, ``Tensor.half`` and ``Module.half`` leave
dtypes as they are (:func:`fp32_halves`); everything else is their code.

Rows: the DINO weights as timm loads them; per VFM (DINO ViT-B/8, SAM ViT-B, MAE ViT-B/16) on square windows (the
only windows their code reads correctly, see :mod:`ovseg.methods.proxyclip`): the VFM features their
``forward_feature`` hands to ``encode_image``, the proxy-attended patch features ``encode_image`` returns, and the
window logits ``forward_feature`` returns (bilinear to the window); the proxy last block alone on a non-square grid
(their ``custom_attn`` given the true ``token_size``); the text embeddings; the label maps of their ``predict`` under
the ``proxyclip`` protocol on generated images of six sizes (2048x1024 included) with a 2-block ViT-B/8 DINO (the
ViT-B/8 width and patch on fewer blocks, so that whole images run in minutes on a CPU; the 12-block model is compared
on the window rows), on VOC21, Context60, COCO-Object and Cityscapes, and on VOC21 once more without its probability
threshold on both sides (random weights leave every pixel of the thresholded maps background).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch

from ovseg.parity.common import (
    ParityRecord,
    generated_image,
    git_commit,
    reference_imports,
    state_dict_record,
    stub_module,
    tensor_record,
)
from ovseg.parity.mmseg_clip import Harness, Reference, Variant, fp16_exact_clip, run_harness, stand_ins

REFERENCE = "ProxyCLIP"
PROTOCOLS = ("proxyclip",)
#: ovseg dataset -> ProxyCLIP configs/cfg_<stem>.py
CONFIG_STEMS = {"voc21": "voc21", "voc20": "voc20", "context60": "context60", "context59": "context59",
                "coco_object": "coco_object", "coco_stuff171": "coco_stuff164k", "cityscapes": "city_scapes",
                "ade150": "ade20k", "ade847": "ade847", "pc459": "context459"}
#: square windows of the window rows: the protocol's 336 crop and Cityscapes' 224
WINDOW_SIZES: dict[str, tuple[int, int]] = {"336x336": (336, 336), "224x224": (224, 224)}
#: blocks of the label-map DINO (ViT-B/8 width and patch)
LABEL_DINO_DEPTH = 2


@contextlib.contextmanager
def fp32_halves() -> Iterator[None]:
    """``Tensor.half()`` and ``Module.half()`` leave dtypes as they are meanwhile: their fp16 casts become no-ops, so
    their code runs in fp32 beside ovseg."""
    tensor_half, module_half = torch.Tensor.half, torch.nn.Module.half
    torch.Tensor.half = lambda self, memory_format=torch.preserve_format: self
    torch.nn.Module.half = lambda self: self
    try:
        yield
    finally:
        torch.Tensor.half, torch.nn.Module.half = tensor_half, module_half


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved by N(0, 0.02) noise (LayerNorms at 1/0, zero positional embeddings and SAM's
    zero-initialised relative positions would hide a swapped or missing tensor)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def dino_checkout(dino_dir: Path | None, ref_dir: Path, reference: str) -> Path:
    """The facebookresearch/dino checkout whose torch.hub model a reference loads: ``dino_dir``, else
    ``$OVSEG_PARITY_DINO``, else ``dino`` beside ``ref_dir``; one line naming the folder when it has no hubconf.py."""
    dino_dir = Path(dino_dir or os.environ.get("OVSEG_PARITY_DINO") or ref_dir.parent / "dino").resolve()
    if not (dino_dir / "hubconf.py").is_file():
        raise FileNotFoundError(f"{reference} parity needs a facebookresearch/dino checkout (their torch.hub model): "
                                f"{dino_dir} has no hubconf.py; set OVSEG_PARITY_DINO or put it beside {ref_dir}")
    return dino_dir


def dino_hub_model(dino_dir: Path, depth: int = 12, seed: int = 0) -> torch.nn.Module:
    """facebookresearch/dino's ``dino_vitb8`` (``hubconf.dino_vitb8(pretrained=False)``; with ``depth`` < 12 its
    ``vision_transformer.VisionTransformer`` with the same settings on fewer blocks), random weights."""
    with reference_imports(dino_dir):
        hubconf = importlib.import_module("hubconf")
        torch.manual_seed(seed)
        if depth == 12:
            model = hubconf.dino_vitb8(pretrained=False)
        else:
            model = hubconf.vits.VisionTransformer(patch_size=8, embed_dim=768, depth=depth, num_heads=12, mlp_ratio=4,
                                                   qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                                   num_classes=0)
    return _perturbed(model, seed)


@dataclass
class VFMSetup:
    """One VFM on both sides: their ``vfm_model`` / ``checkpoint`` / ``torch.hub.load`` answer, ovseg's config."""

    kind: str  #: their vfm_model
    checkpoint: Path | None  #: their checkpoint argument (SAM, MAE)
    hub_model: torch.nn.Module | None  #: what torch.hub.load returns (DINO)
    ours: Any  #: ovseg VFMConfig
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)


def _save(state: Any, path: Path) -> Path:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def dino_setup(dino_dir: Path, work_dir: Path, depth: int = 12) -> VFMSetup:
    from ovseg.models.vfm import VFMConfig

    hub = dino_hub_model(dino_dir, depth)
    path = _save(hub.state_dict(), work_dir / f"dino_vitb8_depth{depth}_random.pth")
    kwargs = {} if depth == 12 else {"depth": depth}
    return VFMSetup("dino", None, hub, VFMConfig(kind="dino", name="vit_base_patch8_224.dino", weights=str(path),
                                                 model_kwargs=kwargs),
                    f"DINO ViT-B/8{'' if depth == 12 else f' ({depth} blocks)'}: their torch.hub dino_vitb8 "
                    f"(facebookresearch/dino checkout, random) vs timm vit_base_patch8_224.dino on its state dict")


def sam_setup(work_dir: Path, seed: int = 1) -> VFMSetup:
    from segment_anything import sam_model_registry

    from ovseg.models.vfm import VFMConfig

    torch.manual_seed(seed)
    sam = _perturbed(sam_model_registry["vit_b"](checkpoint=None), seed)
    path = _save(sam.state_dict(), work_dir / "sam_vit_b_random.pth")
    return VFMSetup("sam", path, None, VFMConfig(kind="sam", name="vit_b", weights=str(path)),
                    "SAM ViT-B image encoder at 1024x1024 (random sam_vit_b checkpoint), neck output")


def mae_setup(work_dir: Path, seed: int = 2) -> VFMSetup:
    import timm

    from ovseg.models.vfm import VFMConfig

    torch.manual_seed(seed)
    mae = _perturbed(timm.create_model("vit_base_patch16_224.mae", pretrained=False, num_classes=0), seed)
    path = _save({"model": mae.state_dict()}, work_dir / "mae_vitb16_random.pth")
    return VFMSetup("mae", path, None, VFMConfig(kind="mae", weights=str(path), input_size=336),
                    "MAE ViT-B/16 at 336x336 (random 224 checkpoint, positional embedding resized on load)")


def segmentor_imports(ref_dir: Path):
    """``proxyclip_segmentor.py``'s imports: their open_clip and segment_anything (the installed ones set aside),
    the mmseg stand-ins, and an ``openpyxl`` stand-in (``myutils.py``'s spreadsheet writer, not used here)."""
    from ovseg.parity.clearclip import their_open_clip

    stubs = stand_ins()
    stubs["openpyxl"] = stub_module("openpyxl")
    return their_open_clip(ref_dir, stubs, packages=("segment_anything",))


class ProxyCLIPReference(Reference):
    """``ProxyCLIPSegmentation`` on the harness's random CLIP and a :class:`VFMSetup` (see the module docstring)."""

    def __init__(self, harness: Harness, ref_dir: Path, device: str, setup: VFMSetup):
        self.harness, self.ref_dir, self.device, self.setup = harness, Path(ref_dir).resolve(), device, setup
        path_before = list(sys.path)
        self.module = importlib.import_module("proxyclip_segmentor")
        sys.path[:] = [p for p in sys.path if p in path_before]  # proxyclip_segmentor.py appends ".."
        self.segmentor_class = self.module.ProxyCLIPSegmentation

    def segmentor(self, dataset: str, weights: Path, **extra):
        from ovseg.parity.clearclip import their_create_model

        def hub_load(*args, **kwargs):  # their torch.hub.load('facebookresearch/dino:main', 'dino_vitb8')
            if self.setup.hub_model is None:
                raise RuntimeError(f"ProxyCLIP parity: torch.hub.load{args} was not expected for {self.setup.kind}")
            return self.setup.hub_model

        model = dict(self.config(dataset).model)
        model.pop("type")
        model.update(vfm_model=self.setup.kind, name_path=str(self.ref_dir / model["name_path"]), **extra)
        if self.setup.checkpoint is not None:
            model["checkpoint"] = str(self.setup.checkpoint)
        self.module.create_model = their_create_model(weights)
        hub = torch.hub.load
        torch.hub.load = hub_load
        try:
            with fp32_halves():
                seg = self.segmentor_class(device=torch.device(self.device), **model)
        finally:
            del self.module.create_model  # the module's own name again
            torch.hub.load = hub
        seg.net = seg.clip  # the harness reads the CLIP as .net
        return seg.eval()

    def labels(self, seg, pipeline: list, image, scratch: Path) -> torch.Tensor:
        """Their ``predict`` (``forward_slide``, ``postprocess_result``) in fp32 (:func:`fp32_halves`)."""
        with fp32_halves():
            return super().labels(seg, pipeline, image, scratch)


def _method(folder: Path, setup: VFMSetup):
    from ovseg.methods.proxyclip import ProxyCLIP
    from ovseg.models.clip import CLIPConfig

    return ProxyCLIP(clip=CLIPConfig(name=f"local-dir:{folder}", pretrained=None, quick_gelu=True), vfm=setup.ours)


def harness_for(setup: VFMSetup) -> Harness:
    return Harness(
        reference=REFERENCE,
        protocol="proxyclip",
        segmentor=("proxyclip_segmentor", "ProxyCLIPSegmentation"),
        configs=CONFIG_STEMS,
        variants=(Variant(f"ProxyCLIP {setup.kind}"),),
        label_variant=f"ProxyCLIP {setup.kind}",
        # VOC21 (own names with background synonyms, threshold 0.2), Context60 (0.15), COCO-Object (own names,
        # 0.25), Cityscapes (short side 448, 224/112 windows)
        label_datasets=("voc21", "context60", "coco_object", "cityscapes"),
        full_text_dataset="voc21",
        reference_type=partial(ProxyCLIPReference, setup=setup),
        imports=segmentor_imports,
        method_factory=lambda folder, variant: _method(folder, setup),
    )


def window_records(ref_dir: Path, setup: VFMSetup, device: str, work_dir: Path,
                   sizes: dict[str, tuple[int, int]] | None = None) -> list[ParityRecord]:
    """Per square window: the VFM features, the proxy-attended patch features and the window logits of their
    ``forward_feature`` against ovseg's, on the same normalised window (voc21's class names, their text embeddings
    on both sides so that the row checks the image side)."""
    from ovseg.eval.evaluator import dense_options
    from ovseg.eval.protocols import load_protocol

    folder = fp16_exact_clip(work_dir, small_text=True)
    weights = folder / "open_clip_pytorch_model.bin"
    method = _method(folder, setup).to(device).eval()  # built before their segment_anything is imported
    settings = load_protocol("proxyclip").settings_for("voc21")
    harness = harness_for(setup)
    records = []
    with segmentor_imports(ref_dir):
        ref = harness.open_reference(ref_dir, device)
        seg = ref.segmentor("voc21", weights)
        captured: dict[str, torch.Tensor] = {}
        encode_image = seg.clip.encode_image

        def capture(image, external_feats, beta, gamma, **kwargs):
            captured["proxy"] = external_feats.clone()
            out = encode_image(image, external_feats, beta, gamma, **kwargs)
            captured["features"] = out.clone()  # forward_feature normalises it in place
            return out

        seg.clip.encode_image = capture
        text = seg.query_features
        for size_name, (h, w) in (sizes or WINDOW_SIZES).items():
            image01 = torch.from_numpy(generated_image(h, w, seed=h + 3 * w)).permute(2, 0, 1)[None].float() / 255
            image01 = image01.to(device)
            x = method.encoder.normalize(image01)
            with torch.no_grad(), fp32_halves():
                their_logits = seg.forward_feature(x)
            with torch.no_grad(), dense_options(method, settings):
                proxy = method.vfm(image01)
                features = method.dense_features(image01)
                logits = torch.nn.functional.interpolate(method.logits_from_features(features, text), size=(h, w),
                                                         mode="bilinear")
            grid = tuple(proxy.shape[-2:])
            label = f"{setup.kind} {size_name}"
            records.append(tensor_record(
                REFERENCE, f"VFM features {label}", proxy, captured["proxy"], protocol="proxyclip",
                detail=f"{setup.detail}; {tuple(proxy.shape[1:])}; fp32 CPU"))
            records.append(tensor_record(
                REFERENCE, f"proxy features {label}", features.flatten(2).transpose(1, 2), captured["features"],
                protocol="proxyclip",
                detail=f"their clip.encode_image(img, ex_feats, beta=1.2, gamma=3.0) vs ovseg ProxyCLIP.dense_features"
                       f" ({grid[0]}x{grid[1]} VFM grid, {h // 16}x{w // 16} CLIP grid); fp32 CPU"))
            records.append(tensor_record(
                REFERENCE, f"window logits {label}", logits, their_logits, protocol="proxyclip",
                detail=f"their forward_feature (cosine logits bilinear to the window) vs ovseg; "
                       f"{text.shape[0]} voc21 queries, their text embeddings on both sides; fp32 CPU"))
        del seg
    return records


def proxy_block_records(ref_dir: Path, device: str, work_dir: Path) -> list[ParityRecord]:
    """The proxy last block alone on a non-square window: their ``custom_attn(blk.attn, blk.ln_1(x), ex_feats,
    beta, gamma, token_size)`` with the true (rows, cols) against ovseg's :func:`~ovseg.methods.proxyclip.
    proxy_last_block`, random tokens on the harness CLIP's last block and random VFM features on another grid."""
    import json

    from ovseg.methods.proxyclip import proxy_last_block
    from ovseg.models.clip import TransformerBlockView

    folder = fp16_exact_clip(work_dir, small_text=True)
    model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    state = torch.load(folder / "open_clip_pytorch_model.bin", map_location="cpu", weights_only=True)
    records = []
    generator = torch.Generator().manual_seed(5)
    with segmentor_imports(ref_dir) as theirs:
        net = theirs.model.CLIP(**model_cfg).eval().to(device)
        net.load_state_dict(state)
        block = net.visual.transformer.resblocks[-1]
        for (rows, cols), (height, width), channels in (((7, 11), (9, 13), 48), ((21, 21), (42, 42), 768)):
            x = torch.randn(1, 1 + rows * cols, block.attn.embed_dim, generator=generator).to(device)
            proxy = torch.randn(1, channels, height, width, generator=generator).to(device)
            with torch.no_grad():
                their = net.visual.custom_attn(block.attn, block.ln_1(x.transpose(0, 1)), ex_feats=proxy, beta=1.2,
                                               gamma=3.0, token_size=(rows, cols)).transpose(0, 1)
                ours = proxy_last_block(x, TransformerBlockView.from_open_clip(block), (rows, cols), proxy)
            records.append(tensor_record(
                REFERENCE, f"proxy last block {rows}x{cols} CLIP grid, {height}x{width} VFM grid", ours, their,
                protocol="proxyclip",
                detail=f"their custom_attn (token_size=({rows}, {cols})) vs ovseg proxy_last_block; random tokens, "
                       f"random {channels}-channel VFM features; beta 1.2, gamma 3.0; fp32 CPU"))
    return records


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), *,
        dino_dir: Path | None = None, kinds: tuple[str, ...] = ("dino", "sam", "mae"),
        window_sizes: dict[str, tuple[int, int]] | None = None, datasets: tuple[str, ...] | None = None,
        image_sizes: dict[str, tuple[int, int]] | None = None, label_dino_depth: int = LABEL_DINO_DEPTH,
        labels: bool = True) -> list[ParityRecord]:
    """Compare ProxyCLIP's released code with ovseg (see the module docstring); ``dino_dir``: a facebookresearch/dino
    checkout (default ``$OVSEG_PARITY_DINO``, else ``dino`` beside ``ref_dir``). The keyword arguments allow a small,
    fast variant (tests)."""
    started = time.time()
    ref_dir = Path(ref_dir).resolve()
    if not (ref_dir / "proxyclip_segmentor.py").is_file():
        raise FileNotFoundError(f"{ref_dir}: no proxyclip_segmentor.py (is this a ProxyCLIP checkout?)")
    dino_dir = dino_checkout(dino_dir, ref_dir, REFERENCE)
    work_dir = Path(work_dir).resolve() / "proxyclip"
    work_dir.mkdir(parents=True, exist_ok=True)
    commit = git_commit(ref_dir)[:12]
    fp16_exact_clip(work_dir, small_text=True)  # made with ovseg's open_clip before theirs is imported
    records: list[ParityRecord] = []

    def report(new: list[ParityRecord]) -> None:
        for record in new:
            value = (f"{record.max_rel_diff:.2e}" if record.max_rel_diff is not None
                     else f"{100 * record.identical_share:.4f} %")
            record.detail += f"; ProxyCLIP {commit}"
            print(f"  [{time.time() - started:6.1f}s] {record.quantity}: {value} {'ok' if record.passed else 'FAIL'}",
                  flush=True)
        records.extend(new)

    report(proxy_block_records(ref_dir, device, work_dir))
    for kind in kinds:
        if kind == "dino":
            setup = dino_setup(dino_dir, work_dir)
            report([weights_record(setup)])
        elif kind == "sam":
            setup = sam_setup(work_dir)
            # SAM reads every window at 1024x1024: another window size only changes CLIP's grid (the other rows')
            sizes = window_sizes or {"336x336": WINDOW_SIZES["336x336"]}
            report(window_records(ref_dir, setup, device, work_dir, sizes))
            continue
        elif kind == "mae":
            setup = mae_setup(work_dir)
        else:
            raise ValueError(f"ProxyCLIP parity: VFM kind must be dino, sam or mae, got {kind!r}")
        report(window_records(ref_dir, setup, device, work_dir, window_sizes))
    if labels:
        setup = dino_setup(dino_dir, work_dir, depth=label_dino_depth)
        harness = harness_for(setup)
        report(run_harness(harness, ref_dir, device, work_dir, datasets=datasets, image_sizes=image_sizes,
                           full_text=False, dense=False))
        # random weights leave every pixel below VOC21's 0.2 threshold (background): the same maps without the
        # threshold on both sides check the class scores themselves (26 background synonyms, their max)
        report(run_harness(harness, ref_dir, device, work_dir, datasets=("voc21",), image_sizes=image_sizes,
                           full_text=False, dense=False, inputs=False, segmentor_kwargs={"prob_thd": 0.0},
                           overrides={"prob_threshold": None}, label="labels without threshold"))
    print(f"[{REFERENCE}] compared in {time.time() - started:.0f} s", flush=True)
    return records


def weights_record(setup: VFMSetup) -> ParityRecord:
    """The hub DINO's tensors against what timm loads from its state dict (every tensor, the same keys)."""
    from ovseg.models.vfm import VisionFoundationModel

    return state_dict_record(REFERENCE, "weights: hub dino_vitb8 -> timm vit_base_patch8_224.dino", "proxyclip",
                             setup.hub_model.state_dict(), VisionFoundationModel(setup.ours).model.state_dict())
