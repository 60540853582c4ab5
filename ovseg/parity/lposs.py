"""LPOSS (vladan-stojnic/LPOSS) beside :class:`ovseg.methods.LPOSS` and the ``lposs`` protocol:
``ovseg parity --ref LPOSS=DIR``.

Reference side: the checkout's **unmodified** ``models/lposs/lposs.py`` ``LPOSS``, ``models/maskclip/maskclip.py``
``MaskClip`` / ``MaskClipHead`` (built from ``configs/lposs.yaml`` / ``lposs_plus.yaml`` and ``configs/maskclip.yaml``
by their ``models.build_model``), ``segmentation/evaluation/lposs_eval.py`` ``LPOSS_Infrencer`` (built as their
``build_seg_inference`` builds it, with the dataset config's ``test_cfg``), their vendored mmseg 0.x
(``EncoderDecoder.simple_test``: softmax, argmax; the test pipeline of ``segmentation/configs/_base_/datasets/*.py``
with their ``ToRGB`` / ``ImageToTensorV2``) on mmcv 1.x (:func:`ovseg.parity.maskclip.mmcv1_dir`). What they import
from outside:

- ``open_clip`` (installed): ``create_model_from_pretrained('ViT-B-16', pretrained='laion2b_s34b_b88k')`` answered
  with the harness's random ViT-B-16 (every tensor perturbed), read by ovseg as ``CLIPConfig(pretrained=<file>)``;
- ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb16')``: the hub model of a facebookresearch/dino checkout
  (``$OVSEG_PARITY_DINO``, else ``dino`` beside ``DIR``), random, read by ovseg through timm from its state dict;
- ``faiss`` (GPU-only calls): ``knn_gpu(res, x, x, k, METRIC_INNER_PRODUCT)`` answered by faiss-cpu's exact
  ``IndexFlatIP`` search, ``StandardGpuResources`` a no-op;
- ``cupy`` / ``cupyx.scipy.sparse`` (need a GPU): numpy and scipy.sparse (``csr_matrix``, ``diags``, ``eye``), and
  cupy's ``cg`` (``cupyx/scipy/sparse/linalg/_iterative.py``: the same recurrence and stopping rule) written in
  numpy (:func:`cupy_cg`);
- ``kornia`` (``rgb_to_lab``) and ``omegaconf``: the real packages (``pip install faiss-cpu kornia omegaconf``);
- on a CPU, their ``.cuda()`` / ``device="cuda"`` keep tensors on the CPU.

Rows: the DINO weights as timm loads them; per window the DINO values and MaskCLIP features (their
``get_dino_features`` / ``get_clip_features``) and the text embeddings (``MaskClipHead.class_embeddings``, 80
templates); on a multi-window image the window patch scores after LPOSS's propagation (their ``perform_lp`` on the
patch graph) given their own inputs to ovseg's graph and solver, and end to end from the image; the merged window
scores and the pixel scores after LPOSS+ (their second ``perform_lp``); the label maps of ``simple_test`` for LPOSS
and LPOSS+ under the ``lposs`` protocol on generated images of six sizes (2048x1024 included).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ovseg.parity.common import (
    IMAGE_SIZES,
    OVSegScorer,
    ParityRecord,
    RecordLog,
    generated_image,
    git_commit,
    label_record,
    reference_imports,
    state_dict_record,
    stub_module,
    tensor_record,
)
from ovseg.parity.proxyclip import dino_checkout

REFERENCE = "LPOSS"
PROTOCOLS = ("lposs",)
#: ovseg dataset -> their segmentation/configs/_base_/datasets/<file>
DATASET_CONFIGS = {"voc21": "pascal_voc12.py", "voc20": "pascal_voc12_20.py", "context60": "pascal_context.py",
                   "context59": "pascal_context59.py", "coco_object": "coco.py", "coco_stuff171": "stuff.py",
                   "cityscapes": "cityscapes.py", "ade150": "ade20k.py"}
#: ovseg dataset -> (file, class) of their CLASSES
CLASS_LISTS = {"voc21": ("segmentation/datasets/pascal_voc.py", "PascalVOCDataset"),
               "voc20": ("segmentation/datasets/pascal_voc20.py", "PascalVOCDataset20"),
               "context60": ("segmentation/datasets/pascal_context.py", "PascalContextDataset"),
               "context59": ("segmentation/datasets/pascal_context.py", "PascalContextDataset59"),
               "coco_object": ("segmentation/datasets/coco_object.py", "COCOObjectDataset"),
               "coco_stuff171": ("segmentation/datasets/coco_stuff.py", "COCOStuffDataset"),
               "cityscapes": ("mmseg/datasets/cityscapes.py", "CityscapesDataset"),
               "ade150": ("mmseg/datasets/ade.py", "ADE20KDataset")}
#: LPOSS and LPOSS+ (configs/lposs.yaml, configs/lposs_plus.yaml)
VARIANTS = {"LPOSS": "lposs", "LPOSS+": "lposs_plus"}
#: the image of the dense rows (resized to 448x597 by the pipeline: 3x5 windows of 224, 2940 patches)
DENSE_SIZE = (300, 400)
LABEL_DATASETS = ("voc21", "cityscapes")
#: rows downstream of each side's own kNN: at the k-th neighbour, faiss and ovseg's exact search may order
#: similarities equal to float32 rounding differently (faiss on a GPU and on a CPU do too); the rows with faiss's
#: neighbour lists on both sides hold the feature tolerance (1e-5)
KNN_TIE_TOLERANCE = 1e-3


# -- stand-ins --------------------------------------------------------------------------------------------------
def _as_numpy(value: Any) -> np.ndarray:
    """``cupy.asarray``: a CPU numpy array of a tensor or array."""
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def cupy_cg(A, b, x0=None, tol=1e-5, maxiter=None, M=None, callback=None, atol=None):
    """``cupyx.scipy.sparse.linalg.cg`` (cupy's ``_iterative.py``) in numpy: ``b`` cast to ``A``'s dtype, ``x0 = 0``,
    stop after the step where ``‖r‖ <= max(atol, tol·‖b‖)``; ``b = 0`` returned as is."""
    if x0 is not None or M is not None:
        raise NotImplementedError("the LPOSS parity stand-in of cupy's cg takes no x0 / M (LPOSS passes none)")
    b = _as_numpy(b).astype(A.dtype).ravel()
    n = A.shape[0]
    maxiter = n * 10 if maxiter is None else maxiter
    b_norm = np.linalg.norm(b)
    if b_norm == 0:
        return b, 0
    atol = tol * float(b_norm) if atol is None else max(float(atol), tol * float(b_norm))
    x = np.zeros(n, dtype=A.dtype)
    r = b - A @ x
    iters, rho, p, resid = 0, 0.0, None, np.inf
    while iters < maxiter:
        z = r
        rho1, rho = rho, np.dot(r, z)
        p = z if iters == 0 else z + (rho / rho1) * p
        q = A @ p
        alpha = rho / np.dot(p, q)
        x = x + alpha * p
        r = r - alpha * q
        iters += 1
        if callback is not None:
            callback(x)
        resid = np.linalg.norm(r)
        if resid <= atol:
            break
    return x, (iters if iters == maxiter and not resid <= atol else 0)


class _GpuResources:
    """``faiss.StandardGpuResources`` for :func:`faiss_stand_ins` (its settings do nothing on a CPU)."""

    def setDefaultNullStreamAllDevices(self) -> None:  # noqa: N802 (faiss's name)
        pass

    def setTempMemory(self, size: int) -> None:  # noqa: N802
        pass


def faiss_stand_ins() -> dict[str, types.ModuleType]:
    """``faiss`` with ``knn_gpu`` answered by faiss-cpu's exact flat index (torch tensors in and out, as
    ``faiss.contrib.torch_utils`` makes them), and an empty ``faiss.contrib.torch_utils``."""
    import faiss

    def knn_gpu(res, xq, xb, k, D=None, I=None, metric=faiss.METRIC_L2, **kwargs):  # noqa: E741, N803
        index = (faiss.IndexFlatIP if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2)(xb.shape[1])
        index.add(np.ascontiguousarray(_as_numpy(xb), dtype=np.float32))
        distances, labels = index.search(np.ascontiguousarray(_as_numpy(xq), dtype=np.float32), k)
        module.last = (torch.from_numpy(distances).to(xq.device), torch.from_numpy(labels).to(xq.device))
        return tuple(t.clone() for t in module.last)

    module = stub_module("faiss", StandardGpuResources=_GpuResources, knn_gpu=knn_gpu,
                         METRIC_INNER_PRODUCT=faiss.METRIC_INNER_PRODUCT, METRIC_L2=faiss.METRIC_L2)
    contrib = stub_module("faiss.contrib")
    module.contrib = contrib
    contrib.torch_utils = stub_module("faiss.contrib.torch_utils")
    return {"faiss": module, "faiss.contrib": contrib, "faiss.contrib.torch_utils": contrib.torch_utils}


def cupy_stand_ins() -> dict[str, types.ModuleType]:
    """``cupy`` as numpy and ``cupyx.scipy.sparse`` as scipy.sparse (with :func:`cupy_cg`)."""
    import scipy.sparse as sparse

    cupy = stub_module("cupy", asarray=_as_numpy, array=np.array, zeros=np.zeros, sqrt=np.sqrt, isnan=np.isnan,
                       isinf=np.isinf)
    linalg = stub_module("cupyx.scipy.sparse.linalg", cg=cupy_cg)
    cupyx_sparse = stub_module("cupyx.scipy.sparse", csr_matrix=sparse.csr_matrix, coo_matrix=sparse.coo_matrix,
                               diags=sparse.diags, eye=sparse.eye, linalg=linalg)
    cupyx_scipy = stub_module("cupyx.scipy", sparse=cupyx_sparse)
    return {"cupy": cupy, "cupyx": stub_module("cupyx", scipy=cupyx_scipy), "cupyx.scipy": cupyx_scipy,
            "cupyx.scipy.sparse": cupyx_sparse, "cupyx.scipy.sparse.linalg": linalg}


def _package(name: str, folder: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    return module


def reference_stand_ins(ref_dir: Path) -> dict[str, types.ModuleType]:
    """Everything :func:`reference_imports` puts in place: faiss / cupy stand-ins, bare packages over their
    ``mmseg`` (whose ``__init__`` files import every model, dataset and hook of the fork, wandb included) and
    ``segmentation.evaluation`` (whose ``__init__`` builds data loaders), and ``mmcv.ops`` (mmcv-full operators)."""
    from ovseg.parity.maskclip import _mmcv_ops

    stubs = {**faiss_stand_ins(), **cupy_stand_ins()}
    for name in ("mmseg", "mmseg.models", "mmseg.models.segmentors", "mmseg.core", "mmseg.datasets",
                 "segmentation", "segmentation.evaluation"):
        stubs[name] = _package(name, ref_dir.joinpath(*name.split(".")))
    stubs["mmcv.ops"] = _mmcv_ops()
    return stubs


@contextlib.contextmanager
def cpu_stand_ins(device: str, *modules: types.ModuleType) -> Iterator[None]:
    """On a CPU: ``Module.cuda()`` and ``Tensor.cuda()`` leave things where they are, ``Tensor.to('cuda')`` and the
    ``torch.as_tensor(..., device='cuda')`` of ``modules`` go to ``device``; on a GPU nothing changes."""
    if str(device).startswith("cuda"):
        yield
        return
    module_cuda, tensor_cuda, tensor_to = torch.nn.Module.cuda, torch.Tensor.cuda, torch.Tensor.to

    def on_device(value):
        return torch.device(device) if str(value).startswith("cuda") else value

    def to(self, *args, **kwargs):
        args = tuple(on_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = on_device(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)  # PEP 562: everything else is torch's
    proxy.as_tensor = lambda data, dtype=None, device=None: torch.as_tensor(data, dtype=dtype,
                                                                             device=on_device(device))
    saved = [(m, m.torch) for m in modules]
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.to = to
    for m in modules:
        m.torch = proxy
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda, torch.Tensor.to = module_cuda, tensor_cuda, tensor_to
        for m, original in saved:
            m.torch = original


# -- weights ----------------------------------------------------------------------------------------------------
def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def random_clip(work_dir: Path, seed: int = 0) -> Path:
    """A random open_clip ViT-B-16 (laion layout: GELU), every tensor perturbed, saved as a state dict."""
    path = work_dir / "open_clip_vitb16_random.pt"
    if not path.is_file():
        import open_clip

        torch.manual_seed(seed)
        model = _perturbed(open_clip.create_model("ViT-B-16", pretrained=None), seed)
        torch.save(model.state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return path


def dino_hub_vitb16(dino_dir: Path, seed: int = 0) -> torch.nn.Module:
    """facebookresearch/dino's ``hubconf.dino_vitb16(pretrained=False)``, every parameter perturbed."""
    with reference_imports(dino_dir):
        hubconf = importlib.import_module("hubconf")
        torch.manual_seed(seed)
        model = hubconf.dino_vitb16(pretrained=False)
    return _perturbed(model, seed + 1)


def ovseg_lposs(clip_weights: Path, dino_weights: Path, pixel_refine: bool):
    from ovseg.methods.lposs import LPOSS
    from ovseg.models.clip import CLIPConfig
    from ovseg.models.vfm import VFMConfig

    return LPOSS(clip=CLIPConfig(name="ViT-B-16", pretrained=str(clip_weights), last_block="value"),
                 vfm=VFMConfig(kind="dino", name="vit_base_patch16_224.dino", weights=str(dino_weights),
                               features="v"),
                 pixel_refine=pixel_refine).eval()


# -- the reference ----------------------------------------------------------------------------------------------
def their_class_names(ref_dir: Path, dataset: str) -> tuple[str, ...]:
    """A dataset's ``CLASSES`` read from their file (not imported: the dataset modules need mmseg's datasets)."""
    file, class_name = CLASS_LISTS[dataset]
    for node in ast.walk(ast.parse((ref_dir / file).read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.Assign) and getattr(item.targets[0], "id", None) == "CLASSES":
                    return tuple(ast.literal_eval(item.value))
    raise ValueError(f"{file}: no {class_name}.CLASSES")


class Reference:
    """Their model, inferencer and test pipeline (inside :func:`reference_imports` and mmcv 1.x)."""

    def __init__(self, ref_dir: Path, device: str, clip_weights: Path, dino_model: torch.nn.Module, scratch: Path):
        from mmcv import Config  # mmcv 1.x
        from mmcv.utils import digit_version

        self.ref_dir, self.device, self.scratch = ref_dir, device, scratch
        self.clip_weights, self.dino_model = clip_weights, dino_model
        self.Config = Config
        # what the bare packages' __init__ files would define (mmseg's also asserts mmcv <= 1.7.0; this is 1.7.2)
        sys.modules["mmseg"].digit_version = digit_version
        sys.modules["mmseg.core"].add_prefix = importlib.import_module("mmseg.core.utils.misc").add_prefix
        encoder_decoder = importlib.import_module("mmseg.models.segmentors.encoder_decoder")
        sys.modules["mmseg.models"].EncoderDecoder = encoder_decoder.EncoderDecoder
        importlib.import_module("datasets.transforms")  # registers ToRGB, ImageToTensorV2
        self.compose = importlib.import_module("mmseg.datasets.pipelines").Compose
        self.models = importlib.import_module("models")
        self.maskclip = importlib.import_module("models.maskclip.maskclip")
        self.lposs = importlib.import_module("models.lposs.lposs")
        self.lposs_eval = importlib.import_module("segmentation.evaluation.lposs_eval")
        self.omegaconf = importlib.import_module("omegaconf").OmegaConf
        self._models: dict[tuple[str, str], Any] = {}

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Their code on this device, in their folder (they read ``configs/*.yaml`` relative to it)."""
        from ovseg.parity.maskclip import _in_dir

        with _in_dir(self.ref_dir), cpu_stand_ins(self.device, self.lposs_eval):
            yield

    def dataset_config(self, dataset: str):
        path = self.ref_dir / "segmentation/configs/_base_/datasets" / DATASET_CONFIGS[dataset]
        return self.Config.fromfile(str(path), import_custom_modules=False)

    def segmentor(self, dataset: str, variant: str):
        """``build_model(cfg.model, class_names=CLASSES)`` (main_eval.evaluate) and ``LPOSS_Infrencer`` as
        ``build_seg_inference`` makes it."""
        key = (dataset, variant)
        if key in self._models:
            return self._models[key]
        import open_clip

        clip_weights, dino = self.clip_weights, self.dino_model
        cfg = self.omegaconf.load(str(self.ref_dir / "configs" / f"{variant}.yaml"))
        classes = their_class_names(self.ref_dir, dataset)
        hub_load = torch.hub.load
        create = self.maskclip.create_model_from_pretrained
        self.maskclip.create_model_from_pretrained = lambda name, pretrained=None, **kw: (
            open_clip.create_model(name, pretrained=str(clip_weights)), None)
        torch.hub.load = lambda *args, **kwargs: dino
        try:
            with self.running():
                model = self.models.build_model(cfg.model, class_names=classes)
        finally:
            torch.hub.load = hub_load
            self.maskclip.create_model_from_pretrained = create
        model = model.to(self.device).eval()
        model.device = self.device
        seg = self.lposs_eval.LPOSS_Infrencer(model, cfg, num_classes=len(classes),
                                              test_cfg=self.dataset_config(dataset).test_cfg, **cfg.evaluate)
        seg.CLASSES = classes
        pipeline = self.compose(self.dataset_config(dataset).data.test.pipeline)
        self._models[key] = (seg.eval(), pipeline)
        return self._models[key]

    def pipeline_input(self, pipeline, image: np.ndarray, name: str) -> tuple[torch.Tensor, list[dict]]:
        """Their test pipeline on an image file (RGB array written as the BGR file LoadImageFromFile reads)."""
        import cv2

        path = self.scratch / f"{name}.png"
        cv2.imwrite(str(path), image[..., ::-1])
        data = pipeline(dict(img_info=dict(filename=str(path)), img_prefix=None))
        return data["img"][0][None].to(self.device), [data["img_metas"][0].data]

    @torch.no_grad()
    def labels(self, dataset: str, variant: str, image: np.ndarray, name: str) -> np.ndarray:
        seg, pipeline = self.segmentor(dataset, variant)
        img, metas = self.pipeline_input(pipeline, image, name)
        with self.running():
            return np.asarray(seg.simple_test(img, metas, rescale=True)[0])


# -- comparisons ------------------------------------------------------------------------------------------------
def weights_record(hub: torch.nn.Module, ours) -> ParityRecord:
    return state_dict_record(REFERENCE, "weights: hub dino_vitb16 -> timm vit_base_patch16_224.dino", "lposs",
                             hub.state_dict(), ours.vfm.model.state_dict())


@torch.no_grad()
def dense_records(ref: Reference, ours, ours_plus, device: str, pixels: bool = True) -> list[ParityRecord]:
    """Windows, text, propagation on patches and (``pixels``) pixels (see the module docstring) on one generated
    image."""
    import torch.nn.functional as F

    from ovseg.eval.inference import slide_windows
    from ovseg.methods.lposs import window_patch_centres
    from ovseg.models.label_propagation import (
        knn_inner_product,
        normalized_edge_weights,
        patch_graph,
        propagate_labels,
        sparse_matvec,
    )

    records = []
    seg, pipeline = ref.segmentor("voc21", "lposs_plus" if pixels else "lposs")
    model = seg.model
    image = generated_image(*DENSE_SIZE, seed=11)
    img, metas = ref.pipeline_input(pipeline, image, "dense")
    image01 = img[0]
    h_img, w_img = image01.shape[-2:]
    size = f"{DENSE_SIZE[0]}x{DENSE_SIZE[1]} (resized {h_img}x{w_img})"

    # text: their MaskClipHead embeddings (80 templates, background synonyms each a query) vs ovseg's
    names = [name for label in their_class_names(ref.ref_dir, "voc21") for name in label.split(";")]
    text = ours.encode_text(names, _clip80())
    theirs_text = model.clip_backbone.decode_head.class_embeddings
    records.append(tensor_record(REFERENCE, "text embeddings voc21", text, theirs_text, protocol="lposs",
                                 detail=f"{len(names)} queries (26 background synonyms), 80 ImageNet templates: "
                                        "MaskClipHead._get_class_embeddings vs ovseg encode_text"))

    # one window through both models
    window = image01[None, :, :224, :224]
    with ref.running():
        their_dino, _ = model.get_dino_features(window)
        their_clip, _ = model.get_clip_features(window)
    records.append(tensor_record(REFERENCE, "DINO values 224x224 window", F.normalize(ours.vfm(window).flatten(2),
                                                                                       dim=1), their_dino,
                                 protocol="lposs", detail="their get_dino_features (hook on blocks[-1].attn.qkv, "
                                 "'v', normalised) vs ovseg VFMConfig(features='v'); fp32"))
    records.append(tensor_record(REFERENCE, "MaskCLIP features 224x224 window",
                                 ours.encoder.encode_dense(ours.encoder.normalize(window)), their_clip,
                                 protocol="lposs", detail="their get_clip_features (value path + residual + MLP, "
                                 "ln_post, proj) vs ovseg CLIPConfig(last_block='value'); fp32"))

    # their slide_inference with perform_lp / get_lposs_laplacian captured
    captured: dict[str, list] = {"lp": [], "laplacian": []}
    perform_lp, laplacian = ref.lposs_eval.perform_lp, ref.lposs_eval.get_lposs_laplacian

    def capture_lp(L, preds):
        out = perform_lp(L, preds)
        captured["lp"].append((preds.clone(), out.clone()))
        return out

    def capture_laplacian(feats, locations, height_width, **kwargs):
        captured["laplacian"].append((feats.clone(), locations.clone(), list(height_width), kwargs))
        return laplacian(feats, locations, height_width, **kwargs)

    ref.lposs_eval.perform_lp, ref.lposs_eval.get_lposs_laplacian = capture_lp, capture_laplacian
    try:
        with ref.running():
            seg.slide_inference(img, metas, True)
    finally:
        ref.lposs_eval.perform_lp, ref.lposs_eval.get_lposs_laplacian = perform_lp, laplacian
    their_patch_in, their_patch_out = captured["lp"][0]
    their_feats, _, height_width, kwargs = captured["laplacian"][0]
    their_knn = sys.modules["faiss"].last

    # ovseg's graph and solver on their inputs (DINO features, initial scores)
    windows = slide_windows(h_img, w_img, ours.window, ours.stride)
    grid = tuple(height_width[0])
    positions = window_patch_centres(windows, grid, 16, their_feats.device)
    same_neighbours = patch_graph(their_feats, positions, ours.k, ours.gamma, ours.sigma, ours.distance_power,
                                  neighbours=their_knn)
    matvec = sparse_matvec(same_neighbours, normalized_edge_weights(same_neighbours, ours.alpha))
    same_knn = propagate_labels(matvec, their_patch_in, ours.cg_tol, ours.cg_maxiter)
    graph = patch_graph(their_feats, positions, ours.k, ours.gamma, ours.sigma, ours.distance_power)
    matvec = sparse_matvec(graph, normalized_edge_weights(graph, ours.alpha))
    same_inputs = propagate_labels(matvec, their_patch_in, ours.cg_tol, ours.cg_maxiter)
    _, own_knn = knn_inner_product(their_feats, ours.k)
    other_rows = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(own_knn, their_knn[1]))
    detail = (f"{len(windows)} windows of {grid[0]}x{grid[1]} patches ({their_feats.shape[0]} nodes), k={ours.k}, "
              f"{their_patch_in.shape[1]} queries; their get_lposs_laplacian (faiss IndexFlatIP, scipy.sparse) + "
              f"perform_lp (cupy's cg in numpy, float64) vs ovseg patch_graph + propagate_labels (torch, float64)")
    records.append(tensor_record(REFERENCE, f"patch scores after LP, same inputs and neighbours {size}", same_knn,
                                 their_patch_out, protocol="lposs", detail=detail + "; their DINO features, initial "
                                 "scores and faiss's neighbour lists on both sides"))
    tie_note = (f"; ovseg's exact kNN and faiss's differ in {other_rows} of {their_feats.shape[0]} neighbour lists, "
                f"each by neighbours whose similarities are equal to float32 rounding (ordered either way at the "
                f"k-th place); each such edge changes two degrees and with them the normalised weights around them")
    records.append(tensor_record(REFERENCE, f"patch scores after LP, same inputs {size}", same_inputs,
                                 their_patch_out, protocol="lposs", tolerance=KNN_TIE_TOLERANCE,
                                 detail=detail + "; their DINO features and initial scores on both sides" + tie_note))

    # ovseg end to end from the image
    crops = torch.stack([image01[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
    dino, clip, grid = ours.window_features(crops)
    scores = clip @ F.normalize(text.float(), dim=-1).T
    records.append(tensor_record(REFERENCE, f"initial patch scores {size}", scores, their_patch_in,
                                 protocol="lposs", detail="cosine of the windows' MaskCLIP features with the text "
                                 "(clip_preds in slide_inference)"))
    propagated = ours.patch_propagation(dino, scores, window_patch_centres(windows, grid, 16, dino.device))
    records.append(tensor_record(REFERENCE, f"patch scores after LP {size}", propagated, their_patch_out,
                                 protocol="lposs", tolerance=KNN_TIE_TOLERANCE,
                                 detail=detail + "; each side from the image" + tie_note))
    merged = ours.segment(image01, text)  # LPOSS: the merged window scores
    if not pixels:
        return records
    their_pixel_in, their_pixel_out = captured["lp"][1]
    records.append(tensor_record(REFERENCE, f"merged window scores {size}",
                                 merged.permute(1, 2, 0).reshape(h_img * w_img, -1), their_pixel_in,
                                 protocol="lposs", detail="window scores bilinear to the windows, summed, divided by "
                                 "the count (LPOSS's output before the label resize; LPOSS+'s start)" + tie_note,
                                 tolerance=KNN_TIE_TOLERANCE))
    pixels = ours_plus.pixel_propagation(image01, merged)
    records.append(tensor_record(REFERENCE, f"pixel scores after LPOSS+ {size}",
                                 pixels.permute(1, 2, 0).reshape(h_img * w_img, -1), their_pixel_out,
                                 protocol="lposs", detail=f"their get_lposs_plus_laplacian (kornia rgb_to_lab, 13x13 "
                                 f"neighbourhood, tau 0.01, scipy.sparse) + perform_lp vs ovseg pixel_graph stencil + "
                                 f"propagate_labels; {h_img * w_img} pixels; ovseg from its own merged scores"
                                 + tie_note, tolerance=KNN_TIE_TOLERANCE))
    same_start = ours_plus.pixel_propagation(image01, their_pixel_in.T.reshape(-1, h_img, w_img).float())
    records.append(tensor_record(REFERENCE, f"pixel scores after LPOSS+, same start {size}",
                                 same_start.permute(1, 2, 0).reshape(h_img * w_img, -1), their_pixel_out,
                                 protocol="lposs", detail="as above, ovseg started from their merged scores"))
    return records


def _clip80() -> list[str]:
    from ovseg.models.text import get_templates

    return get_templates("clip80")


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), *,
        dino_dir: Path | None = None, datasets: tuple[str, ...] = LABEL_DATASETS,
        image_sizes: dict[str, tuple[int, int]] | None = None, variants: tuple[str, ...] = tuple(VARIANTS),
        dense: bool = True, pixel_rows: bool = True) -> list[ParityRecord]:
    """Compare LPOSS's released code with ovseg (see the module docstring); ``dino_dir``: a facebookresearch/dino
    checkout (default ``$OVSEG_PARITY_DINO``, else ``dino`` beside ``ref_dir``). The keyword arguments allow a small,
    fast variant (tests)."""
    from ovseg.parity.maskclip import _mmcv1

    started = time.time()
    ref_dir = Path(ref_dir).resolve()
    if not (ref_dir / "segmentation/evaluation/lposs_eval.py").is_file():
        raise FileNotFoundError(f"{ref_dir}: no segmentation/evaluation/lposs_eval.py (is this an LPOSS checkout?)")
    missing = [m for m in ("faiss", "kornia", "omegaconf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"LPOSS parity needs {', '.join(missing)}: pip install faiss-cpu kornia omegaconf "
                                  "(the [parity] extra)")
    dino_dir = dino_checkout(dino_dir, ref_dir, REFERENCE)
    work_dir = Path(work_dir).resolve() / "lposs"
    work_dir.mkdir(parents=True, exist_ok=True)
    commit = git_commit(ref_dir)[:12]
    clip_weights = random_clip(work_dir)
    hub = dino_hub_vitb16(dino_dir)
    dino_weights = work_dir / "dino_vitb16_random.pth"
    torch.save(hub.state_dict(), dino_weights)
    methods = {variant: ovseg_lposs(clip_weights, dino_weights, VARIANTS[variant] == "lposs_plus").to(device)
               for variant in VARIANTS}
    records = RecordLog(started)

    def report(new: list[ParityRecord]) -> None:
        for record in new:
            record.detail += f"; LPOSS {commit}"
            records(record)

    report([weights_record(hub, methods["LPOSS"])])
    with _mmcv1(), reference_imports(ref_dir, reference_stand_ins(ref_dir)):
        ref = Reference(ref_dir, device, clip_weights, hub.to(device), work_dir)
        if dense:
            report(dense_records(ref, methods["LPOSS"], methods["LPOSS+"], device, pixel_rows))
        scorers = {variant: OVSegScorer(methods[variant], "lposs", device=device) for variant in variants}
        for dataset in datasets:
            for variant in variants:
                for size_name, (h, w) in (image_sizes or IMAGE_SIZES).items():
                    image = generated_image(h, w, seed=h + 7 * w)
                    theirs = ref.labels(dataset, VARIANTS[variant], image, f"{dataset}_{h}x{w}")
                    ours = scorers[variant].labels(dataset, image)
                    report([label_record(REFERENCE, f"labels {variant} {dataset} {size_name}", ours, theirs,
                                         protocol="lposs",
                                         detail=f"their simple_test ({VARIANTS[variant]}.yaml, "
                                                f"{DATASET_CONFIGS[dataset]} pipeline) vs ovseg under the lposs "
                                                f"protocol; random weights")])
    print(f"[{REFERENCE}] compared in {time.time() - started:.0f} s", flush=True)
    return records
