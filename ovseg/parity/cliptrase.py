"""CLIPtrase (leaves162/CLIPtrase) beside :class:`ovseg.methods.CLIPtrase` under ovseg's ``cliptrase`` protocol: the
script behind the README's table, ``clip_self_correlation.py`` (``get_text_features``, ``get_visual_features``,
``self_clip``), on its CLIP fork ``clip_utils/`` (``build_model``, the modified attention of ``attn2.py``), with the
same random fp16-exact weights.

Compared: dense tokens (their ``encode_image``: every token after ``ln_post``/``proj``, L2-normalised) and the
penultimate block's patch affinity (their ``attn_weights[-2]`` minus the class row, clipped) at 224 and 336 (the
README's two resolutions; 336 interpolates the positional embedding), the patch logits (their
``patch_tokens @ text_features.T * logit_scale.exp()``; VOC20 times the class token's), DBSCAN's cluster labels,
the text embeddings, the model input and label crop of their ``get_image_and_gt``, and label maps of their whole
``self_clip`` loop (clusters, median filter, vote; their ``scores`` stood in for to keep the maps) on generated
images of six sizes for VOC20 (class-token weighting), VOC21 (background synonyms) and Context59, at 224 with the
released ``eps=0.7, min=3`` and with a parity ``eps`` at which the random weights form several clusters.

Stand-ins while their code runs: the module's ``device = "cuda"`` is the run's device; ``dataset_info`` points at a
scratch folder holding the generated image and a label; ``scores`` keeps the predictions instead of scoring them;
``from pkg_resources import packaging`` (setuptools >= 81 has none). Their ``from sklearn.cluster import DBSCAN``:
scikit-learn's own class when it is installed; otherwise :class:`DBSCANStandIn`, a plain-loop transcription of
scikit-learn's algorithm (``sklearn/cluster/_dbscan.py`` + ``_dbscan_inner.pyx``: radius neighbourhoods including
the point, core points, the stack expansion in index order), independent of ovseg's vectorised
:func:`~ovseg.methods.cliptrase.dbscan`. Each row's detail names which one ran.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.parity.common import (
    IMAGE_SIZES,
    ParityRecord,
    RecordLog,
    generated_image,
    image_tensor,
    label_record,
    pkg_resources_stand_in,
    reference_imports,
    stub_module,
    tensor_record,
)
from ovseg.parity.mmseg_clip import SMALL_TEXT, fp16_exact_clip

PROTOCOLS = ("cliptrase",)
REFERENCE = "CLIPtrase"
#: ovseg dataset -> their configs/dataset_cfg.py key
DATASET_KEYS = {"voc20": "VOC20", "voc21": "VOC21", "context59": "PC59", "context60": "PC60",
                "coco_object": "COCO80_val", "coco_stuff171": "COCO171_val", "ade150": "ADE150", "pc459": "PC459"}
#: label maps of the committed run: VOC20 (class-token weighting), VOC21 (background synonyms), Context59
LABEL_DATASETS = ("voc20", "voc21", "context59")
#: the README's two runs (self_clip_test): image_size -> (eps, min_samples); the label maps' narrow random tower
#: forms several clusters at both (the rows' details count them)
RESOLUTIONS = {224: (0.7, 3), 336: (1.1, 7)}
#: the label maps' image tower: ViT-B/16's layout at a narrower width (the dense rows use the full width)
LABEL_VISION_WIDTH = 256


class DBSCANStandIn:
    """scikit-learn's ``DBSCAN(eps, min_samples).fit_predict`` (euclidean), written out as its code runs: each
    point's neighbourhood is every point within ``eps`` (itself included), a core point has at least
    ``min_samples``, and clusters grow from each unlabelled core point in index order by a stack
    (``_dbscan_inner.pyx``)."""

    def __init__(self, eps: float = 0.5, min_samples: int = 5):
        self.eps, self.min_samples = eps, min_samples

    def fit_predict(self, X) -> np.ndarray:
        x = np.asarray(X, dtype=np.float64)
        distances = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        neighborhoods = [np.flatnonzero(row <= self.eps) for row in distances]
        is_core = np.array([len(n) >= self.min_samples for n in neighborhoods])
        labels = np.full(len(x), -1, dtype=np.int64)
        label = 0
        for i in range(len(x)):
            if labels[i] != -1 or not is_core[i]:
                continue
            stack = [i]
            while stack:
                j = stack.pop()
                if labels[j] == -1:
                    labels[j] = label
                    if is_core[j]:
                        stack.extend(int(v) for v in neighborhoods[j] if labels[v] == -1)
            label += 1
        return labels


def dbscan_source() -> tuple[type, str]:
    try:
        from sklearn.cluster import DBSCAN

        import sklearn

        return DBSCAN, f"scikit-learn {sklearn.__version__} DBSCAN"
    except ImportError:
        return DBSCANStandIn, "DBSCANStandIn (scikit-learn not installed)"


def stand_ins(dbscan_class: type) -> dict:
    import importlib.machinery

    stubs = {"sklearn": stub_module("sklearn"), "sklearn.cluster": stub_module("sklearn.cluster", DBSCAN=dbscan_class)}
    for name, module in stubs.items():
        # torch._dynamo's import-time find_spec() over optional packages must see a spec
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return {"pkg_resources": pkg_resources_stand_in(), **stubs}


def ovseg_cliptrase(folder: Path, **settings):
    from ovseg.methods.cliptrase import CLIPtrase
    from ovseg.models.clip import CLIPConfig

    return CLIPtrase(CLIPConfig(name=f"local-dir:{folder}", pretrained=None, quick_gelu=True, last_block="qq_kk_vv"),
                     **settings)


class CLIPtraseReference:
    """Their ``clip_self_correlation`` module and a ``clip_utils`` CLIP on the given weights, on ``device``."""

    def __init__(self, weights: Path, device: str):
        import clip_self_correlation as script
        import clip_utils

        self.script, self.device = script, device
        script.device = device
        state = torch.load(weights, map_location="cpu")
        self.model = clip_utils.build_model(dict(state)).to(device).eval()
        self.predictions: list[np.ndarray] = []
        script.scores = self._keep  # their metric, replaced: the maps are compared, not scored

    def _keep(self, gts, preds, n_class):
        self.predictions.extend(preds)
        return {}

    def text(self, dataset: str) -> torch.Tensor:
        info = self.script.dataset_info[DATASET_KEYS[dataset]]
        names = info["labels"] + info.get("background", [])
        with torch.no_grad():
            return self.script.get_text_features(self.model, names)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``get_visual_features``: normalised tokens ``[1, 1+N, D]`` and the patch affinity ``[N, N]`` as
        ``self_clip`` derives it."""
        with torch.no_grad():
            features, attn = self.script.get_visual_features(self.model, x)
        cls_weights, weights = attn[-2, 0, 0:1, 1:], attn[-2, 0, 1:, 1:]
        weights = weights - cls_weights
        weights[weights < 0] = 0
        return features, weights

    def labels(self, dataset: str, image: np.ndarray, label: np.ndarray, scratch: Path, image_size: int,
               eps: float, min_samples: int) -> np.ndarray:
        """``self_clip`` on a one-image dataset in ``scratch``: the label map of the crop."""
        from PIL import Image

        key = DATASET_KEYS[dataset]
        images, gts = scratch / "images", scratch / "gts"
        for folder in (images, gts):
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():
                old.unlink()
        Image.fromarray(image).save(images / "generated.png")
        Image.fromarray(label).save(gts / "generated.png")
        info = dict(self.script.dataset_info[key], image_path=str(images), gt_path=str(gts))
        self.script.dataset_info = {**self.script.dataset_info, key: info}
        self.predictions.clear()
        with torch.no_grad():
            self.script.self_clip(self.model, key, image_size=image_size, eps=eps, min=min_samples)
        if len(self.predictions) != 1:
            raise RuntimeError(f"self_clip kept {len(self.predictions)} maps for one image")
        return self.predictions[0]

    def model_input(self, path: Path, image_size: int) -> torch.Tensor:
        from PIL import Image

        crop = self.script._transform1(image_size)(Image.open(path))
        return self.script._transform2()(crop)[None]


def reference_order(theirs: np.ndarray, classes: int, background: bool) -> np.ndarray:
    """Their label ids (foreground 0 … C-1, background C) in ovseg's (background 0, foreground 1 … C)."""
    if not background:
        return theirs
    return np.where(theirs >= classes, 0, theirs + 1)


def generated_label(height: int, width: int, seed: int, classes: int) -> np.ndarray:
    """A label map with a few classes and an ignore border, uint8 (their ``label_set`` must not be empty)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, (height // 32 + 1, width // 32 + 1)).repeat(32, 0).repeat(32, 1)
    label = label[:height, :width].astype(np.uint8)
    label[:4] = 255
    return label


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"),
        datasets: tuple[str, ...] | None = None, image_sizes: dict[str, tuple[int, int]] | None = None,
        dense: bool = True, **unused) -> list[ParityRecord]:
    from PIL import Image

    from ovseg.eval.inference import center_crop_view
    from ovseg.parity.common import OVSegScorer

    log = RecordLog()
    where = "CPU" if str(device) == "cpu" else str(device).upper()
    work_dir = Path(work_dir)
    datasets = tuple(datasets or LABEL_DATASETS)
    image_sizes = image_sizes or IMAGE_SIZES
    dbscan_class, dbscan_name = dbscan_source()
    with reference_imports(ref_dir, stand_ins(dbscan_class)), tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        if dense:
            dense_records(log, scratch, ref_dir, device, work_dir, dbscan_name, where)
        folder = fp16_exact_clip(work_dir, small_text=True, vision_width=LABEL_VISION_WIDTH)
        ref = CLIPtraseReference(folder / "open_clip_pytorch_model.bin", device)
        method = ovseg_cliptrase(folder).to(device).eval()
        for side, (eps, min_samples) in RESOLUTIONS.items():
            scorer = OVSegScorer(method, "cliptrase", {"center_crop": side, "short_side": side}, device=device)
            method.eps, method.min_samples = eps, min_samples
            for dataset in datasets:
                entry = scorer.entry(dataset)
                s = entry.settings
                if side == min(RESOLUTIONS):
                    log(tensor_record(
                        REFERENCE, f"text embeddings {dataset}", entry.text, reference_text(ref, dataset),
                        protocol="cliptrase",
                        detail=f"{len(entry.vocabulary.queries)} names x 80 ImageNet templates "
                               f"({s.class_names.format(dataset=dataset)}); small random text tower {SMALL_TEXT}; "
                               f"fp32 {where}"))
                classes = len(ref.script.dataset_info[DATASET_KEYS[dataset]]["labels"])
                background = entry.background_index is not None
                for size_name, (h, w) in image_sizes.items():
                    image = generated_image(h, w, seed=7 * h + w)
                    label = generated_label(h, w, seed=h + w, classes=classes)
                    theirs = ref.labels(dataset, image, label, scratch, side, eps, min_samples)
                    view, label_view = center_crop_view(image_tensor(image).to(device),
                                                        torch.from_numpy(label.astype(np.int64)), side)
                    if dataset == datasets[0]:
                        their_input = ref.model_input(scratch / "images" / "generated.png", side)
                        log(tensor_record(
                            REFERENCE, f"model input {side} {size_name}", method.encoder.normalize(view[None]),
                            their_input, protocol="cliptrase",
                            detail=f"their _transform1 + _transform2 (Resize {side} bicubic, CenterCrop, "
                                   f"Normalize) vs ovseg center_crop_view + normalize"))
                        their_label = ref.script.gt_transform(side)(Image.open(scratch / "gts" / "generated.png"))
                        log(label_record(
                            REFERENCE, f"label crop {side} {size_name}", label_view.numpy(),
                            np.array(their_label), protocol="cliptrase",
                            detail="their gt_transform (Resize nearest, CenterCrop) vs ovseg center_crop_view"))
                    ours = scorer.evaluator.predict(method, entry, view, tuple(view.shape[-2:])).cpu()
                    theirs = reference_order(theirs, classes, background)
                    clusters = "; ".join(f"{k} {v}" for k, v in method_cluster_counts(method, view, s).items())
                    log(label_record(
                        REFERENCE, f"labels {dataset} {side} {size_name}", ours, theirs, protocol="cliptrase",
                        detail=f"their self_clip (image_size {side}, eps {eps}, min {min_samples}) vs ovseg under "
                               f"the protocol on the crop; {clusters}; {np.unique(theirs).size} classes in the "
                               f"reference map; image tower width {LABEL_VISION_WIDTH} (ViT-B/16 layout); "
                               f"{dbscan_name}; fp32 {where}"))
    return list(log)


def reference_text(ref: CLIPtraseReference, dataset: str) -> torch.Tensor:
    """Their text embeddings in ovseg's query order (ovseg: the background's names first)."""
    theirs = ref.text(dataset)
    info = ref.script.dataset_info[DATASET_KEYS[dataset]]
    classes = len(info["labels"])
    if "background" not in info:
        return theirs
    # ovseg's background line holds their background names once each, in order
    names = [n.strip() for n in info["background"]]
    first = {n: classes + i for i, n in reversed(list(enumerate(names)))}
    order = [first[n] for n in dict.fromkeys(names)] + list(range(classes))
    return theirs[order]


def method_cluster_counts(method, view: torch.Tensor, settings) -> dict[str, int]:
    """How many DBSCAN clusters ovseg found on the crop (so a row shows the vote was exercised)."""
    from ovseg.eval.evaluator import dense_options
    from ovseg.methods.cliptrase import dbscan

    with torch.no_grad(), dense_options(method, settings):
        _, affinity = method.dense_tokens(view[None])
    labels = dbscan(affinity[0], method.eps, method.min_samples)
    return {"clusters": int(labels.max()) + 1, "noise patches": int((labels < 0).sum())}


def dense_records(log: RecordLog, scratch: Path, ref_dir: Path, device: str, work_dir: Path, dbscan_name: str,
                  where: str) -> None:
    """Tokens, patch affinity, logits and DBSCAN labels at the README's two resolutions, full-width ViT-B/16."""
    from ovseg.eval.evaluator import dense_options
    from ovseg.eval.protocols import load_protocol
    from ovseg.methods.cliptrase import dbscan
    from ovseg.parity.common import OVSegScorer

    folder = fp16_exact_clip(work_dir, small_text=True)
    ref = CLIPtraseReference(folder / "open_clip_pytorch_model.bin", device)
    method = ovseg_cliptrase(folder).to(device).eval()
    dataset = "voc20"
    for side in RESOLUTIONS:
        overrides = {"center_crop": side, "short_side": side}
        scorer = OVSegScorer(method, "cliptrase", overrides, device=device)
        entry = scorer.entry(dataset)
        settings = load_protocol("cliptrase").settings_for(dataset, overrides)
        image = image_tensor(generated_image(side, side, seed=side))[None].to(device)
        x = method.encoder.normalize(image)
        theirs, their_affinity = ref.tokens(x)
        with torch.no_grad(), dense_options(method, settings):
            tokens, affinity = method.dense_tokens(image)
        log(tensor_record(
            REFERENCE, f"dense tokens {side}x{side}", F.normalize(tokens, dim=-1), theirs, protocol="cliptrase",
            detail=f"all {tokens.shape[1]} tokens after ln_post/proj, L2-normalised; their encode_image (block 11 "
                   f"self_out_weight, block 12 self_qk_weight) vs ovseg CLIPtrase (last block qq_kk_vv, token "
                   f"residual, MLP); pos_embed_interpolation {settings.pos_embed_interpolation}; fp32 {where}"))
        log(tensor_record(
            REFERENCE, f"patch affinity {side}x{side}", affinity[0], their_affinity, protocol="cliptrase",
            detail=f"their attn_weights[-2] (head-mean of (cos qq + cos kk + cos vv) / 3) minus the class row, "
                   f"clipped at 0, vs ovseg patch_affinity(self_correlation); fp32 {where}"))
        text = ref.text(dataset)
        scale = ref.model.logit_scale.exp()
        patch = theirs[0, 1:] @ text.T * scale
        cls = theirs[0, 0:1] @ text.T * scale
        grid = (side // 16, side // 16)
        their_logits = (patch * cls).T.reshape(1, -1, *grid)
        with torch.no_grad(), dense_options(method, settings), method.scoring(dataset):
            ours = method.dense_logits(image, entry.text) * scale**2
        log(tensor_record(
            REFERENCE, f"patch logits voc20 {side}x{side}", ours, their_logits, protocol="cliptrase",
            detail=f"self_clip's patch_tokens @ text_features.T * logit_scale.exp(), times the class token's "
                   f"(VOC20), vs ovseg dense_logits x exp(logit_scale)^2; fp32 {where}"))
        for eps, min_samples in RESOLUTIONS.values():
            ours_labels = dbscan(affinity[0], eps, min_samples)
            their_labels = ref.script.DBSCAN(eps=eps, min_samples=min_samples).fit_predict(
                their_affinity.cpu().numpy())
            log(label_record(
                REFERENCE, f"DBSCAN labels eps {eps} min {min_samples} {side}x{side}", ours_labels.cpu().numpy(),
                their_labels, protocol="cliptrase",
                detail=f"{dbscan_name} vs ovseg dbscan on the patch affinity; {int(their_labels.max()) + 1} clusters, "
                       f"{int((their_labels < 0).sum())} noise patches"))
