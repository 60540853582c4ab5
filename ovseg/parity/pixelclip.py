"""PixelCLIP (cvlab-kaist/PixelCLIP) beside ovseg's ``pixelclip`` protocol and PixelCLIP method.

Reference side: the checkout's **unmodified** ``pixelclip/pixelclip.py`` model with its predictor and
``third_party`` CLIP, built from ``configs/pixelclip_vit_base.yaml`` plus what ``eval.sh`` sets per benchmark
(``MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON datasets/<name>.json``, ``MODEL.PROMPT_ENSEMBLE_TYPE imagenet_select``), in
the detectron2 stand-ins of :mod:`ovseg.parity.detectron2_stubs` (model construction is shared with the training
comparison, :func:`ovseg.parity.pixelclip_train.reference_pixelclip`). Its test input is what detectron2's default
``DatasetMapper`` gives the model: ``ResizeShortestEdge(MIN_SIZE_TEST 640, MAX_SIZE_TEST 2560)`` (PIL bilinear on
the uint8 image), a uint8 CHW tensor, and the original ``height``/``width``; ``SemSegEvaluator`` takes the argmax.

ovseg side: :class:`~ovseg.methods.pixelclip.PixelCLIP` given the reference's state dict through the checkpoint
converter's key map, scored by the shared evaluator under the ``pixelclip`` protocol (:class:`OVSegScorer`).

Compared: the class-name lists (``datasets/*.json`` vs ``classnames/pixelclip/``) and templates, dense features
(square inputs: their ViT only takes squares), text embeddings per benchmark, label maps on generated images of
:data:`~ovseg.parity.common.IMAGE_SIZES` per benchmark, the same for classes with synonyms (the first
:data:`SYNONYM_CLASSES` ADE-847 classes as a class JSON: their ``class_embeddings`` averages a class's synonyms, the
protocol's ``synonyms: mean_embedding``), and the training step
(:func:`ovseg.parity.pixelclip_train.training_records`). Random weights, fp32 on the CPU by default.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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
    random_openai_clip,
    tensor_record,
)

PROTOCOLS = ("pixelclip", "pixelclip-train")
REFERENCE = "PixelCLIP"
PROTOCOL = "pixelclip"
#: ovseg dataset -> the checkout's class JSON (eval.sh: MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON)
CLASS_JSONS: dict[str, str] = {"voc20": "voc20.json", "context59": "pc59.json", "ade150": "ade150.json",
                               "coco_stuff171": "coco.json", "cityscapes": "cityscapes.json"}
#: eval.sh: MODEL.PROMPT_ENSEMBLE_TYPE imagenet_select (third_party/imagenet_templates.py IMAGENET_TEMPLATES_SELECT)
EVAL_OPTS = ["MODEL.PROMPT_ENSEMBLE_TYPE", "imagenet_select"]
#: square inputs of the dense-feature check (their ViT resizes the positional embedding to a square grid only);
#: 330 is not a multiple of 16 (both sides drop the last 10 pixels)
DENSE_SIDES = (224, 320, 448, 330)
#: the synonym check's classes: the first ADE-847 classes, written as CAT-Seg's ade847.json spells them (``building,
#: edifice``; 14 of these 30 have synonyms). The checkout ships no list with synonyms, but its predictor's
#: class_embeddings splits any name at ", " (the code CAT-Seg's ADE-847 numbers come from)
SYNONYM_DATASET = "ade847"
SYNONYM_CLASSES = 30


def _reference(ref_dir: Path, weights: Path, work_dir: Path, device: str, class_json: Path):
    from ovseg.parity.pixelclip_train import reference_pixelclip

    opts = ["MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON", str(class_json), *EVAL_OPTS]
    model, _, cfg, _ = reference_pixelclip(ref_dir, weights, work_dir, device, opts=opts)
    return model.eval(), cfg


def _reference_labels(model, cfg, image: np.ndarray, device: str) -> torch.Tensor:
    """detectron2's test path for one RGB uint8 image: DatasetMapper (ResizeShortestEdge, uint8 CHW tensor),
    the model's inference branch, SemSegEvaluator's argmax."""
    from ovseg.parity.detectron2_stubs import ResizeShortestEdge

    resize = ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
    resized = resize.get_transform(image).apply_image(image)
    inputs = {"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).to(device),
              "height": image.shape[0], "width": image.shape[1]}
    with torch.no_grad():
        return model([inputs])[0]["sem_seg"].argmax(dim=0).cpu()


def _ovseg_method(weights: Path, model_name: str, state: dict[str, torch.Tensor], device: str):
    from ovseg.parity.pixelclip_train import ovseg_pixelclip

    method, _ = ovseg_pixelclip(weights, model_name, state)
    return method.to(device).eval()


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), *,
        model_name: str = "ViT-B-16", datasets: tuple[str, ...] | None = None,
        image_sizes: dict[str, tuple[int, int]] | None = None, dense_sides: tuple[int, ...] = DENSE_SIDES,
        training: bool = True, weights: Path | None = None, images: Path | None = None,
        synonym_classes: int = SYNONYM_CLASSES) -> list[ParityRecord]:
    """Compare ovseg's ``pixelclip`` protocol and PixelCLIP with the authors' code (see the module docstring).

    ``model_name`` (``parity-vit-small`` for quick runs), ``datasets``, ``image_sizes``, ``dense_sides`` and
    ``training`` allow a small, fast variant (tests); the defaults are the full check; ``synonym_classes=0`` leaves
    out the synonym check. ``weights`` (``ovseg parity
    --weights``): trained OpenAI CLIP weights for both sides instead of random ones (the protocol's 8 templates
    either way); ``images``: a folder of real images for the label maps.
    """
    from ovseg.data.classnames import read_class_names
    from ovseg.eval.protocols import load_protocol
    from ovseg.models.text import get_templates
    from ovseg.parity import pixelclip_train

    ref_dir = Path(ref_dir).resolve()
    work_dir = Path(work_dir).resolve() / "pixelclip"
    work_dir.mkdir(parents=True, exist_ok=True)
    datasets = tuple(datasets or CLASS_JSONS)
    image_sizes = image_sizes or IMAGE_SIZES
    if model_name == pixelclip_train.SMALL_VIT:
        pixelclip_train._register_small_vit(work_dir)
    if weights is not None:
        from ovseg.parity.common import trained_openai_clip

        weights = trained_openai_clip(weights, work_dir)
    else:
        weights = random_openai_clip(work_dir / f"random_{model_name}.pt", model_name)
    weights_note = "trained" if weights.name.startswith("trained-") else "random"
    if images is not None:
        from ovseg.parity.common import real_images

        inputs = real_images(images)
    else:
        inputs = {label: generated_image(h, w, seed=7 * h + w) for label, (h, w) in image_sizes.items()}
    # their class_embeddings run on clip.load's model before `.float()` (fp16 weights), ovseg under the protocol
    protocol = load_protocol(PROTOCOL)
    precision_note = f"ovseg {protocol.settings_for(None).text_precision}, reference fp16"
    commit = git_commit(ref_dir)[:12]
    started = time.time()
    records = rec = RecordLog(started)


    # facts: class names (all five benchmarks) and templates
    for dataset, json_name in CLASS_JSONS.items():
        # one ADE name has a trailing space ("bed "): the tokenizer drops it (same tokens as "bed")
        theirs = [name.strip() for name in json.loads((ref_dir / "datasets" / json_name).read_text())]
        ours = [synonyms[0] for synonyms in read_class_names(protocol.settings_for(dataset).class_names)]
        wrong = [(a, b) for a, b in zip(ours, theirs) if a != b]
        if len(ours) != len(theirs):
            wrong.append(("length", f"{len(ours)} vs {len(theirs)}"))
        rec(ParityRecord(REFERENCE, f"class names {dataset}", PROTOCOL, max_rel_diff=float(len(wrong)),
                         tolerance=0.0, passed=not wrong,
                         detail=f"datasets/{json_name}: {len(theirs)} names" + (f"; differ: {wrong[:3]}" if wrong
                                                                                else "")))
    templates_file = ref_dir / "pixelclip" / "third_party" / "imagenet_templates.py"
    namespace: dict = {}
    exec(compile(templates_file.read_text(), str(templates_file), "exec"), namespace)  # a data file: two lists
    ours_t = get_templates(protocol.settings_for(datasets[0]).templates)
    same = list(namespace["IMAGENET_TEMPLATES_SELECT"]) == list(ours_t)
    rec(ParityRecord(REFERENCE, "templates: IMAGENET_TEMPLATES_SELECT = pixelclip8", PROTOCOL,
                     max_rel_diff=0.0 if same else 1.0, tolerance=0.0, passed=same,
                     detail=f"{len(ours_t)} templates, same order (eval.sh: PROMPT_ENSEMBLE_TYPE imagenet_select)"))

    method = scorer = None
    synonym_names = read_class_names(SYNONYM_DATASET)[:synonym_classes]
    synonym_json = work_dir / f"{SYNONYM_DATASET}_first{synonym_classes}.json"
    synonym_json.write_text(json.dumps([", ".join(names) for names in synonym_names]))
    checks = [(dataset, ref_dir / "datasets" / CLASS_JSONS[dataset]) for dataset in datasets]
    checks += [(SYNONYM_DATASET, synonym_json)] if synonym_classes else []
    for dataset, class_json in checks:
        model, cfg = _reference(ref_dir, weights, work_dir, device, class_json)
        if method is None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            method = _ovseg_method(weights, model_name, state, device)
            scorer = OVSegScorer(method, PROTOCOL, device=device)
            # dense features: their sem_seg_head(x, dense=True) vs ovseg's encoder on the same normalised input
            for side in dense_sides:
                image = torch.from_numpy(generated_image(side, side, seed=side)).permute(2, 0, 1)[None].float()
                x = ((image - model.clip_pixel_mean.cpu()) / model.clip_pixel_std.cpu()).to(device)
                with torch.no_grad():
                    theirs = model.sem_seg_head(x, dense=True).permute(0, 3, 1, 2)
                    ours = method.encoder.encode_dense(x)
                rec(tensor_record(REFERENCE, f"dense features {side}x{side}", ours, theirs, protocol=PROTOCOL,
                                  detail=f"{model_name}, last block value path (their forward_dense), "
                                         f"{theirs.shape[-2]}x{theirs.shape[-1]} tokens; fp32 {device}"))
        theirs_text = F.normalize(model.sem_seg_head.predictor.text_features_test.mean(dim=1), dim=-1)
        names_note = f"{theirs_text.shape[0]} names"
        if dataset == SYNONYM_DATASET:  # the first classes only (the scorer keeps this entry for the label maps)
            scorer.evaluator.add_dataset(method, dataset, synonym_names, None, torch.device(device))
            names_note = (f"{class_json.name}: {len(synonym_names)} classes, "
                          f"{sum(len(n) > 1 for n in synonym_names)} with synonyms (up to "
                          f"{max(len(n) for n in synonym_names)}), synonyms {protocol.settings_for(dataset).synonyms}")
        entry = scorer.entry(dataset)
        rec(tensor_record(REFERENCE, f"text embeddings {dataset}", F.normalize(entry.text.float(), dim=-1),
                          theirs_text, protocol=PROTOCOL, text_precision=precision_note,
                          detail=f"{names_note} x 8 templates: their class_embeddings "
                                 f"(+ the test branch's mean, normalise) vs ovseg TextBank"))
        settings = entry.settings
        for size_name, image in inputs.items():
            theirs = _reference_labels(model, cfg, image, device)
            ours = scorer.labels(dataset, image)
            rec(label_record(REFERENCE, f"labels {dataset} {size_name}", ours, theirs, protocol=PROTOCOL,
                             text_precision=precision_note,
                             detail=f"resize {settings.resize_library}/{settings.resize_rule} short "
                                    f"{settings.short_side} (long <= {settings.long_side_max}), square "
                                    f"{cfg.MODEL.CLIP_RESOLUTION}, features at {method.inference_feature_size}²; "
                                    f"{torch.unique(theirs).numel()} classes in the reference map; "
                                    f"image side fp32 {device}; {weights_note} weights; checkout {commit}"))
        del model

    if training:
        try:
            records.extend(pixelclip_train.training_records(ref_dir, device=device, work_dir=work_dir))
        except Exception as err:  # a broken training comparison is a failed row, not a lost evaluation report
            records.append(ParityRecord(REFERENCE, "training step", "pixelclip-train", passed=False,
                                        detail=f"{type(err).__name__}: {err}"))
    print(f"[{REFERENCE}] compared in {time.time() - started:.0f} s", flush=True)
    return records
