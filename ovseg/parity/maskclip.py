"""Parity with MaskCLIP's released mmseg code (github.com/chongzhou96/MaskCLIP) under the ``maskclip`` protocol.

The reference side runs the checkout's **unmodified** files: ``tools/maskclip_utils/convert_clip_weights.py``
(converts the CLIP weights to the mmseg backbone / head layout), ``tools/maskclip_utils/prompt_engineering.py``
(class lists, templates, ``zeroshot_classifier``), the configs under ``configs/maskclip/``, and the mmseg model
and pipeline files (``VisionTransformer``, ``MaskClipHead``, ``EncoderDecoder``, ``LoadImageFromFile`` /
``MultiScaleFlipAug`` / ``Resize`` / ``Normalize``). What they import from outside comes from PyPI where it
imports cleanly — ``mmcv==1.7.2`` (the lite build, pure Python; MaskCLIP pins mmcv < 1.5, whose lite build does
not install on this Python) and ``openai-clip`` (OpenAI's ``clip`` package) — plus small stand-ins written here:

- ``mmseg`` (and the ``mmseg.models`` / ``mmseg.datasets`` sub-packages) as bare packages over the checkout's
  folders, so their ``__init__`` files (mmcv version assertion, every dataset and model of the fork) do not run;
- ``mmcv.ops`` (compiled operators of mmcv-full, imported by loss/head modules MaskCLIP does not use) and
  ``mmseg.datasets.pipelines.corruptions`` (the corruption-benchmark transform: skimage, wand, scipy);
- ``pkg_resources`` (``clip`` imports ``packaging`` through it; newer setuptools no longer ship it);
- the ``clip`` module seen by the two tools: OpenAI's ``clip.tokenize`` and, for ``clip.load`` (whatever model
  name the script asks for), what ``clip.load`` does with a state-dict file: OpenAI's ``build_model`` on the
  random weights, on the requested device in fp32, and ``Tensor.cuda`` a no-op on a CPU run
  (``zeroshot_classifier`` moves its tensors with ``.cuda()``);
- ``torch.load`` maps to the requested device while MaskCLIP's head loads its files (it asks for ``'cuda'``).

OpenAI's ``clip.load`` casts the weights to fp16 before loading them (``convert_weights``), as the released CLIP
weights are fp16; the random weights are therefore drawn on the fp16 grid (``fp16_grid_weights``) so that both
sides hold the same numbers.

ovseg's side is :class:`ovseg.methods.MaskCLIP` (``last_block="value"``) scored by the shared evaluator under the
``maskclip`` protocol (:class:`~ovseg.parity.common.OVSegScorer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import runpy
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ovseg.parity.common import (
    FEATURE_TOLERANCE,
    IMAGE_SIZES,
    OVSegScorer,
    ParityRecord,
    generated_image,
    label_record,
    pkg_resources_stand_in,
    random_openai_clip,
    reference_imports,
    tensor_record,
)

REFERENCE = "MaskCLIP"
PROTOCOLS = ("maskclip",)

#: ovseg dataset -> (MaskCLIP config, class list in prompt_engineering.py, text set name, background prepended)
DATASETS: dict[str, tuple[str, str, str, bool]] = {
    "voc20": ("configs/maskclip/maskclip_vit16_512x512_voc12aug_20.py", "voc_classes", "voc", False),
    "voc21": ("configs/maskclip/maskclip_vit16_512x512_voc12aug_20.py", "voc_classes", "voc", True),
    "context59": ("configs/maskclip/maskclip_vit16_520x520_pascal_context_59.py", "pascal_context_classes",
                  "context", False),
    "context60": ("configs/maskclip/maskclip_vit16_520x520_pascal_context_59.py", "pascal_context_classes",
                  "context", True),
    "coco_stuff171": ("configs/maskclip/maskclip_vit16_512x512_coco-stuff164k.py", "coco_stuff_classes", "stuff",
                      False),
}
#: open_clip model name -> (MaskCLIP's model tag in convert_clip_weights.py / pretrain file names, the infix of its
#: configs/maskclip/maskclip_<infix>_*.py config files)
MODEL_TAGS: dict[str, tuple[str, str]] = {"ViT-B-16": ("ViT16", "vit16"), "RN50": ("RN50", "r50"),
                                          "RN50x16": ("RN50x16", "r50x16")}
#: the CLIP ResNets compared (dense features, head logits, label maps): RN50 and a wider one with its own config
RESNETS: tuple[str, ...] = ("RN50", "RN50x16")
#: MaskCLIP's refinements as its ``kspd`` configs set them (configs/maskclip_plus/anno_free/*kspd*.py,
#: ``ks_thresh=1.0, pd_thresh=0.5``), and each alone
REFINEMENTS: dict[str, tuple[float, float]] = {"KS+PD": (1.0, 0.5), "KS": (1.0, 0.0), "PD": (0.0, 0.5)}
#: dense-feature comparison sizes: the trained size, twice it, and one that is not a multiple of 16
FEATURE_SIZES: dict[str, tuple[int, int]] = {"224x224": (224, 224), "448x448": (448, 448), "odd 250x330": (250, 330)}
#: class names whose 85-template text embeddings are compared (raw MaskCLIP spellings: ADE's "bed " keeps its space)
TEXT_NAMES = ("airplane", "bed ", "brick wall", "tv monitor")
#: templates of the label-map runs: MaskCLIP's ``--no-prompt-eng`` set (``prompt_engineering.py``), which is
#: ovseg's ``single``; the 85-template ensemble is checked on TEXT_NAMES (85 templates for 300+ names would take
#: ~20 min of CPU per side). ``run(..., label_templates="maskclip85")`` runs the protocol's own templates.
LABEL_TEMPLATES = "single"


# -- inputs ---------------------------------------------------------------------------------------------------
def fp16_grid_weights(work_dir: Path, model_name: str = "ViT-B-16") -> Path:
    """Random OpenAI-layout CLIP weights rounded to fp16 values (stored as fp32), like OpenAI's released weights:
    OpenAI's ``clip.load`` rounds every weight to fp16 before use, ovseg (open_clip) does not."""
    path = Path(work_dir) / f"random-openai-{model_name}-fp16grid.pt"
    if not path.is_file():
        source = random_openai_clip(Path(work_dir) / f"random-openai-{model_name}.pt", model_name)
        state = torch.load(source, map_location="cpu")
        state = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    return path


# -- stand-ins ------------------------------------------------------------------------------------------------
def _package(name: str, folder: Path) -> types.ModuleType:
    """A package whose submodules load from ``folder`` without running its ``__init__.py``."""
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    return module


def _mmcv_ops() -> types.ModuleType:
    module = types.ModuleType("mmcv.ops")

    def missing(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} is not available in the parity stand-in (mmcv-full operator)")

        return unavailable

    module.__getattr__ = missing  # PEP 562: any name imports, and fails only if called
    return module


def _pkg_resources() -> types.ModuleType:
    import packaging.version

    module = types.ModuleType("pkg_resources")
    module.packaging = packaging
    return module


def _stubs(ref_dir: Path) -> dict[str, types.ModuleType]:
    mmseg = ref_dir / "mmseg"
    stubs = {name: _package(name, mmseg.joinpath(*name.split(".")[1:])) for name in (
        "mmseg", "mmseg.models", "mmseg.models.backbones", "mmseg.models.decode_heads", "mmseg.models.segmentors",
        "mmseg.datasets")}
    stubs["mmcv.ops"] = _mmcv_ops()
    # the image-corruption benchmark transform (skimage, wand, scipy); not part of the test pipeline
    stubs["mmseg.datasets.pipelines.corruptions"] = types.ModuleType("mmseg.datasets.pipelines.corruptions")
    stubs["mmseg.datasets.pipelines.corruptions"].corrupt = _mmcv_ops().__getattr__("corrupt")
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            stubs["pkg_resources"] = _pkg_resources()
    return stubs


def mmcv1_dir() -> Path:
    """Where mmcv 1.x lives for this comparison: ``$OVSEG_MMCV1_DIR`` or ``<venv>/mmcv1``. MaskCLIP needs mmcv 1.x
    while SCLIP/NACLIP need mmcv 2.x (the same import name), so mmcv 1.x is installed in a folder of its own."""
    return Path(os.environ.get("OVSEG_MMCV1_DIR", Path(sys.prefix) / "mmcv1"))


MMCV1_INSTALL = ('PIP_CONSTRAINT=<(echo "setuptools<70") MMCV_WITH_OPS=0 pip install --no-deps --target {dir} '
                 'mmcv==1.7.2 && pip install addict yapf')


@contextlib.contextmanager
def _mmcv1() -> Iterator[None]:
    """Import ``mmcv`` from :func:`mmcv1_dir` for the duration of the block; any other mmcv loaded before is put
    back afterwards."""
    folder = mmcv1_dir()
    if not (folder / "mmcv" / "__init__.py").is_file():
        raise FileNotFoundError(f"MaskCLIP parity needs mmcv 1.x in {folder} (or set OVSEG_MMCV1_DIR); install it "
                                f"with: {MMCV1_INSTALL.format(dir=folder)}")
    is_mmcv = lambda name: name == "mmcv" or name.startswith("mmcv.")  # noqa: E731
    saved = {name: module for name, module in sys.modules.items() if is_mmcv(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        import mmcv

        if not mmcv.__version__.startswith("1."):
            raise ImportError(f"{folder}: expected mmcv 1.x, found {mmcv.__version__}")
        yield
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if is_mmcv(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


@contextlib.contextmanager
def _openai_clip(weights: Path, device: str) -> Iterator[types.ModuleType]:
    """The ``clip`` module MaskCLIP's tools import: OpenAI's package, loading ``weights`` in fp32 on ``device``
    whatever name is asked for; on a CPU run ``Tensor.cuda`` returns the tensor itself."""
    before = {name for name in sys.modules if name == "clip" or name.startswith("clip.")}
    saved_pkg_resources = sys.modules.get("pkg_resources")
    sys.modules["pkg_resources"] = saved_pkg_resources or pkg_resources_stand_in()
    try:
        import clip as openai_clip  # OpenAI's package (pip install openai-clip: the parity extra)
    finally:
        if saved_pkg_resources is None:
            del sys.modules["pkg_resources"]

    def load(name, device_=None, jit=False, download_root=None, **kwargs):
        # clip.load's path for a state-dict file (jit=False): build_model(state_dict).to(device); clip.load itself
        # cannot read such a file with this torch (its failed torch.jit.load leaves the file read to the end)
        state_dict = torch.load(weights, map_location="cpu")
        return openai_clip.model.build_model(state_dict).to(device).float(), None

    stand_in = types.ModuleType("clip")
    stand_in.load, stand_in.tokenize = load, openai_clip.tokenize
    saved_cuda = torch.Tensor.cuda
    sys.modules["clip"] = stand_in
    if not str(device).startswith("cuda"):
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield stand_in
    finally:
        torch.Tensor.cuda = saved_cuda
        for name in [n for n in sys.modules if (n == "clip" or n.startswith("clip.")) and n not in before]:
            del sys.modules[name]


@contextlib.contextmanager
def _torch_load_on(device: str) -> Iterator[None]:
    saved = torch.load

    def load(f, map_location=None, **kwargs):
        return saved(f, map_location=device, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = saved


@contextlib.contextmanager
def _in_dir(folder: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


# -- the reference --------------------------------------------------------------------------------------------
class Reference:
    """MaskCLIP's code, loaded from a checkout inside :func:`reference_imports`."""

    def __init__(self, ref_dir: Path, weights: Path, work_dir: Path, device: str, model_name: str = "ViT-B-16"):
        self.ref_dir, self.weights, self.device = ref_dir, weights, device
        self.tag, self.config_infix = MODEL_TAGS[model_name]
        self.vit = self.tag.startswith("ViT")
        self.work_dir = work_dir
        self.pretrain = work_dir / "pretrain"
        self.pretrain.mkdir(parents=True, exist_ok=True)
        tools = ref_dir / "tools" / "maskclip_utils"
        with _openai_clip(weights, device):
            # tools/maskclip_utils/convert_clip_weights.py, run as its README says (`--model ViT16 [--backbone]`);
            # it writes pretrain/<tag>_clip_backbone.pth and pretrain/<tag>_clip_weights.pth under the cwd
            with _in_dir(work_dir):
                for extra in (["--backbone"], []):
                    argv = sys.argv
                    sys.argv = ["convert_clip_weights.py", "--model", self.tag, *extra]
                    try:
                        runpy.run_path(str(tools / "convert_clip_weights.py"), run_name="__main__")
                    finally:
                        sys.argv = argv
            self.prompts = runpy.run_path(str(tools / "prompt_engineering.py"), run_name="maskclip_prompts")
        self.backbone_ckpt = self.pretrain / f"{self.tag}_clip_backbone.pth"
        self.visual_projs = self.pretrain / f"{self.tag}_clip_weights.pth"

        from mmseg.datasets.pipelines import Compose
        from mmseg.models.backbones.resnet import ResNetClip  # noqa: F401  (registers the backbones)
        from mmseg.models.backbones.vit import VisionTransformer  # noqa: F401
        from mmseg.models.builder import build_segmentor
        from mmseg.models.decode_heads.maskclip_head import MaskClipHead  # noqa: F401
        from mmseg.models.segmentors.encoder_decoder import EncoderDecoder  # noqa: F401

        self._compose, self._build_segmentor = Compose, build_segmentor
        self._models: dict[str, Any] = {}
        self.load_report = ""

    def class_names(self, dataset: str) -> list[str]:
        _, list_name, _, background = DATASETS[dataset]
        return (["background"] if background else []) + list(self.prompts[list_name])

    def text_embeddings(self, names: list[str], templates: list[str]) -> torch.Tensor:
        """``prompt_engineering.zeroshot_classifier`` and its ``__main__`` post-processing: [N, D] float."""
        with _openai_clip(self.weights, self.device):
            classifier = self.prompts["zeroshot_classifier"]
            classifier.__globals__["clip"] = sys.modules["clip"]  # the name its file bound when it was run
            weights = classifier(str(self.weights), names, templates)
        return weights.permute(1, 0).float()

    def model(self, dataset: str, templates: list[str], ks_thresh: float = 0.0, pd_thresh: float = 0.0):
        """The segmentor of ``configs/maskclip/maskclip_<model>_*_<dataset>.py`` as ``tools/test.py`` builds it, with
        the decode head's ``ks_thresh`` / ``pd_thresh`` set (as the ``kspd`` configs do)."""
        key = (dataset, tuple(templates), ks_thresh, pd_thresh)
        if key in self._models:
            return self._models[key]
        from mmcv import Config
        from mmcv.runner import load_checkpoint

        config_file, _, set_name, _ = DATASETS[dataset]
        config_file = config_file.replace("maskclip_vit16_", f"maskclip_{self.config_infix}_")
        names = self.class_names(dataset)
        text_path = self.pretrain / f"{dataset}_{len(templates)}t_{self.tag}_clip_text.pth"
        if not text_path.is_file():
            torch.save(self.text_embeddings(names, templates).cpu(), text_path)
        cfg = Config.fromfile(str(self.ref_dir / config_file))
        # tools/test.py
        cfg.model.pretrained = None
        cfg.model.train_cfg = None
        cfg.model.decode_head.num_classes = cfg.model.decode_head.text_categories = len(names)
        cfg.model.decode_head.text_embeddings_path = str(text_path)
        cfg.model.decode_head.visual_projs_path = str(self.visual_projs)
        cfg.model.decode_head.ks_thresh, cfg.model.decode_head.pd_thresh = ks_thresh, pd_thresh
        with _torch_load_on(self.device):
            model = self._build_segmentor(cfg.model, test_cfg=cfg.get("test_cfg"))
        checkpoint = load_checkpoint(model, str(self.backbone_ckpt), map_location="cpu",
                                     logger=logging.getLogger("ovseg.parity.maskclip.mmcv"))
        loaded = set(checkpoint["state_dict"])
        backbone = {f"backbone.{k}" for k in model.backbone.state_dict()}
        missing, unexpected = sorted(backbone - loaded), sorted(loaded - backbone)
        if missing or unexpected:
            raise RuntimeError(f"MaskCLIP backbone checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model = model.to(self.device).eval()
        pipeline = self._compose(cfg.data.test.pipeline)
        self._models[key] = (model, pipeline)
        return model, pipeline

    @torch.no_grad()
    def labels(self, dataset: str, templates: list[str], image: np.ndarray, path: Path,
               ks_thresh: float = 0.0, pd_thresh: float = 0.0) -> np.ndarray:
        """tools/test.py single_gpu_test for one image file: the test pipeline, then ``model(return_loss=False)``."""
        import cv2

        model, pipeline = self.model(dataset, templates, ks_thresh, pd_thresh)
        cv2.imwrite(str(path), image[..., ::-1])  # RGB -> BGR file; LoadImageFromFile reads BGR, Normalize to_rgb
        data = pipeline(dict(img_info=dict(filename=str(path)), img_prefix=None))
        img = data["img"][0][None].to(self.device)
        metas = [data["img_metas"][0].data]
        result = model(return_loss=False, img=[img], img_metas=[metas])
        return np.asarray(result[0])

    @torch.no_grad()
    def dense(self, dataset: str, templates: list[str], normalised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone + MaskClipHead on a normalised image: (projected value features, head logits)."""
        model, _ = self.model(dataset, templates)
        outputs = model.backbone(normalised.to(self.device))
        head = model.decode_head
        if self.vit:
            _, _, _, v = head._transform_inputs(outputs)
            return head.proj(v), head(outputs)
        x = head._transform_inputs(outputs)  # the last stage (in_index=3)
        return head.c_proj(head.v_proj(x)), head(outputs)


# -- comparisons ----------------------------------------------------------------------------------------------
def _tensor_record(quantity: str, ours: torch.Tensor, theirs: torch.Tensor, **kwargs) -> ParityRecord:
    """:func:`tensor_record`, or a failed record when the shapes differ (e.g. another token grid)."""
    try:
        return tensor_record(REFERENCE, quantity, ours, theirs, **kwargs)
    except ValueError as err:
        return ParityRecord(REFERENCE, quantity, kwargs.get("protocol"), max_rel_diff=float("inf"),
                            tolerance=kwargs.get("tolerance", FEATURE_TOLERANCE), passed=False, detail=str(err))


def _ovseg_method(weights: Path, device: str, model_name: str, ks_thresh: float = 0.0, pd_thresh: float = 0.0):
    from ovseg.methods import MaskCLIP
    from ovseg.models.clip import CLIPConfig

    method = MaskCLIP(clip=CLIPConfig(name=model_name, pretrained=str(weights), quick_gelu=True, last_block="value"),
                      ks_thresh=ks_thresh, pd_thresh=pd_thresh)
    return method.to(device).eval()


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), *,
        model_name: str = "ViT-B-16", datasets: tuple[str, ...] | None = None,
        image_sizes: dict[str, tuple[int, int]] | None = None, feature_sizes: dict[str, tuple[int, int]] | None = None,
        label_templates: str = LABEL_TEMPLATES, text_names: tuple[str, ...] = TEXT_NAMES,
        overrides: dict[str, Any] | None = None, resnets: tuple[str, ...] = RESNETS,
        refinements: dict[str, tuple[float, float]] | None = None) -> list[ParityRecord]:
    """Compare ovseg's ``maskclip`` protocol with MaskCLIP's code; returns the records (see module docstring).

    ``model_name`` / ``datasets`` / sizes allow a small, fast variant (tests); the defaults are the full check.
    ``resnets``: CLIP ResNets compared after the ViT (features, logits, label maps; the first also with each
    refinement); ``refinements`` (default :data:`REFINEMENTS`): key smoothing / prompt denoising label maps.
    ``overrides``: protocol settings changed on ovseg's side only (to see that a setting matters).
    """
    from ovseg.eval.evaluator import dense_options
    from ovseg.eval.inference import protocol_resize
    from ovseg.eval.protocols import load_protocol
    from ovseg.methods.base import cosine_logits
    from ovseg.models.text import get_templates
    from ovseg.parity.common import image_tensor

    started = time.time()
    refinements = REFINEMENTS if refinements is None else refinements
    ref_dir = Path(ref_dir).resolve()
    work_dir = Path(work_dir).resolve() / "maskclip"  # the reference runs with this as its working folder
    work_dir.mkdir(parents=True, exist_ok=True)
    datasets = tuple(datasets or DATASETS)
    image_sizes = image_sizes or IMAGE_SIZES
    feature_sizes = feature_sizes or FEATURE_SIZES
    weights = fp16_grid_weights(work_dir, model_name)
    templates = get_templates(label_templates)
    records: list[ParityRecord] = []
    protocol = "maskclip"
    rec = lambda record: (records.append(record), print(  # noqa: E731
        f"  [{time.time() - started:6.1f}s] {record.quantity}: "
        + (f"{record.max_rel_diff:.2e}" if record.max_rel_diff is not None
           else f"{100 * record.identical_share:.4f} %"),
        flush=True))

    torch.manual_seed(0)
    method = _ovseg_method(weights, device, model_name)
    scorer = OVSegScorer(method, protocol, {"templates": label_templates, **(overrides or {})}, device=device)
    settings = load_protocol(protocol)

    with _mmcv1(), reference_imports(ref_dir, _stubs(ref_dir)):
        reference = Reference(ref_dir, weights, work_dir, device, model_name)

        # facts: templates and class names
        ovseg85 = get_templates("maskclip85")
        same = list(reference.prompts["prompt_templates"]) == list(ovseg85)
        records.append(ParityRecord(REFERENCE, "templates: prompt_engineering.prompt_templates = maskclip85",
                                    protocol, max_rel_diff=0.0 if same else 1.0, tolerance=0.0, passed=same,
                                    detail=f"{len(ovseg85)} templates, same order"))
        for dataset in DATASETS:
            ours = [synonyms[0] for synonyms in scorer.entry(dataset).vocabulary.class_names] \
                if dataset in datasets else None
            if ours is None:
                from ovseg.data.classnames import read_class_names

                ours = [s[0] for s in read_class_names(settings.settings_for(dataset).class_names)]
            theirs = [n.strip() for n in reference.class_names(dataset)]
            wrong = [(a, b) for a, b in zip(ours, theirs) if a != b] + ([("length", len(ours))]
                                                                          if len(ours) != len(theirs) else [])
            records.append(ParityRecord(REFERENCE, f"class names {dataset}", protocol,
                                        max_rel_diff=float(len(wrong)), tolerance=0.0, passed=not wrong,
                                        detail=f"{len(theirs)} names" + (f"; differ: {wrong[:3]}" if wrong else "")))

        # text embeddings: MaskCLIP's 85-template ensemble (their clip package) vs ovseg's TextBank
        theirs = reference.text_embeddings(list(text_names), list(ovseg85))
        ours = method.encode_text([n.strip() for n in text_names], ovseg85)
        rec(_tensor_record("text embeddings, maskclip85 (" + ", ".join(map(repr, text_names)) + ")",
                          ours, theirs, protocol=protocol,
                          detail="prompt_engineering.zeroshot_classifier (OpenAI clip, fp32) vs TextBank"))

        # dense features and head logits on the same normalised image
        entry = scorer.entry(datasets[0])
        text_ours = entry.text
        for label, (height, width) in feature_sizes.items():
            image = image_tensor(generated_image(height, width, seed=height + width))[None].to(device)
            with dense_options(method, entry.settings):
                normalised = method.encoder.normalize(image)
                features = method.encoder.encode_dense(normalised)
                logits = cosine_logits(features, text_ours)
            their_features, their_logits = reference.dense(datasets[0], templates, normalised)
            grid = f"{features.shape[-2]}x{features.shape[-1]} tokens"
            rec(_tensor_record(f"dense features {label}", features, their_features, protocol=protocol,
                              detail=f"value path after ln_post, projected; {grid}"))
            rec(_tensor_record(f"head logits {label} ({datasets[0]})", logits, their_logits,
                              protocol=protocol, detail=f"cosine vs MaskClipHead.cls_seg; {grid}"))

        # the test pipeline's input tensor (cv2 resize on uint8 + ImageNet normalisation)
        height, width = next(iter(image_sizes.values()))
        image = generated_image(height, width, seed=7)
        for dataset in dict.fromkeys((datasets[0], *[d for d in datasets if d.startswith("context")][:1])):
            s = scorer.entry(dataset).settings
            resized = protocol_resize(image_tensor(image)[None].to(device), s.short_side, s.long_side_max, None,
                                      s.resize_library, s.resize_rule)
            with dense_options(method, s):
                ours = method.encoder.normalize(resized)
            _, pipeline = reference.model(dataset, templates)
            path = work_dir / "pipeline.png"
            import cv2

            cv2.imwrite(str(path), image[..., ::-1])
            theirs = pipeline(dict(img_info=dict(filename=str(path)), img_prefix=None))["img"][0][None]
            rec(_tensor_record(f"test-pipeline image {height}x{width} -> "
                              f"{theirs.shape[-2]}x{theirs.shape[-1]} ({dataset})", ours, theirs,
                              protocol=protocol, detail="mmcv imrescale (cv2) + Normalize vs protocol_resize"))

        # full label maps
        for dataset in datasets:
            for seed, (label, (height, width)) in enumerate(image_sizes.items()):
                image = generated_image(height, width, seed=seed)
                theirs = reference.labels(dataset, templates, image, work_dir / "image.png")
                ours = scorer.labels(dataset, image)
                rec(label_record(REFERENCE, f"label map {dataset} {label}", ours, theirs, protocol=protocol,
                                 detail=f"templates {label_templates!r}; fp32"))

        if refinements:
            _refinement_records(rec, reference, weights, device, model_name, datasets[0], image_sizes,
                                label_templates, refinements)
        for resnet in resnets:
            _resnet_records(rec, ref_dir, work_dir, device, resnet, datasets[0], image_sizes, feature_sizes,
                            label_templates, refinements if resnet == resnets[0] else {})
    print(f"  MaskCLIP parity: {time.time() - started:.0f} s", flush=True)
    return records


def _refinement_records(rec, reference: Reference, weights: Path, device: str, model_name: str, dataset: str,
                        image_sizes: dict[str, tuple[int, int]], label_templates: str,
                        refinements: dict[str, tuple[float, float]]) -> None:
    """Label maps with MaskCLIP's key smoothing / prompt denoising on (its head's ``refine_output``) against
    :class:`ovseg.methods.MaskCLIP` with the same ``ks_thresh`` / ``pd_thresh``."""
    from ovseg.models.text import get_templates

    templates = get_templates(label_templates)
    split = None
    for name, (ks, pd) in refinements.items():
        if pd > 0 and split is None:
            split = _class_splitting_threshold(weights, device, model_name, dataset, label_templates, image_sizes)
        pd_used = min(pd, split) if pd > 0 else pd
        method = _ovseg_method(weights, device, model_name, ks_thresh=ks, pd_thresh=pd_used)
        scorer = OVSegScorer(method, "maskclip", {"templates": label_templates}, device=device)
        note = "" if pd_used == pd else f" (the kspd configs' {pd} removes every class on random weights)"
        for seed, (label, (height, width)) in enumerate(image_sizes.items()):
            image = generated_image(height, width, seed=seed)
            theirs = reference.labels(dataset, templates, image, reference.work_dir / "image.png", ks, pd_used)
            rec(label_record(REFERENCE, f"label map {name} {reference.tag} {dataset} {label}", scorer.labels(
                dataset, image), theirs, protocol="maskclip",
                detail=f"ks_thresh={ks}, pd_thresh={pd_used:.4g}{note} (maskclip_head.py refine_output); "
                       f"templates {label_templates!r}; fp32"))


def _class_splitting_threshold(weights: Path, device: str, model_name: str, dataset: str, label_templates: str,
                               image_sizes: dict[str, tuple[int, int]]) -> float:
    """A prompt-denoising threshold that keeps some classes and removes others on random weights: the median over
    classes of their top ``softmax(100·cos)`` confidence on the first image (random CLIPs are never confident
    enough for MaskCLIP's 0.5, which would remove every class and leave the label map to ties)."""
    from ovseg.eval.evaluator import dense_options
    from ovseg.eval.inference import protocol_resize
    from ovseg.methods.zeroshot import REFINE_TEMPERATURE
    from ovseg.parity.common import image_tensor

    method = _ovseg_method(weights, device, model_name)
    entry = OVSegScorer(method, "maskclip", {"templates": label_templates}, device=device).entry(dataset)
    s = entry.settings
    height, width = next(iter(image_sizes.values()))
    image = image_tensor(generated_image(height, width, seed=0))[None].to(device)
    resized = protocol_resize(image, s.short_side, s.long_side_max, None, s.resize_library, s.resize_rule)
    with dense_options(method, s):
        logits = method.dense_logits(resized, entry.text)
    confidence = torch.softmax(logits * REFINE_TEMPERATURE, dim=1).flatten(2).amax(dim=-1)[0]
    return round(float(confidence.median()), 4)


def _resnet_records(rec, ref_dir: Path, work_dir: Path, device: str, model_name: str, dataset: str,
                    image_sizes: dict[str, tuple[int, int]], feature_sizes: dict[str, tuple[int, int]],
                    label_templates: str, refinements: dict[str, tuple[float, float]]) -> None:
    """A CLIP ResNet: MaskCLIP's ``ResNetClip`` backbone + ``MaskClipHead`` (``maskclip_<rn>_*.py`` configs) vs
    ovseg's ResNet dense path on the same random weights: features and logits at ``feature_sizes``, label maps at
    ``image_sizes`` (plain, then with each refinement)."""
    from ovseg.eval.evaluator import dense_options
    from ovseg.methods.base import cosine_logits
    from ovseg.models.text import get_templates
    from ovseg.parity.common import image_tensor

    weights = fp16_grid_weights(work_dir, model_name)
    templates = get_templates(label_templates)
    reference = Reference(ref_dir, weights, work_dir, device, model_name)
    method = _ovseg_method(weights, device, model_name)
    scorer = OVSegScorer(method, "maskclip", {"templates": label_templates}, device=device)
    entry = scorer.entry(dataset)
    for label, (height, width) in feature_sizes.items():
        image = image_tensor(generated_image(height, width, seed=height + width))[None].to(device)
        with dense_options(method, entry.settings):
            normalised = method.encoder.normalize(image)
            features = method.encoder.encode_dense(normalised)
            logits = cosine_logits(features, entry.text)
        their_features, their_logits = reference.dense(dataset, templates, normalised)
        grid = f"{features.shape[-2]}x{features.shape[-1]} positions"
        rec(_tensor_record(f"dense features {model_name} {label}", features, their_features, protocol="maskclip",
                          detail=f"ResNetClip + v_proj/c_proj 1x1 vs attention-pool value path; {grid}"))
        rec(_tensor_record(f"head logits {model_name} {label} ({dataset})", logits, their_logits,
                          protocol="maskclip", detail=f"cosine vs MaskClipHead.cls_seg; {grid}"))
    for seed, (label, (height, width)) in enumerate(image_sizes.items()):
        image = generated_image(height, width, seed=seed)
        theirs = reference.labels(dataset, templates, image, work_dir / "image.png")
        rec(label_record(REFERENCE, f"label map {model_name} {dataset} {label}", scorer.labels(dataset, image),
                         theirs, protocol="maskclip", detail=f"templates {label_templates!r}; fp32"))
    if refinements:
        _refinement_records(rec, reference, weights, device, model_name, dataset, image_sizes, label_templates,
                            refinements)
