"""ITACLIP (m-arda-aydn/ITACLIP) beside :class:`ovseg.methods.ITACLIP` under ovseg's ``itaclip`` protocol:
``itaclip_segmentor.py`` ``ITACLIP_Segmentor`` with its ``configs/cfg_*.py`` (per-dataset auxiliary texts and
``def_coefficient``, ``img_eng_coefficient``, logit scales, thresholds, stride 28, PAMR 10 steps) and its bundled
``clip/`` package (OpenAI's, with the self-self / intermediate-attention last block) on the same random weights.

Compared: the image tower's tokens (``encode_image(x, return_all=True, attn_self=True)``: every token after
``ln_post``/``proj``) against ovseg's ``encode_tokens``; the window logits of ``forward_feature`` (image engineering
on and off) against ovseg's ``dense_logits`` upsampled to the window; the text embeddings with the auxiliary texts
mixed in (their ``query_features``); the model input; and the label maps of ``predict`` on generated images under
the protocol.

Their segmentor loads weights by ``clip.load(model_name)`` (a file path works) and reads ``name_path`` /
``auxiliary_text_path`` relative to the folder above the checkout; :class:`ITACLIPReference` gives it the weights
file and the checkout's own files, and the ``device`` the run uses (the configs say ``'cuda:0'``; nothing else of
theirs names a device). Two of their steps hold the whole image's scores at once: the synonym max (``[classes,
queries, H, W]``) runs through their own ``width_chunk_size`` path (``perform_in_chunks``, the released COCO configs
use it too; exact, a per-pixel max), and their ``PAMR`` is called on chunks of score channels (their module,
unchanged, per chunk: every channel is refined on its own with the same image affinities). Their postprocess's
label closing is not per pixel, so it runs on the whole map (never in row blocks). The label maps run on
ViT-B/16's layout at width :data:`LABEL_VISION_WIDTH` (stride 28 and five views per window cost hours at width 768 on
a CPU); the tokens and window logits are compared at ViT-B/16's own width. Everything else is
:mod:`ovseg.parity.mmseg_clip`'s harness (stand-ins for ``mmseg``, fp16-exact random ViT-B/16 weights, mmcv's own
test pipeline).

Every released config is checked (:data:`CONFIG_STEMS`: VOC21 and Context60 with LLaMA definitions, COCO-Object and
Cityscapes with synonyms, COCO-Stuff with definitions; background kept unmixed on the first three): each one's text
embeddings with its auxiliary file and ``def_coefficient``, its model input (short side 336, 448 or 560), its window
logits under its ``img_eng_coefficient`` (0.7 or 0.75; ovseg's inside ``scoring(dataset)``, theirs from the config,
both on the first dataset's text) and its label maps (the main dataset :data:`MAIN_DATASET` at :data:`LABEL_SIZES`,
2048x1024 included; the others at :data:`SMALL_LABEL_SIZES` and Cityscapes at its own 1024x2048 too).

Precision: on a CUDA device OpenAI's ``clip.load`` (their bundled ``clip/clip.py``) keeps the weights ``build_model``
converted to fp16 and calls ``.float()`` only when the device is ``'cpu'``. The harness makes that step
device-independent: while their segmentor is built, ``clip.load`` returns the model ``.float()`` on any device
(:func:`fp32_clip_load`; their CPU path), so both sides run fp32 on the CPU and on a GPU alike.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
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
from ovseg.parity.mmseg_clip import SMALL_TEXT, Harness, Reference, fp16_exact_clip, stand_ins

PROTOCOLS = ("itaclip",)
#: tokens and window logits at ViT-B/16's width: the protocol's window, and a larger non-square input whose sides are
#: not multiples of 16 (positional-embedding interpolation, the flipped views' dropped remainder rows/columns)
DENSE_SIZES: dict[str, tuple[int, int]] = {"224x224": (224, 224), "333x500": (333, 500)}
#: ovseg dataset -> ITACLIP's ``configs/cfg_<stem>.py``
CONFIG_STEMS = {"voc21": "voc21", "context60": "context60", "coco_object": "coco_object",
                "coco_stuff171": "coco_stuff164k", "cityscapes": "cityscapes"}
#: every released config, in the order checked (the first one's text also serves the window logits of all)
DATASETS = tuple(CONFIG_STEMS)
#: the main label-map case: VOC21 (background synonyms, probability and area thresholds, logit scale 60,
#: definitions), on every size of :data:`LABEL_SIZES`, 2048x1024 included (a 672x336 model input: 85 windows of five
#: views each)
MAIN_DATASET = "voc21"
LABEL_DATASETS = (MAIN_DATASET,)
#: the label maps' image tower: ViT-B/16's layout (12 blocks, so that their hard-coded intermediate blocks exist; patch
#: 16, 224 input) at this width (2 heads). Stride 28 and five views make 425 window passes per side for one
#: 2048x1024 image; at ViT-B/16's width 768 the six sizes take hours on a CPU, at this width minutes. The tokens and
#: window logits are compared at width 768.
LABEL_VISION_WIDTH = 128
#: label-map sizes of the committed run: four of :data:`~ovseg.parity.common.IMAGE_SIZES` (the 2048x1024 one
#: included) and a square one; at stride 28 each image is 25 to 85 windows of five views on each side, so the
#: 2-core CPU run keeps to these (ADE- and COCO-shaped images resize to the VOC one's 336x448 model input anyway)
LABEL_SIZES: dict[str, tuple[int, int]] = {
    "voc 375x500": IMAGE_SIZES["voc 375x500"],
    "context 333x500": IMAGE_SIZES["context 333x500"],
    "odd 397x541": IMAGE_SIZES["odd 397x541"],
    "square 300x300": (300, 300),
    "cityscapes 1024x2048": IMAGE_SIZES["cityscapes 1024x2048"],
}
#: the label maps of the other configs: a small image each (25 windows at short side 336, 81 at COCO-Stuff's 448,
#: 169 at Cityscapes' 560), and Cityscapes' own image size (a 560x1120 input: 429 windows)
SMALL_LABEL_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    dataset: {"square 180x180": (180, 180)} for dataset in DATASETS if dataset != MAIN_DATASET}
SMALL_LABEL_SIZES["cityscapes"]["cityscapes 1024x2048"] = IMAGE_SIZES["cityscapes 1024x2048"]
#: their synonym max in column chunks of this width (``width_chunk_size``; the COCO configs set their own)
WIDTH_CHUNK = 64
#: their PAMR on this many score channels at a time ([channels, 16, H, W] floats twice: 1 GB at 2048x1024)
PAMR_CHANNELS = 4

HARNESS = Harness(reference="ITACLIP", protocol="itaclip", segmentor=("itaclip_segmentor", "ITACLIP_Segmentor"),
                  configs=CONFIG_STEMS, variants=(), label_variant="", label_datasets=LABEL_DATASETS,
                  full_text_dataset="voc21")


@contextmanager
def fp32_clip_load(clip_module) -> Iterator[None]:
    """Their ``clip.load`` returns the model in fp32 on any device meanwhile (``.float()`` after it: what their
    ``clip/clip.py`` does for ``device == 'cpu'``; on CUDA it would keep ``build_model``'s fp16 weights)."""
    load = clip_module.load

    def fp32_load(*args, **kwargs):
        model, preprocess = load(*args, **kwargs)
        return model.float(), preprocess

    clip_module.load = fp32_load
    try:
        yield
    finally:
        clip_module.load = load


class ChannelChunks(torch.nn.Module):
    """Their PAMR module called on chunks of :data:`PAMR_CHANNELS` score channels (``.to`` keeps the wrapper)."""

    def __init__(self, pamr: torch.nn.Module):
        super().__init__()
        self.pamr = pamr

    def forward(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pamr(image, scores[:, c:c + PAMR_CHANNELS])
                          for c in range(0, scores.shape[1], PAMR_CHANNELS)], dim=1)


class ITACLIPReference(Reference):
    """The checkout's segmentor with the weights file as ``model_name``, its own class-name and auxiliary-text
    files, and the run's device; its CLIP in fp32 on any device (:func:`fp32_clip_load`)."""

    def segmentor(self, dataset: str, weights: Path, **extra):
        model = dict(self.config(dataset).model)
        for key in ("type", "device"):
            model.pop(key, None)
        model["model_name"] = str(weights)
        model["name_path"] = str(self.ref_dir / "configs" / Path(model["name_path"]).name)
        model["auxiliary_text_path"] = str(self.ref_dir / "llama_generated_texts" /
                                           Path(model["auxiliary_text_path"]).name)
        model.setdefault("width_chunk_size", WIDTH_CHUNK)
        model.update(extra)
        with fp32_clip_load(self.module.clip):  # their segmentor module's ``from clip import clip``
            seg = self.segmentor_class(device=torch.device(self.device), **model)
        if seg.pamr is not None:
            seg.pamr = ChannelChunks(seg.pamr)
        return seg.eval()

    def labels(self, seg, pipeline: list, image: np.ndarray, scratch: Path) -> torch.Tensor:
        data = self.prepare(seg, pipeline, image, scratch)
        with torch.no_grad():
            out = seg.predict(data["inputs"], data["data_samples"])
        return out[0].pred_sem_seg.data[0].cpu()


def ovseg_itaclip(folder: Path, **settings):
    from ovseg.methods.itaclip import ITACLIP
    from ovseg.models.clip import CLIPConfig

    return ITACLIP(CLIPConfig(name=f"local-dir:{folder}", pretrained=None, quick_gelu=True, residual="token",
                              ffn=False), **settings)


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"),
        datasets: tuple[str, ...] | None = None, image_sizes: dict[str, tuple[int, int]] | None = None,
        dense: bool = True, label_datasets: tuple[str, ...] | None = None, **unused) -> list[ParityRecord]:
    """The rows for ``datasets`` (default: every released config, :data:`DATASETS`): tokens and window logits
    (``dense``), then per dataset its text embeddings, model inputs and, for ``label_datasets`` (default: all of
    ``datasets``), label maps at ``image_sizes`` (default: :data:`LABEL_SIZES` for :data:`MAIN_DATASET`,
    :data:`SMALL_LABEL_SIZES` for the others)."""
    from ovseg.eval.evaluator import dense_options
    from ovseg.eval.inference import protocol_resize
    from ovseg.parity.common import OVSegScorer

    started = time.time()
    where = "CPU" if str(device) == "cpu" else str(device).upper()  # the run's device, in the rows' details
    work_dir = Path(work_dir)
    datasets = tuple(datasets or DATASETS)
    label_datasets = tuple(datasets if label_datasets is None else label_datasets)
    dense_folder = fp16_exact_clip(work_dir, small_text=True)
    label_folder = fp16_exact_clip(work_dir, small_text=True, vision_width=LABEL_VISION_WIDTH)
    records: list[ParityRecord] = []

    def log(record: ParityRecord) -> None:
        value = record.max_rel_diff if record.max_rel_diff is not None else record.identical_share
        print(f"[ITACLIP] {record.quantity}: {value:.3g} ({time.time() - started:.0f} s)", flush=True)
        records.append(record)

    def sizes_of(dataset: str) -> dict[str, tuple[int, int]]:
        if image_sizes is not None:
            return image_sizes
        return LABEL_SIZES if dataset == MAIN_DATASET else SMALL_LABEL_SIZES[dataset]

    with reference_imports(ref_dir, stand_ins()):
        ref = ITACLIPReference(HARNESS, ref_dir, device)
        first = datasets[0]
        # the image tower as released (ViT-B/16's width): tokens and window logits
        if dense:
            dense_method = ovseg_itaclip(dense_folder).to(device).eval()
            entry = OVSegScorer(dense_method, "itaclip", device=device).entry(first)
            settings = entry.settings
            dense_seg = ref.segmentor(first, dense_folder / "open_clip_pytorch_model.bin")

            def window_logits(image: torch.Tensor, dataset: str, engineering: bool, size_name: str) -> None:
                """Their forward_feature with ``dataset``'s img_eng_coefficient (from its config) vs ovseg's
                dense_logits inside ``scoring(dataset)``, both on the first dataset's text."""
                h, w = image.shape[-2:]
                dense_seg.img_engineering = dense_method.image_engineering = engineering
                dense_seg.img_eng_coefficient = theirs_coefficient = ref.config(dataset).model["img_eng_coefficient"]
                with torch.no_grad(), dense_options(dense_method, settings), dense_method.scoring(dataset):
                    coefficient = dense_method.current
                    ours = dense_method.dense_logits(image, entry.text)
                    ours = F.interpolate(ours, size=(h, w), mode="bilinear", align_corners=False)
                    theirs = dense_seg.forward_feature(dense_method.encoder.normalize(image),
                                                       text_features=dense_seg.query_features)
                views = (f"image engineering, img_eng_coefficient {coefficient} (theirs {theirs_coefficient})"
                         if engineering else "no image engineering")
                name = f"window logits {'engineered' if engineering else 'plain'} {size_name}"
                log(tensor_record(
                    "ITACLIP", name if dataset == first else f"{name} {dataset}", ours, theirs, protocol="itaclip",
                    detail=f"forward_feature ({views}; {first} text with auxiliary texts) vs ovseg dense_logits in "
                           f"scoring({dataset!r}) upsampled to the window; fp32 {where}"))

            for size_name, (h, w) in DENSE_SIZES.items():
                image = image_tensor(generated_image(h, w, seed=h + w))[None].to(device)
                x = dense_method.encoder.normalize(image)
                with torch.no_grad(), dense_options(dense_method, settings):
                    ours = dense_method.encoder.encode_tokens(x)
                    theirs = dense_seg.net.encode_image(x, return_all=True, attn_self=True, device=device)
                log(tensor_record(
                    "ITACLIP", f"dense tokens {size_name}", ours, theirs, protocol="itaclip",
                    detail=f"all {ours.shape[1]} tokens after ln_post/proj; their encode_image(return_all=True, "
                           f"attn_self=True) vs ovseg ITACLIP (self-self maps of the last block and blocks "
                           f"{list(dense_method.intermediate_layers)}, token residual, no MLP); "
                           f"pos_embed_interpolation={settings.pos_embed_interpolation}; fp32 {where}"))
                for engineering in (True, False):
                    window_logits(image, first, engineering, size_name)
            # every other config's img_eng_coefficient, on the protocol's window
            h, w = DENSE_SIZES["224x224"]
            image = image_tensor(generated_image(h, w, seed=h + w))[None].to(device)
            for dataset in datasets[1:]:
                window_logits(image, dataset, True, "224x224")
            dense_seg = dense_method = None  # free the ViT-B/16-width towers before the label maps

        # text, model inputs, label maps: ViT-B/16's layout at a narrower width (every window runs five views on
        # both sides)
        method = ovseg_itaclip(label_folder).to(device).eval()
        scorer = OVSegScorer(method, "itaclip", device=device)
        weights = label_folder / "open_clip_pytorch_model.bin"

        with tempfile.TemporaryDirectory() as scratch:
            for dataset in datasets:
                seg = ref.segmentor(dataset, weights)
                entry = scorer.entry(dataset)
                s = entry.settings
                log(tensor_record(
                    "ITACLIP", f"text embeddings {dataset}", entry.text, seg.query_features, protocol="itaclip",
                    detail=f"{len(entry.vocabulary.queries)} names x 80 ImageNet templates mixed with "
                           f"{s.auxiliary_texts.format(dataset=dataset)} (weight {s.auxiliary_weight}; theirs "
                           f"{seg.def_coefficient}); small random text tower {SMALL_TEXT}"))
                pipeline = ref.pipeline(dataset)
                sizes = sizes_of(dataset)
                for size_name, (h, w) in sizes.items():
                    image = generated_image(h, w, seed=7 * h + w)
                    theirs = ref.model_input(seg, pipeline, image, Path(scratch))
                    ours = method.encoder.normalize(protocol_resize(
                        image_tensor(image)[None].to(device), s.short_side, s.long_side_max, None,
                        s.resize_library, s.resize_rule))
                    log(tensor_record("ITACLIP", f"model input {dataset} {size_name}", ours, theirs,
                                      protocol="itaclip",
                                      detail=f"their LoadImageFromFile + Resize + SegDataPreProcessor: "
                                             f"{tuple(theirs.shape[-2:])}"))
                if dataset not in label_datasets:
                    del seg
                    continue
                with method.scoring(dataset):
                    coefficient = method.current  # what scorer.labels uses: the evaluator enters the same block
                for size_name, (h, w) in sizes.items():
                    image = generated_image(h, w, seed=7 * h + w)
                    theirs = ref.labels(seg, pipeline, image, Path(scratch))
                    ours = scorer.labels(dataset, image)
                    log(label_record(
                        "ITACLIP", f"labels {dataset} {size_name}", ours, theirs, protocol="itaclip",
                        detail=f"image tower width {LABEL_VISION_WIDTH} (ViT-B/16 layout); image engineering "
                               f"(img_eng_coefficient {coefficient}, theirs {seg.img_eng_coefficient}); "
                               f"{s.mode} {s.crop}/{s.stride}, short side {s.short_side}, logit scale "
                               f"{s.logit_scale} (theirs {seg.logit_scale}), prob thd {s.prob_threshold}, area thd "
                               f"{s.area_threshold}, PAMR {s.pamr_steps} steps {s.pamr_dilations}, "
                               f"{s.label_closing}x{s.label_closing} closing; {torch.unique(theirs).numel()} classes "
                               f"in the reference map; fp32 {where}"))
                del seg
    print(f"[ITACLIP] compared in {time.time() - started:.0f} s", flush=True)
    return records
