"""ClearCLIP (mc-lan/ClearCLIP) beside :class:`ovseg.methods.ClearCLIP` and the ``clearclip`` protocol:

- the dense image features of the authors' vendored open_clip (``open_clip/transformer.py``
  ``VisionTransformer.forward(x, model_type, ignore_residual)`` with ``custom_attn``) against ovseg's last block with
  ``last_block="qq", residual="none", ffn=False``, on the same random ViT-B/16 weights, for ``model_type``
  ClearCLIP (and vanilla / SCLIP through the same switch);
- their segmentor (``clearclip_segmentor.py`` ``ClearCLIPSegmentation`` with ``configs/cfg_*.py``, ``model_type``
  ClearCLIP) against the shared evaluator under the ``clearclip`` protocol: text embeddings, model input and label
  maps of generated images of six sizes (:data:`~ovseg.parity.common.IMAGE_SIZES`, 2048x1024 included), through the
  SCLIP/NACLIP harness (:mod:`ovseg.parity.mmseg_clip`) with a :class:`ClearCLIPReference`.

Their checkout ships its own ``open_clip`` package under the same name as the installed one: it is imported while
ovseg's is set aside, and forgotten afterwards. Both sides run fp32 on the CPU with fp16-exact weights (as the
SCLIP/NACLIP comparisons): their ``create_model(..., precision='fp16')`` is answered with their own ``CLIP`` class
holding those weights in fp32, and their label maps come from their ``predict`` minus its ``inputs.half()``
(``forward_slide`` then ``postprocess_result``, both theirs). ``BLIP`` (other backbones, not imported by the
ClearCLIP path) is a stand-in: its ``transformers`` imports fail on current releases.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from ovseg.parity.common import ParityRecord, generated_image, reference_imports, stub_module, tensor_record
from ovseg.parity.mmseg_clip import (
    CONFIG_STEMS,
    DENSE_SIZES,
    Harness,
    Reference,
    Variant,
    fp16_exact_clip,
    run_harness,
    stand_ins,
)

PROTOCOLS = ("clearclip",)
#: their model_type -> ovseg CLIPConfig fields (their ignore_residual=True: the last block is its attention alone)
VARIANTS = {
    "ClearCLIP": {"last_block": "qq", "residual": "none", "ffn": False},
    "SCLIP": {"last_block": "qq_kk", "residual": "none", "ffn": False},
    "vanilla": {"last_block": "vanilla", "residual": "none", "ffn": False},
}


@contextlib.contextmanager
def their_open_clip(ref_dir: Path, stubs: dict | None = None, packages: tuple[str, ...] = ("open_clip",)
                    ) -> Iterator[object]:
    """The checkout's ``open_clip`` package, with the installed one set aside meanwhile and put back after (and
    ``stubs`` standing in for modules meanwhile, as :func:`~ovseg.parity.common.reference_imports`). ``packages``:
    every installed package the checkout vendors under the same name (ProxyCLIP: ``segment_anything`` too)."""
    packages = tuple(dict.fromkeys(("open_clip", *packages)))
    vendored = lambda name: any(name == p or name.startswith(p + ".") for p in packages)  # noqa: E731
    ours = {name: module for name, module in sys.modules.items() if vendored(name)}
    for name in ours:
        del sys.modules[name]
    try:
        with reference_imports(ref_dir, stubs):
            theirs = importlib.import_module("open_clip")
            if not str(getattr(theirs, "__file__", "")).startswith(str(Path(ref_dir).resolve())):
                raise RuntimeError(f"{ref_dir}: no vendored open_clip package (is this a ClearCLIP checkout?)")
            yield theirs
    finally:
        for name in [n for n in sys.modules if vendored(n)]:
            del sys.modules[name]
        sys.modules.update(ours)


def their_create_model(weights: Path):
    """A stand-in for their ``create_model('ViT-B/16', pretrained='openai', precision='fp16')``: their own ``CLIP``
    class (of the vendored open_clip imported now) holding the harness's fp16-exact weights ``weights`` in fp32 (the
    model settings from ``open_clip_config.json`` beside them)."""
    model_cfg = json.loads((Path(weights).parent / "open_clip_config.json").read_text())["model_cfg"]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    their_clip = sys.modules["open_clip"].model.CLIP

    def create_model(*args, **kwargs):
        net = their_clip(**model_cfg)
        net.load_state_dict(state)
        return net

    return create_model


def segmentor_imports(ref_dir: Path):
    """``clearclip_segmentor.py``'s imports: their open_clip, the mmseg stand-ins, and a ``BLIP`` stand-in."""
    stubs = stand_ins()
    for name in ("BLIP", "BLIP.models"):
        stubs[name] = stub_module(name)
    stubs["BLIP.models.blip_retrieval"] = stub_module("BLIP.models.blip_retrieval", blip_retrieval=None)
    return their_open_clip(ref_dir, stubs)


class ClearCLIPReference(Reference):
    """``ClearCLIPSegmentation`` on the harness's random weights (see the module docstring)."""

    def __init__(self, harness: Harness, ref_dir: Path, device: str):
        self.harness, self.ref_dir, self.device = harness, Path(ref_dir).resolve(), device
        path_before = list(sys.path)
        self.module = importlib.import_module("clearclip_segmentor")
        sys.path[:] = [p for p in sys.path if p in path_before]  # clearclip_segmentor.py appends ".."
        self.segmentor_class = self.module.ClearCLIPSegmentation

    def segmentor(self, dataset: str, weights: Path, **extra):
        model = dict(self.config(dataset).model)
        model.pop("type")
        # configs/base_config.py says model_type='vanilla'; the paper's rows are model_type='ClearCLIP'
        model.update(model_type="ClearCLIP", name_path=str(self.ref_dir / model["name_path"]), **extra)
        self.module.create_model = their_create_model(weights)
        try:
            seg = self.segmentor_class(device=torch.device(self.device), **model)
        finally:
            del self.module.create_model  # the module's own name again
        return seg.eval()

    def labels(self, seg, pipeline: list, image, scratch: Path) -> torch.Tensor:
        """Their ``predict`` without ``inputs.half()``: ``forward_slide`` (every config slides), then
        ``postprocess_result``."""
        from ovseg.parity.mmseg_clip import row_block_postprocess

        data = self.prepare(seg, pipeline, image, scratch)
        metas = [sample.metainfo for sample in data["data_samples"]]
        with torch.no_grad(), row_block_postprocess(seg):
            logits = seg.forward_slide(data["inputs"], metas, seg.slide_stride, seg.slide_crop)
            out = seg.postprocess_result(logits, data["data_samples"])
        return out[0].pred_sem_seg.data[0].cpu()


HARNESS = Harness(
    reference="ClearCLIP",
    protocol="clearclip",
    segmentor=("clearclip_segmentor", "ClearCLIPSegmentation"),
    configs=CONFIG_STEMS,
    variants=(Variant("ClearCLIP", clip=VARIANTS["ClearCLIP"]),),
    label_variant="ClearCLIP",
    # VOC21 (own names, threshold 0.5), Context60 (threshold 0.15), COCO-Object (own names, 0.4), Cityscapes
    # (224/224 windows)
    label_datasets=("voc21", "context60", "coco_object", "cityscapes"),
    full_text_dataset="voc21",
    reference_type=ClearCLIPReference,
    imports=segmentor_imports,
)


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), dense: bool = True,
        **kwargs) -> list[ParityRecord]:
    records = dense_records(ref_dir, device, work_dir) if dense else []
    fp16_exact_clip(Path(work_dir), small_text=True)  # made with ovseg's open_clip before theirs is imported
    records += run_harness(HARNESS, ref_dir, device, work_dir, dense=False, full_text=False, **kwargs)
    return records


def dense_records(ref_dir: Path, device: str, work_dir: Path) -> list[ParityRecord]:
    from ovseg.eval.evaluator import dense_options
    from ovseg.eval.protocols import load_protocol
    from ovseg.methods.zeroshot import ZeroShotCLIP
    from ovseg.models.clip import CLIPConfig

    started = time.time()
    folder = fp16_exact_clip(Path(work_dir), small_text=True)
    model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    state = torch.load(folder / "open_clip_pytorch_model.bin", map_location="cpu", weights_only=True)
    # their interpolate_pos_encoding is SCLIP's (bicubic, scale ((H // 16) + 0.1) / 14), the clearclip protocol's
    settings = load_protocol("clearclip").settings_for(None)
    records = []
    with their_open_clip(ref_dir) as theirs:
        reference = theirs.model.CLIP(**model_cfg).eval().to(device)
        missing, unexpected = reference.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"their CLIP does not take the weights: missing {missing}, unexpected {unexpected}")
        for model_type, clip in VARIANTS.items():
            method = ZeroShotCLIP(CLIPConfig(name=f"local-dir:{folder}", pretrained=None, quick_gelu=True, **clip))
            method = method.to(device).eval()
            for size_name, (h, w) in DENSE_SIZES.items():
                image = torch.from_numpy(generated_image(h, w, seed=h + w)).permute(2, 0, 1)[None].float() / 255
                x = method.encoder.normalize(image.to(device))
                with torch.no_grad(), dense_options(method, settings):
                    ours = method.encoder.encode_tokens(x)[:, 1:]  # their forward returns the patch tokens
                    reference_tokens = reference.visual(x, model_type, ignore_residual=True)
                records.append(tensor_record(
                    "ClearCLIP", f"dense tokens {model_type} {size_name}", ours, reference_tokens, protocol="clearclip",
                    detail=f"patch tokens after ln_post/proj, fp32 CPU; their visual(x, {model_type!r}, "
                           f"ignore_residual=True); ovseg CLIPConfig({', '.join(f'{k}={v}' for k, v in clip.items())})"
                           f", pos_embed_interpolation={settings.pos_embed_interpolation}"))
    print(f"[ClearCLIP] dense tokens compared in {time.time() - started:.0f} s", flush=True)
    return records
