"""What the SCLIP and NACLIP comparisons share: both repositories have one layout — OpenAI's ``clip/`` package
(patched for dense features), a segmentor on mmseg 1.x's ``BaseSegmentor`` (``clip_segmentor.py`` /
``naclip.py``), ``configs/cfg_*.py`` (a ``Resize`` test step and the segmentor's keyword arguments) and
``configs/cls_*.txt``. A :class:`Harness` names the differences; :func:`run_harness` does the comparison.

Reference side: the checkout's **unmodified** ``clip`` package and segmentor module, imported with small
stand-ins of ours for ``mmseg`` (``BaseSegmentor``, ``SegDataPreProcessor``, ``MODELS``) and ``pkg_resources``;
the real ``mmengine`` (``Config``, ``PixelData``, data elements) and ``mmcv`` 2.x (``LoadImageFromFile``,
``Resize``) from PyPI run the configs' test pipeline. Weights go through their ``clip.load(path)``.

ovseg side: :class:`~ovseg.methods.zeroshot.ZeroShotCLIP` on the same weights, scored by the shared evaluator under
the ovseg protocol (:class:`~ovseg.parity.common.OVSegScorer`).

Both sides run in float32 on the CPU (the references run CLIP in fp16 on a GPU: ``clip.load`` casts the weights
to fp16 and back to fp32 on the CPU, so the random weights are made fp16-exact first and both sides read the
same numbers).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovseg.parity.common import (
    IMAGE_SIZES,
    ParityRecord,
    generated_image,
    label_record,
    pkg_resources_stand_in,
    reference_imports,
    stub_module,
    tensor_record,
)

#: the image tower is ViT-B/16; the text tower of the label-map weights is small (2 layers, width 64) so that 80
#: templates × hundreds of class names encode in seconds on a CPU. The text embeddings are also compared on the
#: full ViT-B/16 text tower for a few names (:data:`FULL_TEXT_NAMES`).
SMALL_TEXT = {"width": 64, "heads": 1, "layers": 2}
FULL_TEXT_NAMES = 4
DENSE_SIZES: dict[str, tuple[int, int]] = {"224x224": (224, 224), "448x448": (448, 448), "333x500": (333, 500)}
#: the reference postprocess holds [classes, queries, rows, width] floats at once (synonym max); it runs on row
#: blocks of at most this many bytes (exact: every step but SCLIP's area rule is per pixel)
POSTPROCESS_BYTES = 512 * 2**20
#: ovseg dataset -> ``configs/cfg_<stem>.py``, the same in SCLIP, NACLIP and ClearCLIP
CONFIG_STEMS = {"voc21": "voc21", "voc20": "voc20", "context60": "context60", "context59": "context59",
                "coco_object": "coco_object", "coco_stuff171": "coco_stuff164k", "cityscapes": "city_scapes",
                "ade150": "ade20k"}


@dataclass(frozen=True)
class Variant:
    """One attention variant compared on both sides: the reference's switches and ovseg's ``CLIPConfig``."""

    label: str
    #: keyword arguments of the reference's ``encode_image`` (SCLIP: ``csa``)
    encode_kwargs: dict[str, Any] = field(default_factory=dict)
    #: NACLIP: ``visual.set_params(arch, attn_strategy, gaussian_std)``; None: nothing to set
    set_params: tuple | None = None
    #: ovseg ``CLIPConfig`` fields
    clip: dict[str, Any] = field(default_factory=dict)

    @property
    def detail(self) -> str:
        ours = ", ".join(f"{k}={v}" for k, v in self.clip.items())
        theirs = (f"set_params{self.set_params}" if self.set_params else
                  ", ".join(f"{k}={v}" for k, v in self.encode_kwargs.items()))
        return f"reference {theirs}; ovseg CLIPConfig({ours})"


@dataclass(frozen=True)
class Harness:
    reference: str  # "SCLIP"
    protocol: str  # the ovseg protocol checked
    segmentor: tuple[str, str]  # (module, class) in the checkout
    configs: dict[str, str]  # ovseg dataset -> configs/cfg_<stem>.py
    variants: tuple[Variant, ...]  # dense features for each
    label_variant: str  # the variant whose label maps are compared
    label_datasets: tuple[str, ...]
    #: the first :data:`FULL_TEXT_NAMES` classes of this dataset are encoded on the full ViT-B/16 text tower
    full_text_dataset: str
    #: keyword arguments every reference segmentor gets besides the config's (NACLIP: pamr_steps=0)
    segmentor_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    #: the reference side: a :class:`Reference` subclass and the context its imports need (``ref_dir`` ->
    #: context manager); None: :class:`Reference` inside :func:`reference_imports` with :func:`stand_ins`
    reference_type: Any = None
    imports: Any = None
    #: ovseg's side: ``(weights folder, label variant) -> method``; None: :func:`ovseg_method` (a ZeroShotCLIP)
    method_factory: Any = None

    def reference_context(self, ref_dir: Path):
        return self.imports(ref_dir) if self.imports else reference_imports(ref_dir, stand_ins())

    def open_reference(self, ref_dir: Path, device: str) -> Reference:
        return (self.reference_type or Reference)(self, ref_dir, device)


# -- stand-ins ------------------------------------------------------------------------------------------------
class _BaseSegmentor(torch.nn.Module):
    """``mmseg.models.segmentors.BaseSegmentor`` stand-in: an ``nn.Module`` holding its data preprocessor."""

    def __init__(self, data_preprocessor=None, init_cfg=None):
        super().__init__()
        self.data_preprocessor = data_preprocessor


class _SegDataPreProcessor(torch.nn.Module):
    """``mmseg.models.data_preprocessor.SegDataPreProcessor`` at test time (no ``size``/``size_divisor``): each
    ``[3,H,W]`` input's channels reversed (``rgb_to_bgr``/``bgr_to_rgb``), cast to float, ``(x - mean) / std``
    with ``mean``/``std`` as given (0-255 units), stacked."""

    def __init__(self, mean=None, std=None, rgb_to_bgr=False, bgr_to_rgb=False, **unused):
        super().__init__()
        if unused.get("size") or unused.get("size_divisor"):
            raise NotImplementedError("padding is not part of the SCLIP/NACLIP test pipeline")
        self.channel_conversion = bool(rgb_to_bgr or bgr_to_rgb)
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), False)

    def forward(self, data: dict, training: bool = False) -> dict:
        inputs = [x[[2, 1, 0], ...] if self.channel_conversion else x for x in data["inputs"]]
        # mmseg's preprocessor casts the data to its own device; this stand-in is never moved, so it follows the data
        inputs = [(x.float() - self.mean.to(x.device)) / self.std.to(x.device) for x in inputs]
        return {"inputs": torch.stack(inputs, dim=0), "data_samples": data.get("data_samples")}


def stand_ins() -> dict:
    from mmengine.registry import Registry

    return {
        "mmseg": stub_module("mmseg"),
        "mmseg.models": stub_module("mmseg.models"),
        "mmseg.models.segmentors": stub_module("mmseg.models.segmentors", BaseSegmentor=_BaseSegmentor),
        "mmseg.models.data_preprocessor": stub_module("mmseg.models.data_preprocessor",
                                                      SegDataPreProcessor=_SegDataPreProcessor),
        "mmseg.registry": stub_module("mmseg.registry", MODELS=Registry("parity-model")),
        # OpenAI's clip.py: `from pkg_resources import packaging` (setuptools >= 81 has no pkg_resources)
        "pkg_resources": pkg_resources_stand_in(),
    }


# -- weights --------------------------------------------------------------------------------------------------
def fp16_exact_clip(work_dir: Path, small_text: bool, seed: int = 0, model_name: str = "ViT-B-16",
                    vision_width: int | None = None) -> Path:
    """Random OpenAI-layout CLIP weights (``model_name``'s image tower, ViT-B/16 by default) rounded to fp16 values,
    saved as a state dict and as an open_clip ``local-dir`` folder (``open_clip_config.json`` + weights) that ovseg
    loads by name. With ``small_text`` the text tower is :data:`SMALL_TEXT`; otherwise it is the model's.
    ``vision_width``: a narrower image tower of the model's layout otherwise (same blocks, patch and input; heads of
    64 channels, as OpenAI's ``build_model`` infers them). Returns the folder."""
    import open_clip

    prefix = "vitb16" if model_name == "ViT-B-16" else model_name.lower().replace("-", "")
    narrow = f"-width{vision_width}" if vision_width else ""
    folder = Path(work_dir) / f"{prefix}{narrow}-fp16exact-{'smalltext' if small_text else 'fulltext'}-seed{seed}"
    weights = folder / "open_clip_pytorch_model.bin"
    if weights.is_file():
        return folder
    model_cfg = json.loads(json.dumps(open_clip.get_model_config(model_name)))
    if small_text:
        model_cfg["text_cfg"].update(SMALL_TEXT)
    if vision_width:
        model_cfg["vision_cfg"].update(width=vision_width, head_width=64)
    model_cfg["quick_gelu"] = True
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**model_cfg)
    # random init leaves positional embeddings etc. small; the text projection / logit scale as created
    state = {k: v.detach().half().float().clone() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
    }, indent=1))
    # a name of this process's own: parity runs started side by side may write the same folder at once
    tmp = weights.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    tmp.replace(weights)
    return folder


def ovseg_method(folder: Path, variant: Variant):
    from ovseg.methods.zeroshot import ZeroShotCLIP
    from ovseg.models.clip import CLIPConfig

    return ZeroShotCLIP(CLIPConfig(name=f"local-dir:{folder}", pretrained=None, quick_gelu=True, **variant.clip))


def set_variant(method, variant: Variant) -> None:
    """Switch ovseg's last block in place (the text tower and its cached embeddings do not depend on it)."""
    method.encoder.config = dataclasses.replace(method.encoder.config, **variant.clip)


# -- the reference --------------------------------------------------------------------------------------------
class Reference:
    """The checkout's segmentor module and configs, imported inside :func:`reference_imports`."""

    def __init__(self, harness: Harness, ref_dir: Path, device: str):
        self.harness, self.ref_dir, self.device = harness, Path(ref_dir).resolve(), device
        path_before = list(sys.path)
        module_name, class_name = harness.segmentor
        self.module = importlib.import_module(module_name)
        sys.path[:] = [p for p in sys.path if p in path_before]  # clip_segmentor.py appends ".."
        self.segmentor_class = getattr(self.module, class_name)
        self.clip = sys.modules["clip"]

    def config(self, dataset: str):
        from mmengine.config import Config

        return Config.fromfile(str(self.ref_dir / "configs" / f"cfg_{self.harness.configs[dataset]}.py"))

    def segmentor(self, dataset: str, weights: Path, **extra):
        model = dict(self.config(dataset).model)
        model.pop("type")
        model["clip_path"] = str(weights)
        model["name_path"] = str(self.ref_dir / model["name_path"])
        model.update(self.harness.segmentor_kwargs, **extra)
        seg = self.segmentor_class(device=torch.device(self.device), **model)
        return seg.eval()

    def pipeline(self, dataset: str) -> list:
        """The config's test pipeline up to the model input, with mmcv's own transforms (loading and Resize)."""
        from mmcv.transforms import LoadImageFromFile, Resize

        steps = []
        for step in self.config(dataset).test_pipeline:
            step = dict(step)
            kind = step.pop("type")
            if kind == "LoadImageFromFile":
                steps.append(LoadImageFromFile(**step))
            elif kind == "Resize":
                steps.append(Resize(**step))
            elif kind not in ("LoadAnnotations", "PackSegInputs"):
                raise NotImplementedError(f"{self.harness.reference} test pipeline step {kind!r}")
        return steps

    def model_input(self, seg, pipeline: list, image: np.ndarray, scratch: Path) -> torch.Tensor:
        """Their normalised model input ``[1,3,h,w]`` for an RGB uint8 image (see :meth:`prepare`)."""
        return self.prepare(seg, pipeline, image, scratch)["inputs"]

    def prepare(self, seg, pipeline: list, image: np.ndarray, scratch: Path) -> dict:
        """An RGB uint8 image saved as PNG, loaded (BGR), resized by the config's pipeline, packed
        (``PackSegInputs``: HWC -> CHW tensor, meta) and preprocessed by the segmentor's data preprocessor."""
        import cv2
        from mmengine.structures import BaseDataElement

        path = scratch / "image.png"
        cv2.imwrite(str(path), image[..., ::-1])
        results = {"img_path": str(path)}
        for step in pipeline:
            results = step(results)
        img = results["img"]
        sample = BaseDataElement(metainfo=dict(img_path=str(path), ori_shape=results["ori_shape"],
                                               img_shape=img.shape[:2]))
        inputs = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return seg.data_preprocessor({"inputs": [inputs.to(self.device)], "data_samples": [sample]}, False)

    def labels(self, seg, pipeline: list, image: np.ndarray, scratch: Path) -> torch.Tensor:
        """Their label map for an RGB uint8 image: :meth:`prepare`, then their ``predict``."""
        data = self.prepare(seg, pipeline, image, scratch)
        with torch.no_grad(), row_block_postprocess(seg):
            out = seg.predict(data["inputs"], data["data_samples"])
        return out[0].pred_sem_seg.data[0].cpu()


class row_block_postprocess:
    """Within the block, ``seg.postprocess_result`` runs on blocks of rows (their function, unchanged, called per
    block): the synonym max holds ``[classes, queries, rows, W]``, 10 GB for VOC at 2048×1024. Every step is per
    pixel except SCLIP's area rule, so a segmentor with an area threshold runs whole."""

    def __init__(self, seg):
        self.seg = seg

    def __enter__(self):
        seg, original = self.seg, self.seg.postprocess_result

        def blocks(seg_logits, data_samples):
            from mmengine.structures import BaseDataElement, PixelData

            queries, height, width = seg_logits.shape[1:]
            classes = int(max(seg.query_idx)) + 1
            rows = max(1, POSTPROCESS_BYTES // (4 * classes * queries * width))
            if getattr(seg, "area_thd", None) is not None or rows >= height:
                return original(seg_logits, data_samples)
            preds = []
            for r0 in range(0, height, rows):
                part = BaseDataElement()
                original(seg_logits[:, :, r0 : r0 + rows], [part])
                preds.append(part.pred_sem_seg.data)
            data_samples[0].set_data({"pred_sem_seg": PixelData(data=torch.cat(preds, dim=1))})
            return data_samples

        seg.postprocess_result = blocks
        return self

    def __exit__(self, *exc):
        del self.seg.postprocess_result  # the class's method again


# -- the comparison -------------------------------------------------------------------------------------------
def run_harness(harness: Harness, ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"),
                datasets: tuple[str, ...] | None = None, image_sizes: dict[str, tuple[int, int]] | None = None,
                full_text: bool = True, dense: bool = True, segmentor_kwargs: dict[str, Any] | None = None,
                overrides: dict[str, Any] | None = None, label: str = "labels",
                inputs: bool = True) -> list[ParityRecord]:
    """Dense tokens of every variant (``dense``), then per dataset the text embeddings and the model input (first
    dataset; both with ``inputs``) and the label maps of ``harness.label_variant`` on ``image_sizes``; the
    reference segmentor gets ``segmentor_kwargs`` on top of the harness's, ovseg's protocol ``overrides`` (e.g.
    NACLIP's PAMR on both sides); label-map rows are named ``"<label> <dataset> <size>"``."""
    from ovseg.eval.evaluator import dense_options
    from ovseg.eval.inference import protocol_resize
    from ovseg.parity.common import OVSegScorer, image_tensor

    name, protocol = harness.reference, harness.protocol
    work_dir = Path(work_dir)
    datasets = tuple(datasets or harness.label_datasets)
    image_sizes = image_sizes or IMAGE_SIZES
    folder = fp16_exact_clip(work_dir, small_text=True)
    weights = folder / "open_clip_pytorch_model.bin"
    variants = {v.label: v for v in harness.variants}
    records: list[ParityRecord] = []
    started = time.time()

    with harness.reference_context(ref_dir):
        ref = harness.open_reference(ref_dir, device)
        label_variant = variants[harness.label_variant]
        method = (harness.method_factory or ovseg_method)(folder, label_variant).to(device).eval()
        scorer = OVSegScorer(method, protocol, overrides, device=device)
        settings = scorer.evaluator.settings_for(None)

        # dense features: every variant, the protocol's dense options (positional-embedding interpolation)
        seg = ref.segmentor(datasets[0], weights)
        net = seg.net
        for variant in harness.variants if dense else ():
            if variant.set_params:
                net.visual.set_params(*variant.set_params)
            set_variant(method, variant)
            for size_name, (h, w) in DENSE_SIZES.items():
                image = torch.from_numpy(generated_image(h, w, seed=h + w)).permute(2, 0, 1)[None].float() / 255
                x = method.encoder.normalize(image.to(device))
                with torch.no_grad(), dense_options(method, settings):
                    ours = method.encoder.encode_tokens(x)
                    theirs = net.encode_image(x, return_all=True, **variant.encode_kwargs)
                records.append(tensor_record(
                    name, f"dense tokens {variant.label} {size_name}", ours, theirs, protocol=protocol,
                    detail=f"all {ours.shape[1]} tokens after ln_post/proj, fp32 CPU; {variant.detail}; "
                           f"pos_embed_interpolation={settings.pos_embed_interpolation}"))
        set_variant(method, label_variant)
        if label_variant.set_params:
            net.visual.set_params(*label_variant.set_params)
        del seg, net

        # label maps (and each dataset's text embeddings): the label variant, the protocol's dataset settings
        with tempfile.TemporaryDirectory() as scratch:
            for dataset in datasets:
                seg = ref.segmentor(dataset, weights, **(segmentor_kwargs or {}))
                if label_variant.set_params:
                    seg.net.visual.set_params(*label_variant.set_params)
                entry = scorer.entry(dataset)
                records.extend([tensor_record(
                    name, f"text embeddings {dataset}", entry.text, seg.query_features, protocol=protocol,
                    detail=f"{len(entry.vocabulary.queries)} names x 80 ImageNet templates (their "
                           f"openai_imagenet_template, ovseg clip80), small random text tower {SMALL_TEXT}")]
                               if inputs else [])
                pipeline = ref.pipeline(dataset)
                s = entry.settings
                for size_name, (h, w) in image_sizes.items():
                    image = generated_image(h, w, seed=7 * h + w)
                    if dataset == datasets[0] and inputs:
                        theirs = ref.model_input(seg, pipeline, image, Path(scratch))
                        ours = method.encoder.normalize(protocol_resize(
                            image_tensor(image)[None].to(device), s.short_side, s.long_side_max, None,
                            s.resize_library, s.resize_rule))
                        records.append(tensor_record(
                            name, f"model input {size_name}", ours, theirs, protocol=protocol,
                            detail=f"their LoadImageFromFile + Resize + SegDataPreProcessor vs ovseg "
                                   f"resize_library={s.resize_library}, resize_rule={s.resize_rule}, "
                                   f"normalization={s.normalization}: {tuple(theirs.shape[-2:])}"))
                    theirs = ref.labels(seg, pipeline, image, Path(scratch))
                    ours = scorer.labels(dataset, image)
                    present = torch.unique(theirs).numel()
                    pamr = f", PAMR {s.pamr_steps} steps, dilations {s.pamr_dilations}" if s.pamr_steps else ""
                    records.append(label_record(
                        name, f"{label} {dataset} {size_name}", ours, theirs, protocol=protocol,
                        detail=f"{label_variant.label}: {label_variant.detail}; {s.mode}"
                               f"{f' {s.crop}/{s.stride}' if s.mode == 'slide' else ''}, short side {s.short_side}, "
                               f"logit scale {s.logit_scale}, prob thd {s.prob_threshold}, area thd "
                               f"{s.area_threshold}{pamr}; {present} classes in the reference map; fp32 CPU"))
                del seg

    if full_text:
        records.extend(full_text_records(harness, ref_dir, device, work_dir, harness.full_text_dataset))
    print(f"[{name}] compared in {time.time() - started:.0f} s", flush=True)
    return records


def full_text_records(harness: Harness, ref_dir: Path, device: str, work_dir: Path, dataset: str) -> list:
    """Text embeddings on the full ViT-B/16 text tower for the first :data:`FULL_TEXT_NAMES` names of
    ``dataset``'s class file, 80 templates: their tokenizer/``encode_text``/ensemble vs ovseg's."""
    from ovseg.eval.protocols import load_protocol
    from ovseg.models.text import get_templates

    folder = fp16_exact_clip(work_dir, small_text=False)
    variant = harness.variants[0]
    with reference_imports(ref_dir, stand_ins()):
        ref = Reference(harness, ref_dir, device)
        lines = (ref.ref_dir / ref.config(dataset).model["name_path"]).read_text().splitlines(keepends=True)
        with tempfile.TemporaryDirectory() as scratch:
            names = Path(scratch) / "names.txt"
            names.write_text("".join(lines[:FULL_TEXT_NAMES]))
            seg_cls = ref.segmentor_class
            model = dict(ref.config(dataset).model)
            model.pop("type")
            model.update(clip_path=str(folder / "open_clip_pytorch_model.bin"), name_path=str(names),
                         **harness.segmentor_kwargs)
            seg = seg_cls(device=torch.device(device), **model)
        theirs = seg.query_features
    from ovseg.eval.evaluator import dataset_vocabulary
    from ovseg.data.specs import get_spec

    method = ovseg_method(folder, variant).to(device).eval()
    scorer_settings = load_protocol(harness.protocol).settings_for(dataset)
    spec = get_spec(dataset)
    vocabulary, _ = dataset_vocabulary(scorer_settings, dataset, spec.class_names, spec.background_index)
    queries = [n for synonyms in vocabulary.class_names[:FULL_TEXT_NAMES] for n in synonyms]
    ours = method.encode_text(queries, get_templates(scorer_settings.templates))
    return [tensor_record(harness.reference, "text embeddings ViT-B/16 text tower", ours, theirs,
                          protocol=harness.protocol,
                          detail=f"{dataset} classes 1-{FULL_TEXT_NAMES} ({len(queries)} names) x 80 templates")]
